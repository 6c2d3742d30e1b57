"""Chainer's NesterovAG as a PyTorch optimizer: ``cynag.torch.NesterovAG``.

PyTorch has no Chainer NesterovAG: ``SGD(nesterov=True)`` is another
method.  For a gradient ``g``, Chainer's step is (``v`` starts at zero)::

    v = momentum * v - lr * g
    p = p + momentum**2 * v - (1 + momentum) * lr * g

so the gradient of step ``t`` enters with weight ``1 + m + m**2`` and the one
of step ``t - k`` with ``m**(k + 2)``, where PyTorch's Nesterov SGD gives
``1 + m`` and ``m**(k + 1)``; and ``v`` carries ``lr``, so under a schedule an
old learning rate fades out over about ``1 / (1 - m)`` steps.

:class:`NesterovAG` is a ``torch.optim.Optimizer``: param groups with their
own ``lr``, ``momentum`` and ``weight_decay`` (read at every step, so every
``torch.optim.lr_scheduler`` works), ``state_dict()`` in PyTorch's format
(loadable with ``torch.load(..., weights_only=True)``), ``zero_grad()``,
step hooks, ``torch.amp.GradScaler`` (a step with inf/nan gradients is
skipped by the scaler).  CPU float32/float64 tensors are updated in place by
cynag's native multi-tensor kernel (through
:func:`cynag.functional.nesterov_ag_addresses` or, when every parameter with
a gradient is such a tensor with a state, its C entry called by the native
reader, with or without weight decay; no copies), bit for bit as Chainer's NumPy
sequence computes, and their version counters are bumped as by an in-place
operation.  float16 and bfloat16 are computed in
float32 and stored rounded.  CUDA tensors go to the same CUDA kernel as
cynag's GPU path, through CuPy (zero copy by DLPack, on PyTorch's current
stream).

:func:`load_chainer_state` and :func:`save_chainer_state` move an optimizer's
state between a Chainer (or cynag) optimizer NPZ and this optimizer.
"""
import functools
import numbers

import numpy
import torch

from cynag import _torch_native as _native
from cynag import functional
from cynag_kernels import _nesterov_cpu
from cynag_kernels.multi_tensor import ITEM_ALIGN, ITEMS_PER_THREAD, shared_rows
from cynag_kernels.threads import get_num_threads, get_parallel_threshold

__all__ = ["NesterovAG", "load_chainer_state", "save_chainer_state", "native_status",
           "chainer_to_torch_name",
           "torch_to_chainer_name"]

_KERNEL_DTYPES = {torch.float32: numpy.dtype(numpy.float32),
                  torch.float64: numpy.dtype(numpy.float64)}
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_FLOAT_DTYPES = tuple(_KERNEL_DTYPES) + _HALF_DTYPES
_FLOAT_SET = frozenset(_FLOAT_DTYPES)


def _hyper(group, name, gi):
    value = group[name]
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError("param_groups[%d][%r] must be a scalar, got a tensor of shape %s"
                             % (gi, name, tuple(value.shape)))
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError("param_groups[%d][%r] must be a real number, got %r" % (gi, name, value))
    return float(value)


def _label(gi, pi, p):
    return "param_groups[%d]['params'][%d] (shape %s, %s, %s)" % (
        gi, pi, tuple(p.shape), str(p.dtype).replace("torch.", ""), p.device)


def _explain(gi, pi, p, g):
    """Raise the error of a gradient that does not fit its parameter."""
    label = _label(gi, pi, p)
    if g.layout != torch.strided:
        raise RuntimeError("%s: cynag.torch.NesterovAG does not support sparse gradients"
                           % label)
    if p.layout != torch.strided:
        raise RuntimeError("%s: cynag.torch.NesterovAG does not support sparse parameters"
                           % label)
    if p.dtype not in _FLOAT_DTYPES:
        raise TypeError("%s: the parameter is not float16, bfloat16, float32 or float64"
                        % label)
    if g.device != p.device:
        raise RuntimeError("%s: the gradient is on %s" % (label, g.device))
    if g.dtype != p.dtype:
        raise TypeError("%s: the gradient has dtype %s" % (label, g.dtype))
    if g.shape != p.shape:
        raise ValueError("%s: the gradient has shape %s" % (label, tuple(g.shape)))
    raise AssertionError("%s: no mismatch found" % label)  # pragma: no cover


def _addressable(t):
    """True if the step can address ``t``'s elements: CPU or CUDA memory (not a
    meta tensor, a subclass without storage such as DTensor, or another
    device's memory; an efficient zero tensor has none and needs none)."""
    if t.device.type not in ("cpu", "cuda"):
        return False
    return t.numel() == 0 or t.data_ptr() != 0 or t._is_zerotensor()


def _check_placement(gi, pi, p, g, v):
    """Raise, naming the parameter, for tensors the step cannot update in place:
    not :func:`_addressable`, or a ``p`` or ``v`` that is expanded (a zero
    stride: its elements share memory)."""
    for name, t in (("parameter", p), ("gradient", g), ("state 'v'", v)):
        if t is None:
            continue
        if not _addressable(t):
            raise TypeError(
                "%s: the %s is a %s on %s without memory the step can address; "
                "cynag.torch.NesterovAG updates tensors in CPU or CUDA memory (not meta "
                "tensors, DTensor or other devices)" % (_label(gi, pi, p), name,
                                                         type(t).__name__, t.device))
        if name != "gradient" and not t.is_contiguous() \
                and torch._debug_has_internal_overlap(t) == 1:  # (a zero stride)
            raise ValueError("%s: the %s has elements that share memory (an expanded "
                             "tensor) and cannot be updated in place" % (_label(gi, pi, p),
                                                                        name))


class _Rows:
    """Some parameters of a group as the native reader listed them, with their states."""

    __slots__ = ("params", "rows", "sts")

    def __init__(self, params, rows, sts):
        self.params, self.rows, self.sts = params, rows, sts

    def entries(self):
        """Their entries (made only for tensors that go through copies)."""
        return [_Entry(self.params[i], self.params[i].grad, st["v"], st, None)
                for i, st in zip(self.rows, self.sts)]


class _Entry:
    """One parameter of one step: its tensors, its state dict and its place."""

    __slots__ = ("p", "g", "v", "st", "label")

    def __init__(self, p, g, v, st, label):
        self.p, self.g, self.v, self.st, self.label = p, g, v, st, label


class NesterovAG(torch.optim.Optimizer):
    """Chainer's Nesterov accelerated gradient as a PyTorch optimizer.

    Args:
        params: the parameters (an iterable of tensors or of param group
            dicts), as for any ``torch.optim.Optimizer``.
        lr (float): learning rate (Chainer's default 0.01).
        momentum (float): momentum (Chainer's default 0.9).
        weight_decay (float): Chainer's ``WeightDecay``: the step uses
            ``g + weight_decay * p`` (each product and sum rounded to the
            dtype, as NumPy computes it); ``p.grad`` is left as it is.
            ``0`` means no decay at all, as in PyTorch (Chainer's
            ``WeightDecay(0)`` would still add ``0 * p``).

    State of each parameter (created at its first update): ``v``, a tensor
    like the parameter, and ``step``, the number of its updates (Chainer's
    rule ``t``).  Parameters whose ``.grad`` is None are skipped: no state,
    and their ``step`` does not move.  The optimizer counts its steps in
    :attr:`t` and epochs in :attr:`epoch` (as Chainer's optimizer does;
    both are part of :meth:`state_dict`).

    A step checks every parameter before it changes anything: a sparse
    gradient, a gradient of another shape, dtype or device than its
    parameter, a parameter that is not floating point, a state that does
    not fit (``v``, or a ``step`` that is not an int), an inference tensor
    outside ``torch.inference_mode()``, an expanded parameter or ``v`` (a
    zero stride), or a tensor not in CPU or CUDA memory (a meta tensor, a
    ``DTensor``, another device's) raises an exception naming the parameter
    (``param_groups[g]['params'][i]``) and leaves every parameter and state
    as it was.
    """

    def __init__(self, params, lr=0.01, momentum=0.9, weight_decay=0.0):
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
                raise TypeError("%s must be a real number, got %r" % (name, value))
        if not 0.0 <= float(lr):
            raise ValueError("Invalid learning rate: {}".format(lr))
        if not 0.0 <= float(momentum):
            raise ValueError("Invalid momentum value: {}".format(momentum))
        if not 0.0 <= float(weight_decay):
            raise ValueError("Invalid weight_decay value: {}".format(weight_decay))
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.t = 0
        self.epoch = 0

    def __getstate__(self):
        # (torch's keeps defaults, state and param_groups: copy.deepcopy, pickle
        # and torch.save(optimizer) keep the counts too)
        state = super().__getstate__()
        state["t"] = self.t
        state["epoch"] = self.epoch
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("t", 0)
        self.__dict__.setdefault("epoch", 0)

    def new_epoch(self):
        """Count one more epoch (Chainer's ``Optimizer.new_epoch``)."""
        self.epoch += 1

    def add_param_group(self, param_group):
        """PyTorch's, refusing a group that lists one parameter twice (PyTorch
        warns that it will be an error; here each listing would be a step)."""
        if isinstance(param_group, dict):
            params = param_group.get("params")
            if isinstance(params, torch.Tensor):
                params = [params]
            elif params is not None and not isinstance(params, (set, dict)):
                params = list(params)
                param_group["params"] = params  # (in place, as torch does)
                seen = set()
                for pi, p in enumerate(params):
                    if (isinstance(p, tuple) and len(p) == 2
                            and isinstance(p[1], torch.Tensor)):
                        p = p[1]  # (named parameters: (name, tensor) pairs)
                    if id(p) in seen:
                        raise ValueError("param group %d lists the same parameter twice (at "
                                         "%d); list each parameter once"
                                         % (len(self.param_groups), pi))
                    seen.add(id(p))
        super().add_param_group(param_group)

    # -- state_dict ----------------------------------------------------------
    def state_dict(self):
        """PyTorch's format, with the optimizer's ``t`` and ``epoch`` under ``'cynag'``
        (there when the post-hooks, ``register_state_dict_post_hook``, see it)."""
        post_hooks = getattr(self, "_optimizer_state_dict_post_hooks", None)
        if post_hooks:
            self._optimizer_state_dict_post_hooks = type(post_hooks)()
        try:
            sd = super().state_dict()
        finally:
            if post_hooks:
                self._optimizer_state_dict_post_hooks = post_hooks
        sd["cynag"] = {"t": int(self.t), "epoch": int(self.epoch)}
        for hook in list((post_hooks or {}).values()):
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict):
        """Load a :meth:`state_dict`; a state that does not fit raises, changing nothing.

        As in PyTorch, the load pre-hooks (``register_load_state_dict_pre_hook``)
        see the dict first and may replace it.  Then checked: the number of
        groups and of parameters in each (as PyTorch checks), and for every
        saved parameter state that is not empty, that ``v`` is a floating-point
        tensor of the parameter's shape (converted to the parameter's dtype
        and device, as PyTorch converts a state) and ``step`` a non-negative
        integer.  Other entries of a state are loaded as they are, as PyTorch
        loads them.
        """
        if not isinstance(state_dict, dict):
            raise ValueError("not an optimizer state_dict (needs 'state' and 'param_groups')")
        state_dict = state_dict.copy()
        # (the load hooks exist from PyTorch 2.1 on)
        pre_hooks = getattr(self, "_optimizer_load_state_dict_pre_hooks", None)
        post_hooks = getattr(self, "_optimizer_load_state_dict_post_hooks", None)
        for hook in list((pre_hooks or {}).values()):
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        if not isinstance(state_dict, dict) or "state" not in state_dict \
                or "param_groups" not in state_dict:
            raise ValueError("not an optimizer state_dict (needs 'state' and 'param_groups')")
        groups = self.param_groups
        saved_groups = state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        index = {}
        for gi, (g, sg) in enumerate(zip(groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't "
                                 "match the size of optimizer's group (group %d)" % gi)
            for pi, (key, p) in enumerate(zip(sg["params"], g["params"])):
                index[key] = (gi, pi, p)
        for key, st in state_dict["state"].items():
            if key not in index:
                raise ValueError("loaded state has an entry for parameter %r, which is in no "
                                 "group" % (key,))
            gi, pi, p = index[key]
            label = _label(gi, pi, p)
            if not isinstance(st, dict):
                raise ValueError("%s: the saved state is not a dict" % label)
            if not _started(st):
                continue  # (not updated yet, entries of the user's own: loaded as they are)
            v = st.get("v")
            if not isinstance(v, torch.Tensor):
                raise ValueError("%s: the saved state has no tensor 'v'" % label)
            if v.shape != p.shape:
                raise ValueError("%s: the saved 'v' has shape %s" % (label, tuple(v.shape)))
            if not v.is_floating_point() or v.layout is not torch.strided:
                raise ValueError("%s: the saved 'v' has dtype %s" % (label, v.dtype))
            if torch._debug_has_internal_overlap(v) == 1:
                raise ValueError("%s: the saved 'v' has elements that share memory (an "
                                 "expanded tensor)" % label)
            _saved_step(st.get("step", 0), "'step'", label)
        extra = state_dict.get("cynag", {})
        if not isinstance(extra, dict):
            raise ValueError("the state dict's 'cynag' entry is not a dict of 't' and 'epoch': "
                             "%r" % (extra,))
        t = _saved_step(extra.get("t", 0), "'cynag' 't'")
        epoch = _saved_step(extra.get("epoch", 0), "'cynag' 'epoch'")
        sd = {k: v for k, v in state_dict.items() if k != "cynag"}
        # The pre-hooks ran above; the post-hooks run below, once the counts are set.
        if pre_hooks is not None:
            self._optimizer_load_state_dict_pre_hooks = type(pre_hooks)()
        if post_hooks is not None:
            self._optimizer_load_state_dict_post_hooks = type(post_hooks)()
        try:
            super().load_state_dict(sd)
        finally:
            if pre_hooks is not None:
                self._optimizer_load_state_dict_pre_hooks = pre_hooks
            if post_hooks is not None:
                self._optimizer_load_state_dict_post_hooks = post_hooks
        for g in self.param_groups:
            for key, value in self.defaults.items():
                g.setdefault(key, value)  # (a group saved without one: the default, as torch)
        for st in self.state.values():
            if not _started(st):
                continue
            # (the step's own type: a Python int, 0 if the saved state had none)
            st["step"] = int(st["step"].item() if isinstance(st.get("step"), torch.Tensor)
                             else st.get("step", 0))
        self.t = t
        self.epoch = epoch
        for hook in list((post_hooks or {}).values()):
            hook(self)

    # -- the step ------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient; returns ``closure()``'s value.

        ``closure`` (optional) is called with grad enabled first, as for any
        PyTorch optimizer.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        native = _native.get()
        collected = None
        if native is not None:
            groups = self.param_groups
            hyper = [(_hyper(g, "lr", gi), _hyper(g, "momentum", gi),
                      _hyper(g, "weight_decay", gi)) for gi, g in enumerate(groups)]
            lists = [g["params"] if type(g["params"]) is list else list(g["params"])
                     for g in groups]
            # The usual step in one native call (see step_groups in _torch_native.cpp);
            # else what it read, for the general path, which checks and plans it.
            collected = native.step_groups(
                lists, self.state, [h[0] for h in hyper], [h[1] for h in hyper],
                [h[2] for h in hyper], get_num_threads(), get_parallel_threshold(),
                ITEMS_PER_THREAD, ITEM_ALIGN, _nesterov_cpu.kernel_api())
            if collected is None:
                self.t += 1
                return loss
            collected = (hyper, lists, collected)
        merged, plans = self._plans(native, collected)
        _require_cupy_for(plans)  # (before any group changes)
        if merged is not None:
            self._run_merged(native, *merged)
        for group, plan in zip(self.param_groups, plans):
            self._apply(group, plan, native)
        _increment_versions(self.param_groups, self.state)
        self.t += 1
        return loss

    def _plans(self, native, collected=None):
        """Check every group; raise before anything changes.  Returns ``(merged, plans)``.

        ``collected``: ``(hyper, lists, table)``, what the native reader read
        this step (None with the Python reader).

        ``plans``: one per group, ``(lr, momentum, weight_decay, fast, rest)`` as
        :meth:`_collect` makes them.  ``merged`` (native reader only, else None):
        the rows of the groups without weight decay that the kernel takes, all
        groups together, updated by :meth:`_run_merged` in one call per dtype
        (their arrays overlap no other row's, so the order does not matter).
        """
        groups = self.param_groups
        if native is None:
            return None, [self._collect(gi, group) for gi, group in enumerate(groups)]
        hyper, lists, table = collected
        codes, ptrs, sizes, kinds, sts, offsets = table
        codes, ptrs, sizes, kinds = codes.numpy(), ptrs.numpy(), sizes.numpy(), kinds.numpy()
        n_groups = len(groups)
        plans = [(lr, m, wd, {}, []) for lr, m, wd in hyper]
        decay = [bool(h[2]) for h in hyper]
        group_of = numpy.repeat(numpy.arange(n_groups), numpy.diff(offsets))
        bad = numpy.flatnonzero(codes == 3).tolist()
        for i in bad:
            gi = int(group_of[i])
            pi = i - offsets[gi]
            p = lists[gi][pi]
            self._check_one(gi, pi, p, getattr(p, "grad", None), self.state.get(p))
        if bad:
            gi = int(group_of[bad[0]])
            raise RuntimeError("%s: the native reader found it does not fit, the Python "
                               "checks did not" % _label(gi, bad[0] - offsets[gi],
                                                         lists[gi][bad[0] - offsets[gi]]))
        decayed_row = numpy.array(decay, bool)[group_of]
        merged = []
        for kind, dtype in ((0, torch.float32), (1, torch.float64)):
            sel = (codes == 1) & (kinds == kind)
            rows = numpy.flatnonzero(sel & ~decayed_row)
            if len(rows):
                merged.append((dtype, rows, ptrs[rows], sizes[rows],
                               group_of[rows] if n_groups > 1 else None,
                               [sts[i] for i in rows.tolist()]))
            by_group = {}
            for i in numpy.flatnonzero(sel & decayed_row).tolist():
                by_group.setdefault(int(group_of[i]), []).append(i)
            for gi, grows in by_group.items():
                local = [i - offsets[gi] for i in grows]
                row_sts = [sts[i] for i in grows]
                plans[gi][3][dtype] = (_Rows(lists[gi], local, row_sts), None, None, row_sts,
                                       (ptrs[grows], sizes[grows]))
        for i in numpy.flatnonzero(codes == 2).tolist():
            gi = int(group_of[i])
            pi = i - offsets[gi]
            p, st = lists[gi][pi], sts[i]
            v = st.get("v") if _started(st) else None
            _check_placement(gi, pi, p, p.grad, v)
            plans[gi][4].append(_Entry(p, p.grad, v, st, (gi, pi)))
        return (merged, hyper, lists, offsets) if merged else None, plans

    def _run_merged(self, native, merged, hyper, lists, offsets):
        """The rows :meth:`_plans` merged: one native call per dtype, every group's
        hyperparameters per row."""
        lrs = [h[0] for h in hyper]
        moms = [h[1] for h in hyper]
        for dtype, rows, ptrs, sizes, group_of, sts in merged:
            np_dtype = _KERNEL_DTYPES[dtype]
            if group_of is None:
                ran = functional.nesterov_ag_addresses(ptrs, sizes, np_dtype, lr=lrs[0],
                                                       momentum=moms[0])
            else:
                ran = functional.nesterov_ag_addresses(ptrs, sizes, np_dtype, lr=lrs,
                                                       momentum=moms, index=group_of)
            if not ran:
                # A coefficient does not fit the dtype (NumPy 1.x would compute in
                # float64): group by group, through copies where needed.
                groups = (numpy.zeros(len(sizes), numpy.intp) if group_of is None
                          else group_of)
                for gi in numpy.unique(groups).tolist():
                    k = numpy.flatnonzero(groups == gi)
                    local = [int(i) - offsets[gi] for i in rows[k]]
                    row_sts = [sts[i] for i in k.tolist()]
                    self._run_cpu(None, None, None, np_dtype, lrs[gi], moms[gi], 0.0,
                                  _Rows(lists[gi], local, row_sts).entries,
                                  (ptrs[k], sizes[k]))
            native.bump_steps(sts)

    def _collect(self, gi, group):
        """Check the group (Python reader); raise before anything changes.  Returns the
        plan of the group: ``(lr, momentum, weight_decay, fast, rest)``: ``fast``, by
        torch dtype, the dense CPU tensors with a state, as ``(ps, gs, vs, states,
        table)`` (``table``: the native reader's addresses and sizes, or None);
        ``rest``, the other entries."""
        lr = _hyper(group, "lr", gi)
        momentum = _hyper(group, "momentum", gi)
        wd = _hyper(group, "weight_decay", gi)
        fast = {}
        rest = []
        state_get = self.state.get
        for pi, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            st = state_get(p)
            v = self._check_one(gi, pi, p, g, st)
            if v is not None and not p.is_cuda and p.dtype in _KERNEL_DTYPES \
                    and p.is_contiguous() and g.is_contiguous() and v.is_contiguous() \
                    and p.dim() and not (_lazy(p) or _lazy(g) or _lazy(v)):
                lists = fast.get(p.dtype)
                if lists is None:
                    lists = fast[p.dtype] = ([], [], [], [], None)
                lists[0].append(p)
                lists[1].append(g)
                lists[2].append(v)
                lists[3].append(st)
                continue
            rest.append(_Entry(p, g, v, st, (gi, pi)))
        return lr, momentum, wd, fast, rest

    def _check_one(self, gi, pi, p, g, st):
        """The checks of one parameter with a gradient: raise the error that names it.

        Returns its state's ``v`` (None if it has no state yet).
        """
        if not isinstance(p, torch.Tensor):
            raise TypeError("param_groups[%d]['params'][%d] is not a tensor" % (gi, pi))
        pd = p.dtype
        cuda = p.is_cuda
        if g.dtype is not pd or g.is_cuda is not cuda or g.layout is not torch.strided \
                or p.layout is not torch.strided or pd not in _FLOAT_SET \
                or g.shape != p.shape or (cuda and g.device != p.device):
            _explain(gi, pi, p, g)
        if p.is_inference() and not torch.is_inference_mode_enabled():
            raise RuntimeError("%s: an inference tensor (made in torch.inference_mode) cannot "
                               "be updated in place outside it" % _label(gi, pi, p))
        if not _started(st):
            _check_placement(gi, pi, p, g, None)
            return None
        v = st.get("v")
        if not isinstance(v, torch.Tensor) or v.layout is not torch.strided \
                or v.dtype is not pd or v.shape != p.shape or v.is_cuda is not cuda \
                or (cuda and v.device != p.device):
            raise ValueError("%s: its state 'v' does not fit the parameter" % _label(gi, pi, p))
        if v.is_inference() and not torch.is_inference_mode_enabled():
            raise RuntimeError("%s: its state 'v' is an inference tensor (made in "
                               "torch.inference_mode) and cannot be updated in place outside "
                               "it" % _label(gi, pi, p))
        if type(st.get("step")) is not int:
            raise ValueError("%s: its state 'step' is %r, not an int" % (_label(gi, pi, p),
                                                                          st.get("step")))
        _check_placement(gi, pi, p, g, v)
        return v

    def _apply(self, group, plan, native=None):
        lr, momentum, wd, fast, rest = plan
        for pd, (ps, gs, vs, sts, table) in fast.items():
            if table is not None:  # the native reader's rows
                rows = ps
                self._run_cpu(None, None, None, _KERNEL_DTYPES[pd], lr, momentum, wd,
                              rows.entries, table)
                native.bump_steps(sts)
                continue
            self._run_cpu(ps, gs, vs, _KERNEL_DTYPES[pd], lr, momentum, wd,
                          lambda ps=ps, gs=gs, vs=vs: [_Entry(p, g, v, None, None)
                                                       for p, g, v in zip(ps, gs, vs)])
            for st in sts:
                st["step"] += 1
        if not rest:
            return
        state = self.state
        for e in rest:
            if e.v is None:
                e.v = torch.zeros_like(e.p, memory_format=torch.preserve_format)
                st = state[e.p]  # (entries of the user's own are kept, as in torch.optim)
                st["v"] = e.v
                st["step"] = 0
                e.st = st
        dense = {}
        by_device = {}
        for e in rest:
            p = e.p
            dtype = _KERNEL_DTYPES.get(p.dtype)
            if p.is_cuda:
                by_device.setdefault((p.device, p.dtype), []).append(e)
            elif dtype is not None and p.dim() and p.is_contiguous() \
                    and e.g.is_contiguous() and e.v.is_contiguous() \
                    and not (_lazy(p) or _lazy(e.g) or _lazy(e.v)):
                dense.setdefault(dtype, []).append(e)
            else:
                self._run_copies([e], lr, momentum, wd)
        for dtype, es in dense.items():
            self._run_cpu([e.p for e in es], [e.g for e in es], [e.v for e in es], dtype, lr,
                          momentum, wd, lambda es=es: es)
        for es in by_device.values():
            self._run_gpu(es, lr, momentum, wd)
        for e in rest:
            e.st["step"] += 1

    def _run_cpu(self, ps, gs, vs, dtype, lr, momentum, wd, entries, table=None):
        """Dense CPU tensors of a kernel dtype: one native call over their addresses.

        ``entries()`` gives their entries, for the tensors that go through
        copies instead; ``table``: the native reader's addresses and sizes
        (overlaps already checked), or None (``ps``, ``gs``, ``vs`` given).
        """
        ops = None
        if wd:
            ops = _decay_ops(dtype, wd)
            if ops is None:  # (NumPy 1.x would compute in float64)
                self._run_copies(entries(), lr, momentum, wd)
                return
        if table is not None:
            ptrs, sizes = table
            shared = None  # (the reader left overlapping rows to the copies)
        else:
            ptrs = numpy.array([[p.data_ptr() for p in ps], [g.data_ptr() for g in gs],
                                [v.data_ptr() for v in vs]], numpy.int64).T.copy()
            sizes = numpy.array([p.numel() for p in ps], numpy.int64)
            # Tensors whose arrays overlap (one another's, or another tensor's)
            # run one by one through copies, in their order (see docs/torch.md
            # for tensors of the copy path: they run after these).
            shared = shared_rows(ptrs, sizes * dtype.itemsize)
            if not shared.any():
                shared = None
        # (with weight decay, the kernel decays copies of the gradients: p.grad
        # is left as it is)
        if shared is None:
            if not functional.nesterov_ag_addresses(ptrs, sizes, dtype, lr=lr,
                                                    momentum=momentum, ops=ops,
                                                    keep_grads=True):
                self._run_copies(entries(), lr, momentum, wd)
            return
        es = entries()
        sel = ~shared
        if sel.any():
            if not functional.nesterov_ag_addresses(ptrs[sel], sizes[sel], dtype, lr=lr,
                                                    momentum=momentum, ops=ops,
                                                    keep_grads=True):
                self._run_copies([e for e, s in zip(es, sel) if s], lr, momentum, wd)
        for k in numpy.flatnonzero(shared).tolist():
            self._run_copies([es[k]], lr, momentum, wd)

    def _run_copies(self, es, lr, momentum, wd):
        """Through contiguous copies in the compute type (float32 for half types),
        then stored back: non-contiguous or aliased tensors, float16/bfloat16,
        and coefficients the kernel does not take (NumPy's promotion)."""
        for e in es:
            p, g, v = e.p, e.g, e.v
            compute = torch.float32 if p.dtype in _HALF_DTYPES else p.dtype
            pc = p.detach().to("cpu", compute, copy=True).contiguous()
            gc = g.detach().to("cpu", compute, copy=True).contiguous()
            vc = v.detach().to("cpu", compute, copy=True).contiguous()
            pn, gn, vn = pc.numpy(), gc.numpy(), vc.numpy()
            ops = _decay_ops(pn.dtype, wd) if wd else None
            if pn.ndim and _fits(pn.dtype, lr, momentum) and (ops is not None or not wd):
                functional.nesterov_ag([pn], [gn], [vn], lr=lr, momentum=momentum, ops=ops,
                                       impl="multi")
            else:  # NumPy 1.x's promotion (0-d arrays, huge coefficients), as Chainer's
                if wd:
                    gn += wd * pn
                functional.nesterov_ag([pn], [gn], [vn], lr=lr, momentum=momentum,
                                       impl="single")
            p.copy_(pc)
            v.copy_(vc)

    def _run_gpu(self, es, lr, momentum, wd):
        """CUDA tensors: cynag's CUDA kernel through CuPy, on PyTorch's current stream."""
        import cupy  # (step() checked that it imports, before any change)

        device = es[0].p.device
        stream = torch.cuda.current_stream(device)
        with torch.cuda.device(device), cupy.cuda.Device(device.index), \
                cupy.cuda.ExternalStream(stream.cuda_stream, device.index):
            ps, gs, vs, back = [], [], [], []
            for e in es:
                p, g, v = e.p, e.g, e.v
                direct = p.dtype in _KERNEL_DTYPES and p.is_contiguous() \
                    and g.is_contiguous() and v.is_contiguous()
                if direct:
                    pt, vt = p, v
                else:
                    compute = torch.float32 if p.dtype in _HALF_DTYPES else p.dtype
                    pt = p.detach().to(compute, copy=True).contiguous()
                    vt = v.detach().to(compute, copy=True).contiguous()
                    g = g.detach().to(compute, copy=True).contiguous()
                    back.append((p, pt, v, vt))
                if wd:
                    g = g + pt * wd  # a new tensor (p.grad is left as it is)
                ps.append(cupy.from_dlpack(pt.detach()))
                gs.append(cupy.from_dlpack(g.detach()))
                vs.append(cupy.from_dlpack(vt.detach()))
            functional.nesterov_ag(ps, gs, vs, lr=lr, momentum=momentum, impl="multi")
            for p, pt, v, vt in back:
                p.copy_(pt)
                v.copy_(vt)


def _lazy(t):
    """A tensor whose memory does not hold its values as read: a negative view (the
    sign is a bit of the tensor) or an efficient zero tensor (no memory).  Copies
    resolve both."""
    return t.is_neg() or t._is_zerotensor()


def _increment_versions(groups, state):
    """Bump the version counters of the parameters updated and their ``v``, as an
    in-place operation does (autograd then refuses a graph that saved them)."""
    touched = []
    for group in groups:
        for p in group["params"]:
            if p.grad is not None:
                st = state.get(p)
                touched.append(p)
                if st and isinstance(st.get("v"), torch.Tensor):
                    touched.append(st["v"])
    if touched:
        torch.autograd.graph.increment_version(touched)


def _require_cupy_for(plans):
    """Raise, naming the first CUDA parameter of the plans, if CuPy cannot be imported."""
    first = next((e for plan in plans for e in plan[4] if e.p.is_cuda), None)
    if first is None:
        return
    try:
        import cupy  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "%s: updating CUDA tensors needs CuPy (pip install \"cynag[cuda12]\" or "
            "\"cynag[cuda13]\")" % _label(*first.label, first.p)) from e


def _fits(dtype, lr, momentum):
    from cynag_kernels.multi_tensor import coefficient_table

    return bool(coefficient_table(dtype, [lr], [momentum])[1][0])


def _decay_ops(dtype, wd):
    from cynag_kernels.hooks import op_row

    row = op_row(dtype, ("weight_decay", wd))
    return None if row is None else numpy.array([row], numpy.float64)


# -- migration from and to Chainer ------------------------------------------------
_NORM_MODULES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LayerNorm",
                 "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d")


@functools.lru_cache(maxsize=None)
def _norm_classes():
    """PyTorch's normalization layers whose weight and bias Chainer calls gamma and beta
    (subclasses too, e.g. timm's BatchNormAct2d)."""
    nn = torch.nn
    return tuple(c for c in (getattr(nn.modules.batchnorm, "_NormBase", None),
                             nn.LayerNorm, nn.GroupNorm) if isinstance(c, type))


def chainer_to_torch_name(path):
    """Chainer's parameter path to PyTorch's name: ``/l1/W`` -> ``l1.weight``.

    ``/`` becomes ``.``; then a last component ``W`` or ``gamma`` becomes
    ``weight`` and ``b`` or ``beta`` becomes ``bias``.
    """
    parts = path.strip("/").split("/")
    parts[-1] = {"W": "weight", "gamma": "weight", "b": "bias", "beta": "bias"}.get(
        parts[-1], parts[-1])
    return ".".join(parts)


def torch_to_chainer_name(name, model=None):
    """PyTorch's parameter name to Chainer's path (no leading ``/``): ``l1.weight`` -> ``l1/W``.

    ``weight``/``bias`` become ``W``/``b``, or ``gamma``/``beta`` when the
    owning module of ``model`` is a normalization layer (BatchNorm,
    LayerNorm, GroupNorm, InstanceNorm), as Chainer names them.
    """
    parts = name.split(".")
    norm = False
    if model is not None and len(parts) >= 1:
        try:
            owner = model.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else model
        except AttributeError:
            owner = None
        norm = owner is not None and (isinstance(owner, _norm_classes())
                                      or type(owner).__name__ in _NORM_MODULES)
    last = parts[-1]
    if last == "weight":
        parts[-1] = "gamma" if norm else "W"
    elif last == "bias":
        parts[-1] = "beta" if norm else "b"
    return "/".join(parts)


def _unwrapped(model):
    """The model that ``torch.compile``'s, ``DistributedDataParallel``'s or
    ``DataParallel``'s wrapper holds (their parameters' names start with
    ``_orig_mod.`` or ``module.``, which Chainer's paths do not have)."""
    for _ in range(8):
        tp = type(model)
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel,
                              torch.nn.DataParallel)):
            inner = getattr(model, "module", None)
        elif tp.__name__ == "OptimizedModule" and tp.__module__.startswith("torch._dynamo"):
            inner = getattr(model, "_orig_mod", None)
        else:
            inner = None
        if not isinstance(inner, torch.nn.Module):
            break
        model = inner
    return model


def _started(st):
    """True if the state dict ``st`` is one of a parameter updated at least once:
    it has ``v`` or ``step`` (a state of only the user's own entries has not)."""
    return bool(st) and ("v" in st or "step" in st)


def _saved_step(value, what, label=None):
    """A count of a state dict (``step``, ``t``, ``epoch``): a non-negative integer
    (or a one-element tensor of one), returned as an int; raise otherwise."""
    step = value
    if isinstance(step, torch.Tensor):
        step = step.item() if step.numel() == 1 else None
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError("%sthe saved %s is not a non-negative integer: %r"
                         % ("" if label is None else label + ": ", what, value))
    return int(step)


def _count(value, key):
    """A count read from a file (``t``, ``epoch``): a whole number, as Chainer saves it."""
    a = numpy.asarray(value)
    if a.shape != () or a.dtype.kind not in "iuf" or (a.dtype.kind == "f" and (
            not numpy.isfinite(a) or a != numpy.floor(a))):
        raise ValueError("%r is not a whole number: %r" % (key, value))
    return int(a)


def _param_index(optimizer):
    index = {}
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            index.setdefault(id(p), (gi, pi, p))
    return index


def _open_npz(source):
    if hasattr(source, "files") and hasattr(source, "__getitem__"):
        return source, False  # an NpzFile already open
    if isinstance(source, dict):
        return source, False
    return numpy.load(source, allow_pickle=False), True


def load_chainer_state(optimizer, model, source, name_map=None, path="", strict=True):
    """Load a Chainer (or cynag) optimizer NPZ into a :class:`NesterovAG`.

    Args:
        optimizer (NesterovAG): the PyTorch optimizer (set up on ``model``'s
            parameters).
        model (torch.nn.Module): gives the parameters their names (a model
            wrapped by ``torch.compile``, ``DistributedDataParallel`` or
            ``DataParallel``: without ``name_map``, the names of the model
            it wraps; a ``name_map`` maps the names the wrapper gives).
        source: the NPZ file (path or file object) that Chainer's
            ``serializers.save_npz(file, optimizer)`` wrote, an open NpzFile,
            or a dict of arrays.
        name_map: Chainer path (as in the NPZ, no leading ``/``) to PyTorch
            name, a dict or a callable; default
            :func:`chainer_to_torch_name`, or the path's own name where the
            model has no parameter of that name but one of the literal name
            (a parameter called ``W``, ``b``, ``gamma`` or ``beta``, as
            :func:`save_chainer_state` writes it).
        path (str): key prefix, as for a ``Trainer`` snapshot
            (``'updater/optimizer:main/'``).
        strict (bool): every parameter of ``model`` the optimizer holds must
            have its entry in the file and every entry of the file a
            parameter (as Chainer's ``load_npz``).

    Loads each rule's ``v`` as the parameter's ``v`` and its ``t`` as
    ``step``, and the optimizer's ``t`` and ``epoch``.  A rule saved without
    state (it never updated) leaves its parameter without state (``t = 0``)
    or with ``v`` zeros and ``step = t``, as Chainer's next update would
    see it, whatever state the parameter had.  A parameter registered
    under several names (tied weights) takes its entry under any of them
    (the last in the file wins, as in Chainer).  With ``strict=False``,
    entries of parameters the optimizer does not hold (e.g. a frozen part
    of the model) or the model does not have are skipped.  All or nothing:
    every entry is read and checked (names, shapes, dtypes: the parameter's;
    float32 for a bfloat16 parameter, converted) before the optimizer
    changes.
    """
    npz, close = _open_npz(source)
    try:
        keys = list(npz.files if hasattr(npz, "files") else npz.keys())
        if path and not path.endswith("/"):
            path = path + "/"
        if path + "t" not in keys or path + "epoch" not in keys:
            raise KeyError("%r has no %r / %r: not a Chainer optimizer file (or another "
                           "path prefix)" % (getattr(source, "name", source), path + "t",
                                             path + "epoch"))
        if name_map is None:
            model = _unwrapped(model)  # (a name_map of the wrapper's names keeps them)
        named = dict(model.named_parameters(remove_duplicate=False))  # tied: every name
        index = _param_index(optimizer)
        if name_map is None:
            def mapper(cpath):
                # A parameter literally called W, b, gamma or beta (what
                # save_chainer_state writes for it) keeps its name.
                tname = chainer_to_torch_name(cpath)
                literal = ".".join(cpath.strip("/").split("/"))
                return literal if tname not in named and literal in named else tname
        else:
            mapper = name_map.get if isinstance(name_map, dict) else name_map
        found = {}
        for key in keys:
            if not key.startswith(path) or not key.endswith("/t") or key == path + "t":
                continue
            cpath = key[len(path):-2]
            tname = mapper(cpath)
            if tname is None or tname not in named:
                if strict:
                    raise KeyError("%r (Chainer parameter %r) has no parameter %r in the "
                                   "model" % (key, cpath, tname))
                continue
            p = named[tname]
            if id(p) not in index:
                if strict:
                    raise KeyError("%r: the parameter %r is not in the optimizer's param "
                                   "groups" % (key, tname))
                continue
            t = _count(npz[key], key)
            vkey = path + cpath + "/v"
            v = None
            if vkey in keys:
                v = numpy.asarray(npz[vkey])
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError("%r has shape %s, the parameter %r %s"
                                     % (vkey, v.shape, tname, tuple(p.shape)))
                # (bfloat16: NumPy has none; save_chainer_state writes float32)
                want = torch.empty((), dtype=p.dtype).numpy().dtype \
                    if p.dtype != torch.bfloat16 else numpy.dtype(numpy.float32)
                if v.dtype != want:
                    raise ValueError("%r has dtype %s, the parameter %r %s"
                                     % (vkey, v.dtype, tname, p.dtype))
            if t < 0:
                raise ValueError("%r: t = %d" % (key, t))
            found[id(p)] = (p, v, t)
        if strict:
            missing = [name for name, p in named.items()
                       if id(p) in index and id(p) not in found]
            if missing:
                raise KeyError("the file has no state for the parameters %s" % missing)
        opt_t = _count(npz[path + "t"], path + "t")
        opt_epoch = _count(npz[path + "epoch"], path + "epoch")
        new_state = {}
        for p, v, t in found.values():
            if v is None:
                # A rule without state: Chainer's next update creates v as
                # zeros (and counts on from t).
                new_state[p] = None if t == 0 else {
                    "v": torch.zeros_like(p, memory_format=torch.preserve_format).detach(),
                    "step": t}
                continue
            new_state[p] = {"v": torch.from_numpy(v.copy()).to(p.device, p.dtype), "step": t}
    finally:
        if close:
            npz.close()
    for p, st in new_state.items():
        if st is None:
            optimizer.state.pop(p, None)
        else:
            optimizer.state[p] = st
    optimizer.t = opt_t
    optimizer.epoch = opt_epoch


def save_chainer_state(optimizer, model, target, name_map=None, path=""):
    """Write the optimizer's state as an NPZ that Chainer's ``load_npz`` reads.

    Args:
        optimizer (NesterovAG): the PyTorch optimizer.
        model (torch.nn.Module): gives the parameters their names (a model
            wrapped by ``torch.compile``, ``DistributedDataParallel`` or
            ``DataParallel``: without ``name_map``, the names of the model
            it wraps; a ``name_map`` maps the names the wrapper gives).
        target: a path or a file object.
        name_map: PyTorch name to Chainer path (no leading ``/``), a dict or
            a callable; default :func:`torch_to_chainer_name` (with
            ``model``, for the names of normalization layers).  A dict must
            name every parameter the optimizer holds, under at least one of
            its names (``KeyError`` before anything is written; the other
            names of a tied parameter may be left out); a value of None, or
            a callable returning None, leaves a name out of the file.
        path (str): key prefix (e.g. ``'updater/optimizer:main/'``).

    A bfloat16 ``v`` is written as float32 (exactly; NumPy has no bfloat16).
    Writes ``t`` and ``epoch`` and, for every parameter the optimizer holds,
    under each of its names (tied weights: every name, as Chainer's
    ``namedparams()`` lists them), ``<path>/t`` and ``<path>/v`` (zeros and
    0 for a parameter not updated yet, which Chainer's first update treats
    the same as no state).
    """
    if path and not path.endswith("/"):
        path = path + "/"
    if name_map is None:
        model = _unwrapped(model)  # (a name_map of the wrapper's names keeps them)
    index = _param_index(optimizer)
    if name_map is None:
        mapper = lambda name: torch_to_chainer_name(name, model)  # noqa: E731
    elif isinstance(name_map, dict):
        # Every parameter must be named (under one of its names: a tied
        # parameter's other names may be left out).
        mapped = {id(p) for name, p in model.named_parameters(remove_duplicate=False)
                  if name in name_map}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in index and id(p) not in mapped:
                raise KeyError("name_map has no Chainer path for the parameter %r (map it "
                               "to None to leave it out)" % (name,))
        mapper = name_map.get
    else:
        mapper = name_map
    arrays = {path + "t": numpy.asarray(int(optimizer.t)),
              path + "epoch": numpy.asarray(int(optimizer.epoch))}
    for name, p in model.named_parameters(remove_duplicate=False):  # tied: every name
        if id(p) not in index:
            continue
        cpath = mapper(name)
        if cpath is None:
            continue
        st = optimizer.state.get(p) or {}
        v = st.get("v")
        # (bfloat16 has no NumPy dtype: saved as float32, which holds it exactly
        # and which load_chainer_state converts back)
        dtype = torch.float32 if p.dtype == torch.bfloat16 else p.dtype
        if v is None:
            v_np = numpy.zeros(tuple(p.shape), torch.empty((), dtype=dtype).numpy().dtype)
            t = 0
        else:
            v_np = v.detach().to("cpu", dtype if v.dtype == torch.bfloat16 else v.dtype) \
                .numpy().copy()
            t = int(st.get("step", 0))
        arrays[path + cpath + "/t"] = numpy.asarray(t)
        arrays[path + cpath + "/v"] = v_np
    numpy.savez(target, **arrays)


def native_status():
    """Which reader :class:`NesterovAG` steps use (see ``CYNAG_TORCH_NATIVE``), in words."""
    return _native.status()
