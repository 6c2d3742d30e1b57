"""Nesterov's Accelerated Gradient, as ``chainer.optimizers.NesterovAG``."""
import numpy

import cynag_kernels
from cynag import _backend, functional, optimizer

_default_hyperparam = optimizer.Hyperparameter()
_default_hyperparam.lr = functional.DEFAULTS["lr"]
_default_hyperparam.momentum = functional.DEFAULTS["momentum"]


@optimizer._register_kernel_rule
class NesterovAGRule(optimizer.UpdateRule):
    r"""Update rule of Nesterov's Accelerated Gradient.

    See :class:`~cynag.optimizers.NesterovAG` for the update and the defaults.

    Args:
        parent_hyperparam (~cynag.optimizer.Hyperparameter): hyperparameter
            providing the defaults.
        lr (float): learning rate (overrides the parent's).
        momentum (float): momentum (overrides the parent's).
    """

    is_elementwise = True
    # Parameters with this rule can be updated together by the multi-tensor
    # kernels (cynag_kernels.multi_tensor, cynag_kernels.cuda.GPUTable).
    _multi_tensor_kind = "nesterov_ag"

    def __init__(self, parent_hyperparam=None, lr=None, momentum=None):
        super().__init__(parent_hyperparam or _default_hyperparam)
        if lr is not None:
            self.hyperparam.lr = lr
        if momentum is not None:
            self.hyperparam.momentum = momentum

    def init_state(self, param):
        v = (getattr(self, "_contiguous_state", None) or {}).get("v")  # cynag.contiguous
        array = param.array
        if (v is not None and type(v) is type(array) and v.shape == array.shape
                and v.dtype == array.dtype and _backend.device_of(v) == _backend.device_of(array)):
            v.fill(0)
            self.state["v"] = v
        else:
            self.state.update(functional.init_state(array))

    def _state_like(self, param):
        # v: the shape of the parameter, in its dtype (float32 for a float16
        # parameter with a float32 master copy); see UpdateRule._state_like.
        array = param.array
        if array is None or _backend.device_of(array) is None:
            return {}
        dtype = numpy.float32 if self._uses_fp32(param) else array.dtype
        return functional.state_like(array.shape, dtype)

    def _loaded_state_dtypes(self, param, key):
        # A float16 parameter's v, saved after a switch of use_fp32_update,
        # keeps its dtype when loaded (as in Chainer, which keeps what it reads).
        array = param.array
        if key == "v" and isinstance(array, numpy.ndarray) and array.dtype == numpy.float16:
            return (numpy.dtype(numpy.float16), numpy.dtype(numpy.float32))
        return ()

    def _check_param(self, param):
        """Check hyperparameters, arrays and the state ``v`` before an update."""
        lr, momentum = self.hyperparam.lr, self.hyperparam.momentum
        array, grad = param.array, param.grad
        v = None if self._state is None else self._state.get("v")
        if (type(lr) is float and type(momentum) is float and grad is not None
                and v is not None and len(self._state) == 1 and not self._use_fp32_update
                and getattr(param, "_loss_scale", None) is None and not self._hookable._count
                and cynag_kernels.nesterov_ag_dense_ok(array, grad, v)):
            return  # the common case, checked natively
        super()._check_param(param)
        optimizer._check_scalar("lr", lr)
        optimizer._check_scalar("momentum", momentum)
        if array is None:
            return
        if self._state is not None and grad is not None and v is None:
            # The state is created only when there is none; one without its
            # 'v' array would fail in the middle of the step.
            raise ValueError("the update rule's state has no 'v' array (state %s); set "
                             "rule.state['v'] or reset the state to None"
                             % ({k: type(x).__name__ for k, x in self._state.items()},))
        xp = _backend.array_module(array)
        # On the CPU, the v of a float16 parameter keeps its dtype across a
        # switch of use_fp32_update (a float16 v with the float32 master copy,
        # or a float32 one with the float16 parameter): Chainer's NumPy lines
        # update it (cynag_kernels.nesterov_ag_mixed).  Any other v of another
        # dtype is refused.
        mixed = (xp is numpy and array.dtype == numpy.float16
                 and getattr(v, "dtype", None) in (numpy.float16, numpy.float32))
        if self._uses_fp32(param):
            # v belongs to the float32 master copy, which the grad is converted for.
            master = self._fp32_param
            if master is not None and master.array is not None:
                cynag_kernels.check_nesterov_ag_arrays(master.array, None, v, xp=xp,
                                                       v_any_float=mixed)
            elif v is not None:
                cynag_kernels.check_nesterov_ag_arrays(
                    xp.empty(array.shape, numpy.float32), None, v, xp=xp, v_any_float=mixed)
        else:
            cynag_kernels.check_nesterov_ag_arrays(array, grad, v, xp=xp, v_any_float=mixed)

    def update_core_cpu(self, param):
        grad = param.grad
        if grad is None:
            return
        functional.nesterov_ag([param.array], [grad], [self.state["v"]],
                               lr=self.hyperparam.lr, momentum=self.hyperparam.momentum,
                               impl="single")

    update_core_gpu = update_core_cpu


class NesterovAG(optimizer.GradientMethod):
    r"""Nesterov's Accelerated Gradient (Sutskever et al., 2013; Bengio et al., 2012).

    For each parameter :math:`p` with gradient :math:`g` and momentum buffer
    :math:`v` (created as zeros at the first update):

    .. math::

        v &\leftarrow \mu v - \eta g \\
        p &\leftarrow p + \mu^2 v - (1 + \mu)\,\eta\, g

    with learning rate :math:`\eta` (``lr``) and momentum :math:`\mu`
    (``momentum``).

    Evaluation order, which cynag keeps so that results match Chainer bit for
    bit: on the CPU, Chainer's numpy sequence ``v *= m; v -= lr * g;
    p += m * m * v; p -= (1 + m) * lr * g``, i.e. per element
    ``v = v * m - lr * g`` then ``p = (p + mm * v) - c * g`` where
    ``mm = m * m`` and ``c = (1 + m) * lr`` are computed in double precision
    and rounded once to the array dtype (see
    :func:`cynag_kernels.nesterov_ag_coefficients`), with no fused
    multiply-add.  float16 parameters are computed in float32 and stored as
    float16.  The update is one fused native pass (Cython, OpenMP threads for
    large arrays) instead of four numpy passes.  On the GPU (CuPy arrays),
    Chainer's elementwise kernel expression ``param += m * m * v - (1 + m) *
    lr * g`` with ``lr`` and ``m`` in the array dtype, in CUDA source compiled
    by NVRTC (which contracts to fused multiply-adds: agreement with the CPU
    is to rounding).

    Args:
        lr (float): learning rate.
        momentum (float): momentum (exponential decay rate of ``v``).

    Example:
        >>> import numpy as np, cynag
        >>> link = cynag.Link()
        >>> with link.init_scope():
        ...     link.W = cynag.Parameter(np.ones(3, np.float32))
        >>> opt = cynag.optimizers.NesterovAG(lr=0.1, momentum=0.9).setup(link)
        >>> link.W.grad = np.ones(3, np.float32)
        >>> opt.update()
        >>> link.W.array
        array([0.72900003, 0.72900003, 0.72900003], dtype=float32)
    """

    def __init__(self, lr=_default_hyperparam.lr, momentum=_default_hyperparam.momentum):
        super().__init__()
        self.hyperparam.lr = lr
        self.hyperparam.momentum = momentum

    lr = optimizer.HyperparameterProxy("lr")
    momentum = optimizer.HyperparameterProxy("momentum")

    def create_update_rule(self):
        return NesterovAGRule(self.hyperparam)
