"""Optimizer hooks, as ``chainer.optimizer_hooks`` (Chainer 7.8.1).

* :class:`WeightDecay` -- ``g += rate * p`` (the rate times the loss scale
  when the gradient was computed with one);
* :class:`Lasso` -- ``g += rate * sign(p)``;
* :class:`GradientHardClipping` -- ``g = clip(g, lower_bound, upper_bound)``;
* :class:`GradientNoise` -- ``g += noise`` (annealed Gaussian noise by default);
* :class:`GradientClipping` -- scales every gradient by
  ``threshold / L2 norm of all gradients`` when that is below 1;
* :class:`GradientLARS` -- layer-wise adaptive rate scaling.

Each has Chainer's attributes (``name``, ``timing``, ``call_for_each_param``)
and works as an optimizer hook (``optimizer.add_hook(hook)``) and, but for
:class:`GradientClipping` (an optimizer hook only, as in Chainer), on a
single update rule (``rule.add_hook(hook)``), with ``timing='pre'``
(default) or ``'post'``.

The arithmetic is native on both devices: the per-element operations of
:mod:`cynag_kernels.hooks` (Cython) for NumPy arrays and the CUDA kernels of
:mod:`cynag_kernels.cuda` for CuPy arrays.  On the CPU the per-element hooks
(WeightDecay, Lasso, GradientHardClipping, GradientNoise) are bit-identical
to Chainer's NumPy code in float32 and float64.  The norms of
GradientClipping and GradientLARS are accumulated in float64 in one native
reduction (four interleaved partial sums per chunk, chunks added in a fixed
order) where Chainer sums float32 dot products: the results agree to a
relative ``~1e-14`` (float64 gradients) or ``~4e-6`` (float32) of the largest
magnitude involved.

Registered as optimizer hooks with ``'pre'`` timing, WeightDecay, Lasso and
GradientHardClipping at the end of the hook list (and a GradientClipping just
before them) are folded
into the multi-tensor update pass of the parameters it groups: one pass over
memory instead of one per hook, with the same results.
"""
import math
import numbers

import numpy

import cynag_kernels
from cynag import _backend

__all__ = ["GradientClipping", "GradientHardClipping", "GradientLARS", "GradientNoise",
           "Lasso", "WeightDecay", "exponential_decay_noise"]


def _check_real(cls, name, value, minimum=0.0, allow_none=False, allow_inf=False,
                any_real=False):
    """``value`` if it is a real number >= ``minimum`` (finite unless allowed); raise otherwise.

    A 0-d NumPy array of a real dtype, which Chainer takes as well (NumPy
    computes with it as with a scalar), becomes that scalar.  Only the
    scalar types NumPy computes with are taken, unless ``any_real``: a
    setting that meets only Python floats before any array (a norm's
    threshold, GradientNoise's eta) may be any ``numbers.Real``, such as a
    ``fractions.Fraction``, as in Chainer.
    """
    if value is None and allow_none:
        return value
    if isinstance(value, numpy.ndarray) and value.ndim == 0 and value.dtype.kind in "fiu":
        value = value[()]
    ok_type = (isinstance(value, numbers.Real if any_real else cynag_kernels.REAL_SCALAR_TYPES)
               and not isinstance(value, (bool, numpy.bool_)))
    if not ok_type:
        raise TypeError("%s: %s must be a real number, got %r" % (cls, name, value))
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise ValueError("%s: %s must be finite, got %r" % (cls, name, value))
    if minimum is not None and v < minimum:
        raise ValueError("%s: %s must be >= %s, got %r" % (cls, name, minimum, value))
    return value


def _apply(g, p, ops):
    """Run the operations on the gradient ``g`` natively, on its device."""
    if isinstance(g, numpy.ndarray):
        from cynag_kernels import hooks

        hooks.apply_ops(g, p, ops)
        return
    if _backend.is_cupy_array(g):
        from cynag_kernels import cuda
        from cynag_kernels.hooks import gpu_row

        rows = []
        with _backend.device_of_array(g):
            for op in ops:
                if op[0] == "add":  # the noise array takes the place of p
                    if rows:
                        cuda.hook_ops_gpu(g, p, numpy.array(rows, numpy.float64))
                        rows = []
                    cuda.hook_ops_gpu(g, op[1], numpy.array([gpu_row(g.dtype, op)],
                                                            numpy.float64))
                else:
                    rows.append(gpu_row(g.dtype, op))
            if rows:
                cuda.hook_ops_gpu(g, p, numpy.array(rows, numpy.float64))
        return
    raise TypeError("cannot apply a hook to a gradient of type %s" % type(g).__name__)


def _loss_scaled(rate, param):
    scale = getattr(param, "_loss_scale", None)
    if scale is None:
        return rate
    from cynag_kernels.hooks import scalar_product

    return scalar_product(rate, scale)


class _ElementwiseHook:
    """Per-parameter hook whose effect is a program of per-element operations."""

    call_for_each_param = True
    timing = "pre"
    # The multi-tensor update may run this hook's operations in its pass.
    _foldable = True
    # It writes every gradient it is called for (the optimizer refuses a
    # read-only one before anything changes).
    _writes_grads = True

    def __call__(self, rule, param):
        p, g = param.data, param.grad
        if g is None or (self._needs_param and p is None):
            return
        _apply(g, p, self._ops(param))

    _needs_param = True

    def _ops(self, param):
        raise NotImplementedError


class WeightDecay(_ElementwiseHook):
    """Weight decay: ``g += rate * p``.

    As in Chainer, with a loss-scaled gradient (``param._loss_scale``) the
    rate is multiplied by the loss scale first.

    Args:
        rate (float): coefficient of the decay (finite, >= 0).

    Attributes:
        rate, name (``'WeightDecay'``), timing (``'pre'``),
        call_for_each_param (``True``).
    """

    name = "WeightDecay"

    def __init__(self, rate):
        self.rate = _check_real("WeightDecay", "rate", rate)

    def _ops(self, param):
        return [("weight_decay", _loss_scaled(self.rate, param))]


class Lasso(_ElementwiseHook):
    """Lasso regularization: ``g += rate * sign(p)`` (not loss-scaled, as in Chainer).

    Args:
        rate (float): coefficient (finite, >= 0).
    """

    name = "Lasso"

    def __init__(self, rate):
        self.rate = _check_real("Lasso", "rate", rate)

    def _ops(self, param):
        return [("lasso", self.rate)]


class GradientHardClipping(_ElementwiseHook):
    """Clip every gradient element into ``[lower_bound, upper_bound]``.

    NumPy's ``clip``: a NaN stays NaN.  A bound may be ``None`` (no bound on
    that side) or infinite.

    Args:
        lower_bound (float): lower bound.
        upper_bound (float): upper bound (>= lower_bound).
    """

    name = "GradientHardClipping"
    _needs_param = False

    def __init__(self, lower_bound, upper_bound):
        lower_bound = _check_real("GradientHardClipping", "lower_bound", lower_bound,
                                  minimum=None, allow_none=True, allow_inf=True)
        upper_bound = _check_real("GradientHardClipping", "upper_bound", upper_bound,
                                  minimum=None, allow_none=True, allow_inf=True)
        if lower_bound is None and upper_bound is None:
            raise ValueError("GradientHardClipping: lower_bound and upper_bound cannot both "
                             "be None")
        if lower_bound is not None and upper_bound is not None and lower_bound > upper_bound:
            raise ValueError("GradientHardClipping: lower_bound (%r) must not be greater than "
                             "upper_bound (%r)" % (lower_bound, upper_bound))
        self.lower_bound = lower_bound
        self.upper_bound = upper_bound

    def _ops(self, param):
        return [("clip", self.lower_bound, self.upper_bound)]


def exponential_decay_noise(xp, shape, dtype, hook, opt):
    """Chainer's default noise: Gaussian with ``std = sqrt(eta / (1 + t) ** 0.55)``.

    ``opt`` is the update rule (its ``t``), as Chainer passes it.
    """
    std = numpy.sqrt(hook.eta / numpy.power(1 + opt.t, 0.55))
    return xp.random.normal(0, std, shape).astype(dtype)


class GradientNoise:
    """Add noise to every gradient: ``g += noise_func(xp, shape, dtype, hook, rule)``.

    The noise is drawn in Python as in Chainer (``numpy.random`` /
    ``cupy.random`` for the default function, so seeding those reproduces
    Chainer's noise); the addition is native.

    Args:
        eta (float): noise scale of :func:`exponential_decay_noise` (finite, >= 0).
        noise_func (callable): the noise generator.
    """

    name = "GradientNoise"
    call_for_each_param = True
    timing = "pre"
    _writes_grads = True

    def __init__(self, eta, noise_func=exponential_decay_noise):
        eta = _check_real("GradientNoise", "eta", eta, any_real=True)
        if not callable(noise_func):
            raise TypeError("GradientNoise: noise_func must be callable, got %r" % (noise_func,))
        self.eta = eta
        self.noise_func = noise_func

    def __call__(self, rule, param):
        g = param.grad
        if g is None:
            return
        xp = _backend.array_module(g)
        if xp is numpy:
            noise = self.noise_func(xp, g.shape, g.dtype, self, rule)
        else:
            with _backend.device_of_array(g):
                noise = self.noise_func(xp, g.shape, g.dtype, self, rule)
        if xp is not numpy:
            noise = xp.asarray(noise)
            if noise.dtype != g.dtype or noise.shape != g.shape:
                noise = xp.broadcast_to(noise, g.shape).astype(g.dtype)
        elif not numpy.isscalar(noise):
            noise = numpy.asarray(noise)  # another dtype or shape: added as NumPy 1.x adds
        _apply(g, None, [("add", noise)])


def _sum_squares(arrays):
    """Sum of squares of arrays on any devices: one native reduction per device."""
    by_device = {}
    for a in arrays:
        by_device.setdefault(_backend.device_of(a), []).append(a)
    total = 0.0
    for device in sorted(by_device, key=str):
        group = by_device[device]
        if device == "cpu":
            from cynag_kernels import hooks

            half = [a for a in group if a.dtype == numpy.float16]
            if half:
                # Chainer's x.dot(x) of a float16 array is a float16 value
                # (inf past 65504): each array's sum is rounded to float16.
                with numpy.errstate(over="ignore"):
                    total += float(hooks.sum_squares_each(half).astype(numpy.float16)
                                   .astype(numpy.float64).sum())
                group = [a for a in group if a.dtype != numpy.float16]
            total += hooks.sum_squares(group)
        elif device is not None:
            from cynag_kernels import cuda

            with _backend.device_of_array(group[0]):
                total += cuda.sum_squares_gpu(group)
        else:
            raise TypeError("cannot take the norm of a gradient of type %s"
                            % type(group[0]).__name__)
    return total


def _norm(a):
    """``numpy.linalg.norm(a)`` as Chainer gets it (float64; a float16 array's
    norm is a float16 value, as NumPy computes it), from a float64 reduction."""
    sq = _sum_squares([a])
    if a.dtype == numpy.float16 and isinstance(a, numpy.ndarray):
        with numpy.errstate(over="ignore"):
            return numpy.float64(numpy.sqrt(numpy.float16(sq)))
    return numpy.float64(math.sqrt(sq))


class GradientClipping:
    """Scale all gradients so that their global L2 norm is at most ``threshold``.

    The norm is taken over the gradients of every initialized parameter of
    the target, in one native float64 reduction per device (on the CPU the
    sum of a float16 gradient is rounded to float16, as Chainer's
    ``x.dot(x)`` gives it); if
    ``threshold / norm < 1`` every gradient is multiplied by that rate (in
    its dtype).

    Args:
        threshold (float): the largest norm (finite, >= 0).
    """

    name = "GradientClipping"
    timing = "pre"
    call_for_each_param = False
    # It may write every gradient (when it clips): the optimizer refuses a
    # read-only one before anything changes.
    _writes_grads = True

    def __init__(self, threshold):
        self.threshold = _check_real("GradientClipping", "threshold", threshold, any_real=True)

    def _rate(self, opt):
        """The scale factor this step, or None if the gradients are left as they are."""
        grads = [p.grad for p in opt.target.params(False) if p.grad is not None]
        if not grads:
            return None
        norm = math.sqrt(_sum_squares(grads))
        with numpy.errstate(divide="ignore", invalid="ignore"):
            rate = numpy.float64(self.threshold) / numpy.float64(norm)
        if rate >= 1:
            return None
        return rate

    def __call__(self, opt):
        rate = self._rate(opt)
        if rate is None:
            return
        # (a read-only gradient was refused before any hook ran)
        for param in opt.target.params(False):
            g = param.grad
            if g is not None:
                _apply(g, None, [("scale", rate)])


class GradientLARS:
    """Layer-wise adaptive rate scaling (You et al., 2017), as in Chainer.

    For each parameter with ``||p|| > threshold``:
    ``rate = ||p|| / (eps + ||g|| + weight_decay * ||p||)``, else 1; then
    ``g += weight_decay * p; g *= rate``.  The norms are float64 native
    reductions.

    Args:
        threshold (float): norm below which the rate is 1 (finite, >= 0).
        weight_decay (float): weight decay coefficient (finite, >= 0).
        eps (float): added to the denominator (finite, >= 0).
    """

    name = "GradientLARS"
    call_for_each_param = True
    timing = "pre"
    _writes_grads = True

    def __init__(self, threshold=1e-2, weight_decay=0.0, eps=1e-9):
        self.threshold = _check_real("GradientLARS", "threshold", threshold, any_real=True)
        self.weight_decay = _check_real("GradientLARS", "weight_decay", weight_decay)
        self.eps = _check_real("GradientLARS", "eps", eps, any_real=True)

    def __call__(self, rule, param):
        p, g = param.data, param.grad
        if p is None or g is None:
            return
        p_norm = _norm(p)
        g_norm = _norm(g)
        with numpy.errstate(divide="ignore", invalid="ignore"):
            local_rate = p_norm / (numpy.float64(self.eps) + g_norm
                                   + numpy.float64(self.weight_decay) * p_norm)
        rate = local_rate if p_norm > self.threshold else numpy.float64(1.0)
        _apply(g, p, [("weight_decay", self.weight_decay), ("scale", rate)])
