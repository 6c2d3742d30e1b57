"""NesterovAG update: scalar coefficients, argument checks and the CPU launcher.

Everything here takes arrays and scalars; it knows nothing of parameters,
update rules or hooks.
"""

import numpy

from cynag_kernels import _nesterov_cpu
from cynag_kernels.threads import threads_for

#: Array dtypes the kernels update.
SUPPORTED_DTYPES = (numpy.dtype(numpy.float16), numpy.dtype(numpy.float32),
                    numpy.dtype(numpy.float64))

_ARRAY_NAMES = ("param", "grad", "v")


def compute_dtype(dtype):
    """dtype in which the kernels compute for arrays of ``dtype`` (float16 -> float32)."""
    dtype = numpy.dtype(dtype)
    return numpy.dtype(numpy.float32) if dtype == numpy.float16 else dtype


def _strong_scalar(x):
    """``x`` as a NumPy scalar, typed the way NumPy 1.x types a Python scalar.

    Chainer 7.8.1 runs on NumPy 1.x, where arithmetic among scalars promotes
    a Python ``int`` as int64 and a Python ``float`` as float64 (NumPy 2's
    NEP 50 would let them adopt the other operand's type).  Converting first
    makes the arithmetic below give NumPy 1.x's result under either version.
    """
    if isinstance(x, int):  # bool included: Chainer's arithmetic treats True as 1
        return numpy.int64(x)
    if isinstance(x, float):
        return numpy.float64(x)
    if isinstance(x, numpy.ndarray) and x.ndim == 0:
        return x[()]
    return x


def np1_scalar_dtype(x):
    """The smallest dtype NumPy 1.x's value-based casting gives the scalar ``x``.

    As ``numpy.min_scalar_type`` in NumPy 1.x: a float whose magnitude is
    below 65000 (or an infinity or NaN) is float16, below 3.4e38 float32,
    else float64; an integer the smallest (unsigned if non-negative) integer
    type holding it; a boolean bool.
    """
    x = _strong_scalar(x)
    kind = numpy.asarray(x).dtype.kind
    if kind == "b":
        return numpy.dtype(numpy.bool_)
    if kind in "iu":
        v = int(x)
        types = ((numpy.uint8, numpy.uint16, numpy.uint32, numpy.uint64) if v >= 0
                 else (numpy.int8, numpy.int16, numpy.int32, numpy.int64))
        for t in types:
            info = numpy.iinfo(t)
            if info.min <= v <= info.max:
                return numpy.dtype(t)
        return numpy.dtype(numpy.float64)
    if kind == "f":
        v = float(x)
        if not numpy.isfinite(v) or -65000.0 < v < 65000.0:
            return numpy.dtype(numpy.float16)
        if -3.4e38 < v < 3.4e38:
            return numpy.dtype(numpy.float32)
        return numpy.dtype(numpy.float64)
    return numpy.asarray(x).dtype


def np1_result_dtype(x, dtype):
    """dtype of ``x * array`` (or ``array + x``, ...) for an array of ``dtype``
    of at least one dimension, under NumPy 1.x's value-based casting."""
    return numpy.promote_types(np1_scalar_dtype(x), numpy.dtype(dtype))


def _round_value_based(x, t):
    """``t(x)``, or float64 where NumPy 1.x's value-based casting keeps float64.

    NumPy 1.x rounds a scalar to the array's float type only if its value
    is small enough (see :func:`np1_scalar_dtype`); a larger one
    (``lr=1e39`` or the integer ``lr=65536`` against float32) makes the
    operation run in float64.  Such a coefficient is returned as
    ``numpy.float64`` and the launcher takes the NumPy path for it.
    """
    if t is not numpy.float64 and np1_result_dtype(x, t) == numpy.float64:
        return numpy.float64(x)
    with numpy.errstate(over="ignore"):
        return t(x)


def nesterov_ag_coefficients(lr, momentum, dtype, device="cpu"):
    """Scalar coefficients of one NesterovAG step, rounded as Chainer rounds them.

    Args:
        lr, momentum: the hyperparameters (Python or NumPy scalars).
        dtype: dtype of the parameter array.
        device: ``'cpu'`` or ``'gpu'``.

    Returns:
        For ``'cpu'``, ``(lr, momentum, mm, c)`` as scalars of the compute
        dtype, where ``mm = momentum * momentum`` and
        ``c = (1 + momentum) * lr`` are first evaluated on the scalars as
        NumPy 1.x evaluates them (double precision for Python floats; see
        :func:`_strong_scalar`) and then rounded once, exactly as Chainer's
        numpy sequence ``v *= m; v -= lr * g; p += m * m * v;
        p -= (1 + m) * lr * g`` rounds them when it meets a float32 or
        float64 array.  For ``'gpu'``, ``(lr, momentum)`` rounded to the array
        dtype, as Chainer's elementwise kernel receives them, and held in the
        kernel's scalar type (float32 for float16 arrays); the kernel forms
        the products on the device.

    float16 arrays compute in float32, so their coefficients are float32.
    """
    cdtype = compute_dtype(dtype)
    t = cdtype.type
    lr_s, m_s = _strong_scalar(lr), _strong_scalar(momentum)
    if device == "cpu":
        mm = m_s * m_s
        c = (numpy.int64(1) + m_s) * lr_s
        return tuple(_round_value_based(x, t) for x in (lr_s, m_s, mm, c))
    if device == "gpu":
        # Chainer's kernel takes lr and momentum in the array dtype.
        stored = numpy.dtype(dtype).type
        with numpy.errstate(over="ignore"):
            return t(stored(lr_s)), t(stored(m_s))
    raise ValueError("device must be 'cpu' or 'gpu', got %r" % (device,))


def _bits(dtype):
    return numpy.dtype(dtype).itemsize * 8


def _promoted_codes_0d(dtype, lr_s, m_s, mm, c):
    """Result type (in bits) of each of Chainer's operations on a 0-d array.

    NumPy 1.x treats a 0-d array as a scalar, so ``v * m`` runs in
    ``result_type(v, m)`` (float64 for a float32 array and a Python float),
    and so on for the other products and differences.
    """
    rt = numpy.result_type  # on dtypes: NumPy 1.x applies value-based rules to values
    lr_s, m_s, mm, c = (numpy.asarray(x).dtype for x in (lr_s, m_s, mm, c))
    lrg = rt(lr_s, dtype)
    mmv = rt(mm, dtype)
    cg = rt(c, dtype)
    return (_bits(rt(dtype, m_s)), _bits(lrg), _bits(rt(dtype, lrg)), _bits(mmv),
            _bits(rt(dtype, mmv)), _bits(cg), _bits(rt(dtype, cg)))


def _promoted_codes_wide(dtype, coefficients):
    """Result types when some coefficient is float64 by value-based casting."""
    base = _bits(compute_dtype(dtype))
    lr_b, m_b, mm_b, c_b = (64 if type(k) is numpy.float64 else base for k in coefficients)
    return (m_b, lr_b, max(base, lr_b), mm_b, max(base, mm_b), c_b, max(base, c_b))


def _nesterov_ag_promoted(param, grad, v, scalars, codes):
    """Run the native per-operation-rounding step on (contiguous copies of) the arrays."""
    if param.dtype == numpy.float16:
        param, grad, v = (a.view(numpy.uint16) for a in (param, grad, v))
    pc, gc, vc = (numpy.ascontiguousarray(a).reshape(-1) for a in (param, grad, v))
    _nesterov_cpu.nesterov_ag_promoted(pc, gc, vc, *(float(k) for k in scalars), *codes)
    if not numpy.shares_memory(pc, param):
        param[...] = pc.reshape(param.shape)
    if not numpy.shares_memory(vc, v):
        v[...] = vc.reshape(v.shape)


def _array_kind(a):
    return "%s.%s" % (type(a).__module__.split(".")[0], type(a).__name__)


def check_nesterov_ag_arrays(param, grad, v, xp=numpy, v_any_float=False):
    """Raise TypeError/ValueError if the arrays cannot be updated together.

    Checks: arrays of module ``xp`` (NumPy by default), a supported floating
    dtype in native byte order shared by all of them, equal shapes, ``param``
    and ``v`` writeable, and no two of them overlapping in memory.  ``grad``
    or ``v`` may be ``None`` (not created yet): only the others are checked.
    With ``v_any_float`` (NumPy only), ``v`` may have another supported
    dtype than ``param`` (see :func:`nesterov_ag_mixed`).  Messages name the
    array (``param``, ``grad`` or ``v``).  Nothing is modified.
    """
    named = [(name, a) for name, a in zip(_ARRAY_NAMES, (param, grad, v))
             if a is not None or name == "param"]
    for name, a in named:
        if not isinstance(a, xp.ndarray):
            raise TypeError(
                "%s must be a %s.ndarray, got %s (param, grad and state must live on "
                "the same device)" % (name, xp.__name__, _array_kind(a)))
    if param.dtype not in SUPPORTED_DTYPES or not param.dtype.isnative:
        raise TypeError(
            "param has dtype %s; NesterovAG updates float16, float32 and float64 "
            "arrays in native byte order"
            % (param.dtype if param.dtype.isnative else param.dtype.str,))
    for name, a in named[1:]:
        if (a.dtype != param.dtype and not (v_any_float and xp is numpy and name == "v"
                                            and a.dtype in SUPPORTED_DTYPES
                                            and a.dtype.isnative)):
            raise TypeError("%s has dtype %s but param has dtype %s"
                            % (name, a.dtype, param.dtype))
        if a.shape != param.shape:
            raise ValueError("%s has shape %s but param has shape %s"
                             % (name, a.shape, param.shape))
    if xp is not numpy:
        return
    for name, a in named:
        if name != "grad" and not a.flags.writeable:
            raise ValueError("%s is read-only (its array is not writeable)" % name)
    for i, (n1, a1) in enumerate(named):
        for n2, a2 in named[i + 1:]:
            if (a1.size and a2.size and numpy.may_share_memory(a1, a2)
                    and numpy.shares_memory(a1, a2)):
                raise ValueError("%s and %s overlap in memory" % (n1, n2))


def _weak(x):
    """A hyperparameter expression as it meets an array: a Python float, so that
    NumPy 2 combines it by value as NumPy 1.x combines a scalar (the
    expression itself is computed first with NumPy's scalar rules)."""
    return float(x)


#: The scalar types NumPy computes with as numbers (``bool`` is an ``int``).
#: Other ``numbers.Real`` classes (``fractions.Fraction``) meet an array as
#: objects, and Chainer's NumPy lines fail on them.
REAL_SCALAR_TYPES = (int, float, numpy.integer, numpy.floating)


def check_real_scalar(name, value):
    """Raise unless ``value`` is a real scalar the kernels can take: a Python
    ``int`` (``bool`` too), ``float`` or NumPy integer or float scalar, or a
    0-d NumPy array of integers or floats; a Python int must fit int64."""
    if not (
            isinstance(value, REAL_SCALAR_TYPES)
            or (isinstance(value, numpy.ndarray) and value.ndim == 0
                and value.dtype.kind in "fiu")):
        raise TypeError("hyperparameter %s must be a real number, got %r" % (name, value))
    if isinstance(value, int) and not -2 ** 63 <= value < 2 ** 63:
        raise ValueError("hyperparameter %s=%r is an integer out of the int64 range"
                         % (name, value))


def nesterov_ag_mixed(param, grad, v, lr, momentum):
    """Chainer's NumPy sequence as written, for a ``v`` of another float dtype.

    ``v *= momentum; v -= lr * grad; param += momentum * momentum * v;
    param -= (1 + momentum) * lr * grad``, each operation NumPy's own (its
    casting and rounding), so the result is Chainer's whatever the dtypes:
    ``v`` (float16, float32 or float64) may differ from ``param`` and
    ``grad``, which share one.  Each scalar expression is computed with
    NumPy's scalar rules and meets the arrays as NumPy 1.x's value-based
    casting has it, whichever NumPy runs.  NumPy arrays only; everything is
    checked before anything is written (``check_nesterov_ag_arrays(...,
    v_any_float=True)``, and real scalar hyperparameters).
    """
    if grad is None or v is None:
        raise TypeError("nesterov_ag_mixed needs grad and v arrays, got %s"
                        % ("grad None" if grad is None else "v None"))
    check_nesterov_ag_arrays(param, grad, v, v_any_float=True)
    check_real_scalar("lr", lr)
    check_real_scalar("momentum", momentum)
    _numpy_lines(param, grad, v, lr, momentum)


def _numpy_lines(param, grad, v, lr, momentum):
    """Chainer's four NumPy lines.  Each scalar expression meets a plain array
    as a Python float (NumPy 1.x's value-based casting, whichever NumPy runs),
    and an ndarray subclass as Chainer gives it (the subclass's own arithmetic
    depends on the scalar's type: a matrix's dot() of a NumPy float32 is
    float32, of a Python float float64)."""
    m = momentum

    def at(x, a):
        return _weak(x) if type(a) is numpy.ndarray else x

    v *= at(m, v)
    v -= at(lr, grad) * grad
    param += at(m * m, v) * v
    param -= at((1 + m) * lr, grad) * grad


def nesterov_ag_dense_ok(param, grad, v):
    """True if the arrays take the dense native path (and so pass every check).

    Dense: NumPy arrays (at least 1-d) of one native float dtype and one
    shape, all C- or all F-contiguous, aligned, disjoint, ``param`` and ``v``
    writeable.  Reads the array headers only (tens of nanoseconds), so
    callers use it to skip :func:`check_nesterov_ag_arrays` in the common
    case.
    """
    return _nesterov_cpu.dense_arrays_ok(param, grad, v)


def _collapse(shape, strides_list):
    """Merge axes that all arrays can walk as one; drop length-1 axes."""
    axes = []
    for i, size in enumerate(shape):
        if size == 1:
            continue
        strides = [s[i] for s in strides_list]
        if axes and all(outer == inner * size for outer, inner in zip(axes[-1][1], strides)):
            axes[-1] = (axes[-1][0] * size, strides)
        else:
            axes.append((size, strides))
    return axes


def _kernel_views(param, grad, v):
    """('contiguous' | 'strided', p, g, v) views for the kernel, or None."""
    for order, flag in (("C", "c_contiguous"), ("F", "f_contiguous")):
        if getattr(param.flags, flag) and getattr(grad.flags, flag) and getattr(v.flags, flag):
            return "contiguous", param.ravel(order), grad.ravel(order), v.ravel(order)
    arrays = (param, grad, v)
    axes = _collapse(param.shape, [a.strides for a in arrays])
    if len(axes) > 2:
        return None
    while len(axes) < 2:
        axes.insert(0, (1, [0, 0, 0]))
    shape = (axes[0][0], axes[1][0])
    views = [numpy.lib.stride_tricks.as_strided(a, shape, (axes[0][1][k], axes[1][1][k]))
             for k, a in enumerate(arrays)]
    return ("strided",) + tuple(views)


def nesterov_ag_cpu(param, grad, v, lr, momentum, num_threads=None, check=True):
    """One fused NesterovAG step on NumPy arrays, in place.

    ``param`` and ``v`` are updated in place from ``grad``::

        v     = v * momentum - lr * grad
        param = (param + mm * v) - c * grad

    with the coefficients of :func:`nesterov_ag_coefficients`.  Any shape
    and strides are accepted (0-d and empty arrays included); arrays that can
    be walked as one contiguous block take the vectorised fast path; dense
    arrays with Python-float hyperparameters are checked and dispatched
    without leaving native code.

    Args:
        param, grad, v: NumPy arrays of one float dtype and one shape.
        lr, momentum: hyperparameters (scalars).
        num_threads: OpenMP threads; ``None`` applies
            :func:`cynag_kernels.threads.threads_for` (one thread below the
            parallel threshold).
        check: validate the arguments first (see
            :func:`check_nesterov_ag_arrays`); pass ``False`` only when the
            caller has just done so.
    """
    if num_threads is None:
        num_threads = threads_for(getattr(param, "size", 0))
    if _nesterov_cpu.try_nesterov_ag_dense(param, grad, v, lr, momentum, num_threads):
        return
    if grad is None or v is None:
        raise TypeError("nesterov_ag_cpu needs grad and v arrays, got %s None"
                        % ("grad" if grad is None else "v"))
    if check:
        check_nesterov_ag_arrays(param, grad, v)
    if not (type(param) is type(grad) is type(v) is numpy.ndarray):
        # An ndarray subclass (numpy.matrix, numpy.ma.MaskedArray) has its own
        # arithmetic (a matrix multiplies by a scalar through dot(), in
        # float64): Chainer's NumPy lines on the objects themselves.
        _numpy_lines(param, grad, v, lr, momentum)
        return
    n = param.size
    if n == 0:
        return
    if param.ndim == 0:
        # NumPy 1.x promotes 0-d arrays like scalars (see _promoted_codes_0d).
        lr_s, m_s = _strong_scalar(lr), _strong_scalar(momentum)
        mm, c = m_s * m_s, (numpy.int64(1) + m_s) * lr_s
        codes = _promoted_codes_0d(param.dtype, lr_s, m_s, mm, c)
        if max(codes) > 64:
            # A long double hyperparameter: Chainer's lines in NumPy's long
            # double (strong NumPy scalars: the same result under NumPy 1.x and 2).
            v *= m_s
            v -= lr_s * grad
            param += m_s * m_s * v
            param -= (numpy.int64(1) + m_s) * lr_s * grad
            return
        _nesterov_ag_promoted(param, grad, v, (lr_s, m_s, mm, c), codes)
        return
    coefficients = nesterov_ag_coefficients(lr, momentum, param.dtype)
    if any(type(k) is not type(coefficients[0]) for k in coefficients):
        _nesterov_ag_promoted(param, grad, v, coefficients,
                              _promoted_codes_wide(param.dtype, coefficients))
        return
    lr_c, m_c, mm_c, c_c = coefficients
    if param.dtype == numpy.float16:
        param, grad, v = (a.view(numpy.uint16) for a in (param, grad, v))
    views = _kernel_views(param, grad, v)
    args = (float(lr_c), float(m_c), float(mm_c), float(c_c), int(num_threads))
    if views is None:
        # Axes that cannot be collapsed to two: update contiguous copies and
        # write them back (rare: e.g. a transposed 3-d view next to a C array).
        pc, gc, vc = (numpy.ascontiguousarray(a) for a in (param, grad, v))
        _nesterov_cpu.nesterov_ag_contiguous(pc.reshape(-1), gc.reshape(-1), vc.reshape(-1), *args)
        param[...] = pc
        v[...] = vc
        return
    kind, p, g, vv = views
    if kind == "contiguous":
        _nesterov_cpu.nesterov_ag_contiguous(p, g, vv, *args)
    else:
        _nesterov_cpu.nesterov_ag_strided(p, g, vv, *args)
