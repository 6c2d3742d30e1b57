"""Reference implementations of one NesterovAG step, written with plain NumPy.

These are the oracles the kernel tests compare against bit for bit.  The
semantics are those of Chainer 7.8.1's CPU sequence
``v *= m; v -= lr * g; p += m * m * v; p -= (1 + m) * lr * g`` as it runs
on NumPy 1.x, with one deliberate difference: float16 arrays (ndim >= 1) are
computed in float32 and stored as float16.

* :func:`nesterov_ag_numpy` -- the oracle, in place, for float16, float32
  and float64 arrays of any shape:

  - ndim >= 1: the four in-place NumPy operations with the coefficients
    ``(lr, m, mm, c)`` of :func:`cynag_kernels.nesterov_ag_coefficients`
    (NumPy scalars of the compute dtype: NumPy 1.x value-based casting
    rounds a scalar to the array dtype); float16 runs them in float32 on the
    float16 storage, storing ``v`` (rounded to float16) before ``param``
    reads it.
  - ndim == 0: NumPy 1.x treats 0-d arrays as scalars, so each operation
    runs in the promoted scalar type (float64 for Python-float
    hyperparameters, whatever the array dtype, float16 included) and only the
    four stores round to the array dtype.

* :func:`chainer_numpy_sequence` -- Chainer's ``update_core_cpu`` verbatim.
  Under NumPy 1.x it is the ground truth for float32/float64 arrays and for
  0-d arrays.  Under NumPy 2 (NEP 50) it only gives NumPy 1.x's rounding in
  the cases :func:`chainer_sequence_applies` accepts (e.g. Python-float
  hyperparameters with float32/float64 arrays of ndim >= 1, where a "weak"
  Python float is rounded to the array dtype just as value-based casting did).

* :func:`numpy1_coefficients` -- the coefficients formed as NumPy 1.x forms
  them, written independently of :mod:`cynag_kernels`.

The oracles update ``param`` and ``v`` in place and return ``(param, v)``.
"""
import numpy

from cynag_kernels import nesterov_ag_coefficients

__all__ = ["nesterov_ag_numpy", "chainer_numpy_sequence", "chainer_sequence_applies",
           "nesterov_ag_reference", "numpy1_coefficients", "strong_scalar", "NUMPY1",
           "bits", "assert_same_bits"]

#: True when running on NumPy 1.x (value-based casting, Chainer's NumPy).
NUMPY1 = int(numpy.__version__.split(".")[0]) < 2


def strong_scalar(x):
    """A hyperparameter typed as NumPy 1.x types it in scalar arithmetic.

    Python ``float`` -> float64, ``int`` -> int64 (``bool`` too: Python
    arithmetic treats True as 1), a 0-d array -> its NumPy scalar; NumPy
    scalars are returned unchanged.
    """
    if isinstance(x, int):
        return numpy.int64(x)
    if isinstance(x, float):
        return numpy.float64(x)
    if isinstance(x, numpy.ndarray) and x.ndim == 0:
        return x[()]
    return x


def numpy1_coefficients(lr, momentum, dtype):
    """``(lr, m, m * m, (1 + m) * lr)`` formed as NumPy 1.x forms them (scalar
    arithmetic on strongly typed scalars), each rounded once to the compute
    dtype (float32 for float16 arrays)."""
    dtype = numpy.dtype(dtype)
    t = numpy.float32 if dtype == numpy.float16 else dtype.type
    lr_s, m_s = strong_scalar(lr), strong_scalar(momentum)
    with numpy.errstate(all="ignore"):
        return t(lr_s), t(m_s), t(m_s * m_s), t((numpy.int64(1) + m_s) * lr_s)


def chainer_sequence_applies(ndim, dtype, lr, momentum):
    """True when :func:`chainer_numpy_sequence`, run under the NumPy in use,
    rounds as Chainer on NumPy 1.x does (so it can serve as an oracle)."""
    dtype = numpy.dtype(dtype)
    if NUMPY1:
        return ndim == 0 or dtype != numpy.float16
    if ndim == 0 or dtype == numpy.float16:
        return False
    ok = (float, int)
    if dtype == numpy.float64:
        ok = (float, int, numpy.float64)
    return all(type(s) in ok and not isinstance(s, bool) for s in (lr, momentum))


def chainer_numpy_sequence(param, grad, v, lr, momentum):
    """Chainer's NesterovAG CPU update, verbatim (see module docstring)."""
    v *= momentum
    v -= lr * grad
    param += momentum * momentum * v
    param -= (1 + momentum) * lr * grad
    return param, v


def _nesterov_ag_0d(param, grad, v, lr, momentum):
    lr_s, m_s = strong_scalar(lr), strong_scalar(momentum)
    store = param.dtype.type
    g = grad[()]
    with numpy.errstate(all="ignore"):
        vv = store(v[()] * m_s)
        vv = store(vv - lr_s * g)
        pp = store(param[()] + (m_s * m_s) * vv)
        pp = store(pp - ((numpy.int64(1) + m_s) * lr_s) * g)
    v[()] = vv
    param[()] = pp
    return param, v


def nesterov_ag_numpy(param, grad, v, lr, momentum):
    """One NesterovAG step in place, with Chainer's rounding; dtype-aware.

    float32/float64 (ndim >= 1): ``v *= m; v -= lr * g; p += mm * v;
    p -= c * g`` with ``(lr, m, mm, c)`` NumPy scalars of the array dtype
    from :func:`cynag_kernels.nesterov_ag_coefficients`.

    float16 (ndim >= 1): the same sequence in float32 on float16 storage::

        v32 = v16.astype(f32) * m32 - lr32 * g32;  v16 = v32.astype(f16)
        p16 = ((p16.astype(f32) + mm32 * v16.astype(f32)) - c32 * g32).astype(f16)

    0-d arrays (any dtype): NumPy 1.x scalar promotion, see the module
    docstring.
    """
    dtype = param.dtype
    if dtype not in (numpy.float16, numpy.float32, numpy.float64):
        raise TypeError("unsupported dtype %s" % dtype)
    if param.ndim == 0:
        return _nesterov_ag_0d(param, grad, v, lr, momentum)
    lr_c, m_c, mm_c, c_c = nesterov_ag_coefficients(lr, momentum, dtype)
    with numpy.errstate(all="ignore"):
        if dtype == numpy.float16:
            f32, f16 = numpy.float32, numpy.float16
            assert all(type(x) is f32 for x in (lr_c, m_c, mm_c, c_c))
            g32 = grad.astype(f32)
            v32 = v.astype(f32) * m_c
            v32 -= lr_c * g32
            v[...] = v32.astype(f16)
            p32 = param.astype(f32)
            p32 += mm_c * v.astype(f32)
            p32 -= c_c * g32
            param[...] = p32.astype(f16)
            return param, v
        assert all(type(x) is dtype.type for x in (lr_c, m_c, mm_c, c_c))
        v *= m_c
        v -= lr_c * grad
        param += mm_c * v
        param -= c_c * grad
    return param, v


def nesterov_ag_reference(param, grad, v, lr, momentum):
    """Out-of-place convenience wrapper: returns new ``(param, v)`` arrays."""
    p = numpy.array(param, copy=True)
    vv = numpy.array(v, copy=True)
    g = numpy.array(grad, copy=True)
    return nesterov_ag_numpy(p, g, vv, lr, momentum)


_UINT = {2: numpy.uint16, 4: numpy.uint32, 8: numpy.uint64}


def bits(a):
    """The bit patterns of a float array (any layout, 0-d included), C order."""
    a = numpy.array(a, copy=True, order="C")
    return a.view(_UINT[a.dtype.itemsize])


def assert_same_bits(actual, expected, name="array", nan_payload=True):
    """Assert two float arrays hold identical bits (shape and dtype included).

    With ``nan_payload=False`` two NaNs compare equal whatever their bits
    (float16 NaN payloads are not part of the contract).
    """
    actual = numpy.asarray(actual)
    expected = numpy.asarray(expected)
    assert actual.dtype == expected.dtype, "%s: dtype %s != %s" % (name, actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, "%s: shape %s != %s" % (name, actual.shape, expected.shape)
    ba, be = bits(actual), bits(expected)
    diff = ba != be
    if not nan_payload:
        diff &= ~(numpy.isnan(numpy.array(actual, order="C"))
                  & numpy.isnan(numpy.array(expected, order="C")))
    if diff.any():
        idx = numpy.argwhere(diff)
        first = tuple(int(i) for i in idx[0]) if actual.ndim else ()
        a_c = numpy.array(actual, order="C")
        e_c = numpy.array(expected, order="C")
        raise AssertionError(
            "%s: %d of %d elements differ; first at %s: got %r (0x%x), expected %r (0x%x)"
            % (name, int(diff.sum()), diff.size, first, a_c[first], int(ba[first]),
               e_c[first], int(be[first])))
