"""The multi-node optimizer: averages gradients over processes before each update.

Same behaviour as ChainerMN's ``create_multi_node_optimizer``: the first
``update()`` after the set of (initialized) parameters changes -- the first
one of all, and after a lazily initialized parameter gets its array --
broadcasts rank 0's parameters instead of updating; every other ``update()``
averages the gradients (``communicator.multi_node_mean_grad``) and then lets
the wrapped optimizer update.  Attribute reads and writes go to the wrapped
optimizer.

Whether the set changed is decided as ChainerMN does (the sorted list of
``(name, param.array is not None)`` compared with the previous one), after
a cheap test: when ``namedparams()`` lists the same names and parameter
objects as at the previous call, each with an array exactly where it had
one (one native pass, :class:`cynag.multinode._layout.Snapshot`), nothing
changed.  The list of ``namedparams()`` is read once per ``update()`` and
passed on to the communicator.
"""
import operator

from cynag._multi_tensor import list_namedparams
from cynag.multinode import _layout
from cynag.parameter import Parameter

_PATH = operator.itemgetter(0)


class _MultiNodeOptimizer:

    def __init__(self, actual_optimizer, communicator, zero_fill):
        object.__setattr__(self, "communicator", communicator)
        object.__setattr__(self, "actual_optimizer", actual_optimizer)
        object.__setattr__(self, "target_params", [])
        object.__setattr__(self, "zero_fill", zero_fill)
        object.__setattr__(self, "_snapshot", None)   # (target, Snapshot) of the last call
        object.__setattr__(self, "_names", {})  # (see cynag._step.link_namedparams)

    def update(self, lossfun=None, *args, **kwds):
        """One training step: backward (with ``lossfun``), then broadcast or average and update.

        With ``lossfun``: ``loss = lossfun(*args, **kwds)``, the target's
        gradients are cleared and ``loss.backward(loss_scale=...)`` gets the
        wrapped optimizer's loss scale (recorded on cynag's parameters, as
        cynag's own ``update`` does).
        """
        target = self.target
        actual = self.actual_optimizer
        if lossfun is not None:
            use_cleargrads = getattr(self, "_use_cleargrads", True)
            loss = lossfun(*args, **kwds)
            if use_cleargrads:
                target.cleargrads()
            else:
                target.zerograds()
            loss.backward(loss_scale=actual._loss_scale)
            del loss
            for param in target.params():
                if isinstance(param, Parameter):
                    param._loss_scale = actual._loss_scale
        items = list_namedparams(target, self._names)
        saved = (self.target_params, self._snapshot)
        if self._is_changed(target, items):
            try:
                self.communicator.bcast_data(target)
            except BaseException:
                # Refused (on some rank): not broadcast, so the next update
                # must try again (the errors leave everything unchanged).
                object.__setattr__(self, "target_params", saved[0])
                object.__setattr__(self, "_snapshot", saved[1])
                raise
        else:
            mean = getattr(self.communicator, "_mean_grad", None)
            if mean is not None:  # cynag's communicator: no second namedparams() listing
                mean(target, self.zero_fill, items)
            else:
                self.communicator.multi_node_mean_grad(target, self.zero_fill)
            actual.update(None, *args, **kwds)

    def is_changed(self, target):
        """True if the (sorted) parameter names or their initialization changed since last call."""
        return self._is_changed(target, list(target.namedparams()))

    def _is_changed(self, target, items):
        snap = self._snapshot
        if snap is not None and snap[0] is target and snap[1].matches(items):
            return False
        previous = self.target_params
        current = [(name, param.array is not None) for name, param in sorted(items, key=_PATH)]
        object.__setattr__(self, "target_params", current)
        object.__setattr__(self, "_snapshot", (target, _layout.Snapshot(items, arrays=False)))
        return current != previous

    def setup(self, link, **kwargs):
        """``actual_optimizer.setup(link, **kwargs)``; returns this wrapper."""
        self.actual_optimizer.setup(link, **kwargs)
        object.__setattr__(self, "_snapshot", None)
        return self

    def __getattr__(self, attr_name):
        return getattr(self.actual_optimizer, attr_name)

    def __setattr__(self, attr_name, value):
        setattr(self.actual_optimizer, attr_name, value)


def create_multi_node_optimizer(actual_optimizer, communicator, double_buffering=False,
                                zero_fill=True):
    """Wrap ``actual_optimizer`` so that its updates average gradients over processes.

    Args:
        actual_optimizer: a cynag optimizer (or any optimizer with Chainer's
            interface, e.g. a Chainer one).
        communicator: from :func:`cynag.multinode.create_communicator`.
        double_buffering: not supported (as in ChainerMN for every
            communicator but ``pure_nccl``): ``ValueError``.
        zero_fill: a ``None`` gradient of an initialized parameter is
            averaged as zeros (default); with ``False`` such parameters are
            skipped, which requires the same ones to be ``None`` on every
            rank.

    Returns:
        The wrapper; ``setup(link)`` on it returns it too.
    """
    if double_buffering:
        raise ValueError("This communicator does not support double buffering.")
    return _MultiNodeOptimizer(actual_optimizer, communicator, zero_fill)
