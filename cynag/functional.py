"""NesterovAG on arrays: one signature, three implementations.

What is NesterovAG's lives here and nowhere else in :mod:`cynag`: its state
(one array ``v`` per parameter, zeros at the first update), its
hyperparameters (``lr``, ``momentum``) and the step over lists of arrays.
The optimizer (:mod:`cynag.optimizers.nesterov_ag`, its multi-tensor step
in :mod:`cynag._multi_tensor`) and any other front end call these functions;
the native kernels in :mod:`cynag_kernels` take arrays and scalars only.

:func:`nesterov_ag` has the shape of PyTorch's ``torch.optim.sgd.sgd()``
over ``_single_tensor_sgd`` / ``_multi_tensor_sgd``::

    nesterov_ag(params, grads, vs, lr=0.01, momentum=0.9, impl="multi")

* ``impl="single"`` -- one kernel call per tensor, any strides, any scalar
  type for ``lr``/``momentum`` (NumPy 1.x's promotion, as Chainer's numpy
  sequence computes);
* ``impl="multi"`` -- one native call per (device, dtype): the tensors must
  be dense and disjoint and the hyperparameters Python floats;
* ``impl="contiguous"`` -- ``params``, ``grads`` and ``vs`` are one flat
  buffer each (see :mod:`cynag.contiguous`): one pass over memory.

The coefficients (``m * m`` and ``(1 + m) * lr`` evaluated in double
precision and rounded once to the compute type, as Chainer's sequence rounds
them) are computed by one C function, ``cynag_nag_coefficients`` in
``cynag_kernels/_nag_coef.h``, which every CPU path shares;
:func:`coefficients` gives them to Python callers.  On the CPU every
implementation gives bit-identical results.
"""
import numpy

import cynag_kernels
from cynag import _backend
from cynag_kernels.multi_tensor import _per_tensor

#: Hyperparameters of NesterovAG, with Chainer's defaults.
DEFAULTS = {"lr": 0.01, "momentum": 0.9}

#: The entries of a parameter's state.
STATE_KEYS = ("v",)

IMPLEMENTATIONS = ("single", "multi", "contiguous")


def init_state(array, dtype=None):
    """The state of a parameter holding ``array``: ``{'v': zeros}`` on its device.

    ``dtype``: the state's dtype (default: the array's; float32 for a float16
    parameter updated through a float32 master copy).
    """
    if dtype is None or numpy.dtype(dtype) == array.dtype:
        return {"v": _backend.zeros_like(array)}
    xp = _backend.array_module(array)
    return {"v": xp.zeros(array.shape, dtype)}


def state_like(shape, dtype):
    """``{'v': stand-in}``: what :func:`init_state` makes, as arrays holding no memory."""
    return {"v": numpy.broadcast_to(numpy.empty((), dtype), shape)}


def coefficients(dtype, lr, momentum, device="cpu"):
    """The scalar coefficients of one step (see :func:`cynag_kernels.nesterov_ag_coefficients`)."""
    return cynag_kernels.nesterov_ag_coefficients(lr, momentum, dtype, device=device)


def nesterov_ag(params, grads, vs, *, lr=DEFAULTS["lr"], momentum=DEFAULTS["momentum"],
                loss_scale=None, ops=None, impl="multi", num_threads=None):
    """One NesterovAG step over lists of arrays, in place.

    For each tensor: ``grad /= loss_scale`` (if given, in the gradient's
    dtype, in place), then ``v = v * momentum - lr * grad`` and ``param =
    (param + mm * v) - c * grad``.  Every entry is checked before any array
    changes: bad input raises, naming the entry's index, and changes nothing.

    Args:
        params, grads, vs: sequences of NumPy or CuPy arrays (one entry per
            tensor; ``vs`` as :func:`init_state` makes them).  With
            ``impl="contiguous"``, one flat buffer each (or one-element
            sequences of them).
        lr, momentum: scalars, or sequences with one value per tensor.
        loss_scale: ``None``, a scalar or a sequence (``None`` entries: no
            scaling).  ``"multi"`` refuses a float16 gradient's loss scale of
            65000 or more (NumPy 1.x divides by it in float32; ``"single"``
            does so).
        ops: ``(n_ops, 4)`` hook operation program applied to every gradient
            before the loss scale and the update, in the same pass (rows of
            :func:`cynag_kernels.hooks.op_row` for the arrays' one dtype,
            without ``"add"``; ``"multi"`` and ``"contiguous"`` on the CPU
            only).  It writes the gradients, which must be writeable.
        impl: ``"single"``, ``"multi"`` or ``"contiguous"`` (see the module
            documentation).
        num_threads: OpenMP threads (``None``: the thread settings of
            :mod:`cynag_kernels.threads`).
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError("impl must be one of %s, got %r" % (IMPLEMENTATIONS, impl))
    if impl == "contiguous":
        params, grads, vs = (_one_buffer(x, name) for x, name in
                             ((params, "params"), (grads, "grads"), (vs, "vs")))
        impl = "multi"
    params, grads, vs = list(params), list(grads), list(vs)
    n = len(params)
    if len(grads) != n or len(vs) != n:
        raise ValueError("params, grads and vs must have the same length")
    lrs = _per_tensor(lr, n, "lr")
    ms = _per_tensor(momentum, n, "momentum")
    scales = None if loss_scale is None else _per_tensor(loss_scale, n, "loss_scale")
    for values, name in ((lrs, "lr"), (ms, "momentum")):
        for x in values:
            if type(x) is not float:  # (the common case, a Python float, is fine)
                cynag_kernels.check_real_scalar(name, x)
    if scales is not None:
        for x in scales:
            if x is not None and type(x) is not float:
                cynag_kernels.check_real_scalar("loss_scale", x)
    if impl == "single":
        if ops is not None:
            raise ValueError("impl='single' takes no ops (apply the hooks first)")
        if n > 1 or scales is not None:
            # Every entry is checked before any is changed (a lone entry
            # without a loss scale is checked by its update, before writing).
            for i in range(n):
                _check_single(i, params[i], grads[i], vs[i])
        for i in range(n):
            if scales is not None and scales[i] is not None:
                _divide(grads[i], scales[i])
            _single(params[i], grads[i], vs[i], lrs[i], ms[i], num_threads)
        return
    groups = {}
    for i, p in enumerate(params):
        groups.setdefault((_backend.device_of(p), getattr(p, "dtype", None)), []).append(i)
    if ops is not None:
        ops = _check_ops(ops)
        if len(groups) > 1:
            raise ValueError("ops are rows for one dtype (cynag_kernels.hooks.op_row): give "
                             "arrays of one dtype and device, or call once per dtype")
    tables = []
    for (device, _), idx in groups.items():
        args = ([params[i] for i in idx], [grads[i] for i in idx], [vs[i] for i in idx],
                [lrs[i] for i in idx], [ms[i] for i in idx],
                None if scales is None else [scales[i] for i in idx])
        if device == "cpu":
            from cynag_kernels.multi_tensor import CPUTable

            table = CPUTable(*args, strict=False)
            if table.excluded:
                raise ValueError(
                    "nesterov_ag: entry %d cannot be updated by the multi-tensor kernel "
                    "(arrays not dense, of another dtype than %s, overlapping another "
                    "entry, coefficients beyond the compute type, or a read-only gradient "
                    "to divide by a loss scale); impl='single' takes any layout"
                    % (idx[table.excluded[0]], table.dtype))
            if ops is not None:
                for i in idx:
                    if not grads[i].flags.writeable:
                        raise ValueError("nesterov_ag: entry %d: the gradient is read-only "
                                         "but ops write it" % i)
        elif device is not None:
            if ops is not None:
                raise ValueError("ops are taken on the CPU only")
            from cynag_kernels.cuda import GPUTable

            table = GPUTable(*args)
        else:
            raise TypeError("nesterov_ag takes NumPy or CuPy arrays, got %s"
                            % type(params[idx[0]]).__name__)
        tables.append((device, table))
    # (every group built and checked before any runs)
    for device, table in tables:
        if device == "cpu":
            nesterov_ag_table(table, ops=ops, num_threads=num_threads)
        else:
            nesterov_ag_table(table)


def _check_single(i, param, grad, v):
    """Raise, naming entry ``i``, what ``impl='single'`` would refuse for it."""
    if grad is None or v is None:
        raise TypeError("nesterov_ag: entry %d has no %s" % (i, "grad" if grad is None
                                                               else "v"))
    if isinstance(param, numpy.ndarray):
        mixed = isinstance(v, numpy.ndarray) and v.dtype != getattr(param, "dtype", None)
        try:
            cynag_kernels.check_nesterov_ag_arrays(param, grad, v, v_any_float=mixed)
        except (TypeError, ValueError) as e:
            raise type(e)("nesterov_ag: entry %d: %s" % (i, e)) from e


def _check_ops(ops):
    """``ops`` as a ``(k, 4)`` float64 program of the kernel's operations, or raise."""
    from cynag_kernels.hooks import OP_CODES, OP_WORDS

    table = numpy.asarray(ops, numpy.float64)
    if table.ndim != 2 or table.shape[1] != OP_WORDS:
        raise ValueError("ops must be a (n_ops, %d) program of op_row rows, got shape %s"
                         % (OP_WORDS, table.shape))
    fused = {float(c) for name, c in OP_CODES.items() if name != "add"}
    for code in table[:, 0].tolist():
        if code not in fused:
            raise ValueError("ops: operation code %r is not one the update pass runs (%s; "
                             "add noise to the gradients first)"
                             % (code, ", ".join(sorted(k for k in OP_CODES if k != "add"))))
    return numpy.ascontiguousarray(table)


def nesterov_ag_table(table, ops=None, num_threads=None):
    """Run one step over a prepared multi-tensor table (a ``CPUTable`` or ``GPUTable``).

    The optimizer's step builds its tables from the rows its native scan
    checked (:meth:`cynag_kernels.multi_tensor.CPUTable.from_rows`) and
    runs them here.
    """
    if ops is None and num_threads is None:
        table.run()
    elif num_threads is None:
        table.run(ops=ops)
    else:
        table.run(num_threads=num_threads, ops=ops)


def nesterov_ag_rows(table, lo, hi, type_num, scratch, ops=None, num_threads=None):
    """One step over the ``FAST`` rows ``[lo, hi)`` of dtype ``type_num`` of a step table.

    ``table``: the rows the optimizer's native scan filled and checked
    (:class:`cynag._step.StepTable`); nothing is copied.  Returns the number
    of elements updated.
    """
    from cynag._step import FAST
    from cynag_kernels.multi_tensor import run_selected_rows

    return run_selected_rows(table.ptrs, table.sizes, table.coef, table.codes, FAST,
                             table.type_nums, type_num, lo, hi, scratch,
                             num_threads=num_threads, ops=ops)


def nesterov_ag_addresses(ptrs, sizes, dtype, *, lr, momentum, index=None, ops=None,
                          num_threads=None, keep_grads=False):
    """One step over arrays given by their addresses (CPU): the front ends' entry.

    For arrays that are not NumPy arrays (e.g. PyTorch tensors) the caller
    reads the addresses itself and keeps the arrays alive during the call.
    A front end that reads its tensors in C or C++ calls the same
    coefficient rule and table runner through the capsule
    ``cynag_kernels._nesterov_cpu.kernel_api()`` (cynag.torch's reader).

    Args:
        ptrs: ``(n, 3)`` int64 array: the addresses of each tensor's param,
            grad and ``v`` -- dense, of ``dtype``, each tensor's three
            pairwise disjoint and disjoint from every other tensor's, param
            and ``v`` writeable (and grad, if ``ops`` write it).
        sizes: ``(n,)`` int64 array: elements of each tensor.
        dtype: float16, float32 or float64.
        lr, momentum: Python floats (one step's hyperparameters, shared by
            the tensors); with ``index``, sequences of them, one entry per
            set of hyperparameters (e.g. per param group).
        index: ``None``, or ``(n,)`` integers: tensor ``i`` takes
            ``lr[index[i]]`` and ``momentum[index[i]]``.
        ops: a hook operation program applied to every gradient first, as
            for :func:`nesterov_ag` (it writes the gradients, unless
            ``keep_grads``).
        keep_grads: if true, ``ops`` act on copies of the gradients (in
            registers for a lone weight decay, else block by block, in the
            same pass): the update uses the same values and the gradients
            are only read (PyTorch's weight decay leaves ``p.grad`` as it is).

    Returns:
        True if the step ran; False (nothing changed) if a coefficient does
        not fit ``dtype`` (NumPy 1.x would then compute in float64; the
        caller uses :func:`nesterov_ag` with ``impl="single"``), for any
        entry when ``index`` is given.
    """
    from cynag_kernels.multi_tensor import coefficient_table, run_addresses

    dtype = numpy.dtype(dtype)
    if dtype not in cynag_kernels.SUPPORTED_DTYPES:
        raise TypeError("nesterov_ag_addresses updates float16, float32 and float64 arrays, "
                        "got %s" % dtype)
    ptrs = numpy.ascontiguousarray(ptrs, numpy.int64).reshape(-1, 3)
    sizes = numpy.ascontiguousarray(sizes, numpy.int64)
    n = len(sizes)
    if ptrs.shape[0] != n:
        raise ValueError("ptrs and sizes must have the same length")
    if n == 0:
        return True
    if sizes.min() < 0:
        raise ValueError("sizes must not be negative")
    if ops is not None:
        ops = _check_ops(ops)
    if index is None:
        coef, ok = coefficient_table(dtype, [lr], [momentum])
        if not ok[0]:
            return False
        coef = coef[0]
    else:
        index = numpy.asarray(index, numpy.intp)
        if index.shape != (n,):
            raise ValueError("index must have one entry per tensor")
        n_sets = len(lr)
        if len(momentum) != n_sets:
            raise ValueError("lr and momentum must have one entry per set")
        if index.min() < 0 or index.max() >= n_sets:
            raise ValueError("index must take values in [0, %d)" % n_sets)
        coef, ok = coefficient_table(dtype, list(lr), list(momentum))
        if not ok.all():
            return False
        coef = coef[0] if len(coef) == 1 else coef[index]
    run_addresses(ptrs, sizes, coef, dtype.num, num_threads=num_threads, ops=ops,
                  keep_grads=keep_grads)
    return True


def _one_buffer(x, name):
    if isinstance(x, (list, tuple)):
        if len(x) != 1:
            raise ValueError("impl='contiguous' takes one buffer for %s, got %d" % (name, len(x)))
        x = x[0]
    if getattr(x, "ndim", None) != 1:
        raise ValueError("impl='contiguous' takes 1-d buffers; %s is not one" % name)
    return [x]


def _divide(grad, scale):
    """``grad /= scale`` in place, with NumPy 1.x's promotion (as Chainer divides)."""
    if grad.ndim == 0 and isinstance(grad, numpy.ndarray):
        grad[()] = numpy.float64(grad[()]) / numpy.float64(scale)
    elif isinstance(grad, numpy.ndarray):
        # The scale meets the array by value (a float16 gradient divided by
        # 65536 is computed in float32, not by an infinite float16 divisor).
        t = cynag_kernels.nesterov.np1_result_dtype(scale, grad.dtype)
        numpy.divide(grad, t.type(scale), out=grad, casting="same_kind")
    else:
        grad /= float(scale)


def _single(param, grad, v, lr, momentum, num_threads=None):
    """One tensor, any strides and scalar types (Chainer's per-parameter arithmetic)."""
    if isinstance(param, numpy.ndarray):
        if isinstance(v, numpy.ndarray) and v.dtype != param.dtype:
            # A state kept across a switch of use_fp32_update (Chainer's sequence).
            cynag_kernels.nesterov_ag_mixed(param, grad, v, lr, momentum)
            return
        cynag_kernels.nesterov_ag_cpu(param, grad, v, lr, momentum, num_threads=num_threads)
    else:
        from cynag_kernels import cuda

        cuda.nesterov_ag_gpu(param, grad, v, lr, momentum)
