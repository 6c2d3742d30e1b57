"""Gradient operations of the optimizer hooks on the CPU: arrays and scalars only.

Each operation is the arithmetic Chainer 7.8.1's hook runs with NumPy 1.x,
done natively (``_hook_ops.h`` through ``_nesterov_cpu``) with the same
rounding, so that float32 and float64 results are bit-identical:

* ``('weight_decay', a)``: ``g += a * p``;
* ``('lasso', a)``: ``g += a * sign(p)``;
* ``('clip', lower, upper)``: ``numpy.clip(g, lower, upper, out=g)`` (a bound
  may be ``None``);
* ``('scale', a)``: ``g *= a``;
* ``('add', x)``: ``g += x`` for an array ``x`` (the noise of GradientNoise).

NumPy 1.x rounds a scalar coefficient to the array's dtype when its value
fits (:func:`op_row`); where it does not, and for 0-d arrays (which NumPy
1.x promotes like scalars), the operation is done here with NumPy in the
promoted type, exactly as NumPy 1.x would.  :func:`sum_squares` is the
reduction of GradientClipping and GradientLARS: one native call over many
arrays, accumulated in float64.
"""
import numpy

from cynag_kernels import _nesterov_cpu
from cynag_kernels.nesterov import _strong_scalar, np1_result_dtype
from cynag_kernels.threads import threads_for

#: Operation codes (see _hook_ops.h).
OP_CODES = {"weight_decay": 1, "lasso": 2, "clip": 3, "scale": 4, "add": 5}
OP_WORDS = 4

_TYPE_NUMS = {numpy.dtype(numpy.float16): 23, numpy.dtype(numpy.float32): 11,
              numpy.dtype(numpy.float64): 12}


def scalar_product(a, b):
    """``a * b`` of two scalars as NumPy 1.x computes it (Python floats as float64)."""
    return _strong_scalar(a) * _strong_scalar(b)


def op_row(dtype, op):
    """The 4-word row of ``op`` for arrays of ``dtype`` (at least 1-d), or None if
    NumPy 1.x would compute the operation in a wider type (see
    :func:`cynag_kernels.nesterov.np1_result_dtype`)."""
    dtype = numpy.dtype(dtype)
    kind = op[0]
    code = OP_CODES[kind]
    if kind == "clip":
        lo, hi = op[1], op[2]
        for bound in (lo, hi):
            if bound is not None and np1_result_dtype(bound, dtype) != dtype:
                return None
        flags = (lo is not None) | ((hi is not None) << 1)
        with numpy.errstate(over="ignore", invalid="ignore"):
            a = 0.0 if lo is None else float(dtype.type(_strong_scalar(lo)))
            b = 0.0 if hi is None else float(dtype.type(_strong_scalar(hi)))
        return (float(code), a, b, float(flags))
    if kind == "add":
        return (float(code), 0.0, 0.0, 0.0)
    if np1_result_dtype(op[1], dtype) != dtype:
        return None
    with numpy.errstate(over="ignore", invalid="ignore"):
        a = dtype.type(_strong_scalar(op[1]))
    return (float(code), float(a), 0.0, 0.0)


def gpu_row(dtype, op):
    """The row of ``op`` for a CuPy array of ``dtype``: CuPy casts a scalar to the
    array dtype (an ``'add'`` row takes its array as the kernel's ``p``)."""
    dtype = numpy.dtype(dtype)
    kind = op[0]
    code = OP_CODES[kind]
    with numpy.errstate(over="ignore", invalid="ignore"):
        if kind == "clip":
            lo, hi = op[1], op[2]
            flags = (lo is not None) | ((hi is not None) << 1)
            a = 0.0 if lo is None else float(dtype.type(_strong_scalar(lo)))
            b = 0.0 if hi is None else float(dtype.type(_strong_scalar(hi)))
            return (float(code), a, b, float(flags))
        if kind == "add":
            return (float(code), 0.0, 0.0, 0.0)
        return (float(code), float(dtype.type(_strong_scalar(op[1]))), 0.0, 0.0)


def _wide_type(g, p, op):
    """The type NumPy 1.x computes ``op`` on ``g`` (and ``p``) in."""
    dtype = g.dtype
    kind = op[0]
    if kind == "add":
        x = op[1]
        if isinstance(x, numpy.ndarray) and x.ndim > 0:
            return numpy.promote_types(dtype, x.dtype)
        scalars = [x]
    elif kind == "clip":
        scalars = [b for b in op[1:3] if b is not None]
    else:
        scalars = [op[1]]
    if kind in ("weight_decay", "lasso") and p is not None and p.ndim > 0:
        # ``a * p`` is an array operation, then ``g += (a * p)``.
        t = p.dtype
        for x in scalars:
            t = np1_result_dtype(x, t)
        return numpy.promote_types(dtype, t)
    if g.ndim == 0 and (p is None or p.ndim == 0):
        # NumPy 1.x promotes 0-d arrays and scalars by their types.
        t = dtype if p is None else numpy.promote_types(dtype, p.dtype)
        for x in scalars:
            t = numpy.promote_types(t, numpy.asarray(_strong_scalar(x)).dtype)
        return t
    t = dtype
    for x in scalars:
        t = np1_result_dtype(x, t)
    return t


def _numpy_op(g, p, op, w):
    """``op`` on ``g`` computed in the type ``w`` with NumPy, stored into ``g``."""
    kind = op[0]
    gw = g.astype(w)
    if kind in ("weight_decay", "lasso"):
        # a * p (or a * sign(p)) in its own promoted type, then the sum in w.
        pp = numpy.sign(p) if kind == "lasso" else p
        if pp.ndim > 0:
            t = np1_result_dtype(op[1], pp.dtype)
        else:
            t = numpy.promote_types(pp.dtype, numpy.asarray(_strong_scalar(op[1])).dtype)
        prod = t.type(_strong_scalar(op[1])) * pp.astype(t)
        gw = gw + numpy.asarray(prod).astype(w)
    elif kind == "scale":
        gw = gw * w.type(_strong_scalar(op[1]))
    elif kind == "add":
        gw = gw + numpy.asarray(op[1]).astype(w)
    else:  # clip: either the value or a bound, with NumPy 1.x's max and min
        lo, hi = op[1], op[2]
        half = w == numpy.float16
        with numpy.errstate(invalid="ignore"):
            if lo is not None:
                b = w.type(_strong_scalar(lo))
                keep = numpy.isnan(gw) | ((gw >= b) if half else (gw > b))
                gw = numpy.where(keep, gw, b).astype(w)
            if hi is not None:
                b = w.type(_strong_scalar(hi))
                keep = numpy.isnan(gw) | ((gw <= b) if half else (gw < b))
                gw = numpy.where(keep, gw, b).astype(w)
    g[...] = numpy.broadcast_to(gw, g.shape).astype(g.dtype)


def apply_ops(g, p, ops):
    """Apply a program of hook operations to the gradient ``g`` in place.

    Args:
        g: NumPy array (float16/32/64), any strides; updated in place.
        p: the parameter array (same shape), or None if no operation needs
            it.
        ops: sequence of operations (see module docstring), applied in order.

    Contiguous arrays of one dtype are processed natively in one pass over
    memory; other layouts through contiguous copies written back.  Where
    NumPy 1.x would compute in a wider type (0-d arrays, a parameter or
    noise of another dtype, coefficients beyond the dtype's value-based
    range) the operation is done with NumPy in that type.
    """
    dtype = g.dtype
    type_num = _TYPE_NUMS.get(dtype)
    if type_num is None:
        raise TypeError("hook operations need a float16, float32 or float64 gradient, got %s"
                        % dtype)
    if not g.flags.writeable:
        raise ValueError("the gradient is read-only (its array is not writeable)")
    native = []

    def flush():
        if native:
            _run_native(g, p, native, type_num)
            del native[:]

    for op in ops:
        row = None
        if op[0] == "add":
            x = op[1]
            if isinstance(x, numpy.ndarray) and x.ndim > 0:
                try:
                    shape = numpy.broadcast_shapes(x.shape, g.shape)
                except ValueError:
                    shape = None
                if shape != g.shape:
                    raise ValueError("the noise has shape %s, which does not broadcast to the "
                                     "gradient's shape %s" % (x.shape, g.shape))
            if isinstance(x, numpy.ndarray) and x.dtype == dtype and x.shape == g.shape:
                flush()
                _run_native(g, x, [(float(OP_CODES["add"]), 0.0, 0.0, 0.0)], type_num)
                continue
        elif g.ndim > 0 and (p is None or op[0] in ("clip", "scale")
                             or (p.dtype == dtype and p.shape == g.shape)):
            row = op_row(dtype, op)
        elif g.ndim == 0 and op[0] == "clip" and all(
                b is None or numpy.asarray(_strong_scalar(b)).dtype == dtype for b in op[1:3]):
            row = op_row(dtype, op)
        if row is None:
            flush()
            _numpy_op(g, p, op, _wide_type(g, p, op))
        else:
            native.append(row)
    flush()


def _run_native(g, p, rows, type_num):
    table = numpy.asarray(rows, numpy.float64).reshape(-1, OP_WORDS)
    gc = g if g.flags.c_contiguous and g.flags.writeable else numpy.ascontiguousarray(g)
    pc = None if p is None else numpy.ascontiguousarray(p)
    if g.dtype == numpy.float16:
        gv, pv = gc.reshape(-1).view(numpy.uint16), None if pc is None else \
            pc.reshape(-1).view(numpy.uint16)
    else:
        gv, pv = gc.reshape(-1), None if pc is None else pc.reshape(-1)
    if pv is not None and numpy.may_share_memory(gv, pv) and gv.size:
        pv = pv.copy()  # g += a * p with p aliasing g: NumPy reads p first too
    _nesterov_cpu.hook_ops(gv, pv, table, type_num)
    if gc is not g:
        g[...] = gc


def _contiguous_1d(a):
    a = numpy.ascontiguousarray(a).reshape(-1)
    return a.view(numpy.uint16) if a.dtype == numpy.float16 else a


def sum_squares_each(arrays, num_threads=None):
    """Per-array sums of squares (float64) of NumPy arrays of one dtype: one native call.

    Each element is squared and accumulated in float64 (squares of float16
    and float32 values are exact in float64), in four interleaved partial
    sums per work item; the work items (chunks of the concatenated arrays,
    balanced over the threads) are combined in a fixed order, so the result
    depends only on the thread count.
    """
    arrays = list(arrays)
    n = len(arrays)
    out = numpy.zeros(n, numpy.float64)
    if not n:
        return out
    dtype = arrays[0].dtype
    type_num = _TYPE_NUMS.get(dtype)
    if type_num is None or any(a.dtype != dtype for a in arrays):
        raise TypeError("sum_squares: arrays of one float dtype are needed")
    flat = [_contiguous_1d(a) for a in arrays]
    sizes = numpy.fromiter((a.size for a in flat), numpy.int64, n)
    ptrs = numpy.fromiter((a.ctypes.data for a in flat), numpy.int64, n)
    cum = numpy.zeros(n + 1, numpy.int64)
    numpy.cumsum(sizes, out=cum[1:])
    total = int(cum[-1])
    k = threads_for(total) if num_threads is None else max(1, int(num_threads))
    items = 1 if k <= 1 else 2 * k
    items = max(1, min(items, total))
    bounds = (numpy.arange(items + 1, dtype=numpy.int64) * total) // items
    first = numpy.searchsorted(cum, bounds[:-1], side="right") - 1
    _nesterov_cpu.sum_squares_multi(ptrs, cum, bounds, numpy.ascontiguousarray(first),
                                    type_num, k, out)
    del flat  # kept alive until here
    return out


def sum_squares(arrays, num_threads=None):
    """Total sum of squares (float64) of NumPy arrays of any float dtypes."""
    by_dtype = {}
    for a in arrays:
        by_dtype.setdefault(a.dtype, []).append(a)
    total = 0.0
    for dtype in sorted(by_dtype, key=str):
        total += float(sum_squares_each(by_dtype[dtype], num_threads).sum())
    return total
