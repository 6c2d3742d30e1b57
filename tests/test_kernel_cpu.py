"""Tests of the fused NesterovAG CPU kernel, ``cynag_kernels.nesterov_ag_cpu``.

The contract: for float32/float64 arrays the update is bit-identical to
Chainer's NumPy sequence ``v *= m; v -= lr*g; p += m*m*v; p -= (1+m)*lr*g``
(scalars rounded to the array dtype, NumPy-1 value-based casting); float16
arrays are computed in float32 and stored as float16.  Any shape and strides
are accepted; bad arguments raise before anything is written.
"""
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import cynag_kernels
from cynag_kernels import (
    SUPPORTED_DTYPES,
    check_nesterov_ag_arrays,
    compute_dtype,
    nesterov_ag_coefficients,
    nesterov_ag_cpu,
)
from cynag_kernels import _nesterov_cpu

from oracle import (
    NUMPY1,
    assert_same_bits,
    bits,
    chainer_numpy_sequence,
    chainer_sequence_applies,
    nesterov_ag_numpy,
    numpy1_coefficients,
)

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
DTYPES = [F16, F32, F64]


# ---------------------------------------------------------------------------
# Helpers: values, layouts, scalars
# ---------------------------------------------------------------------------
def random_values(rng, shape, dtype):
    """Finite random values of ``dtype``: mixed magnitudes, zeros, subnormals."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    hi = 1.5 if dtype == F16 else 2.0
    x = rng.standard_normal(n) * 10.0 ** rng.uniform(-3, hi, n)
    info = np.finfo(dtype)
    specials = np.array([0.0, -0.0, float(info.smallest_subnormal),
                         -float(info.smallest_subnormal), float(info.smallest_normal),
                         1.0, -1.0, 0.5], dtype=np.float64)
    mask = rng.random(n) < 0.08
    x[mask] = rng.choice(specials, int(mask.sum()))
    return x.astype(dtype).reshape(shape)


class Layout:
    """A memory layout for an array of a given shape inside a flat buffer.

    ``perm`` orders the axes in memory (a transposed view when not the
    identity), ``steps`` slices each axis with a step (gaps in memory),
    ``flips`` reverses axes (negative strides), ``order`` is the storage order
    of the permuted block and ``offset`` a leading gap in elements.
    """

    def __init__(self, perm, steps, flips, order="C", offset=0):
        self.perm = tuple(perm)
        self.steps = tuple(steps)
        self.flips = tuple(flips)
        self.order = order
        self.offset = offset

    @classmethod
    def contiguous(cls, ndim, order="C"):
        return cls(range(ndim), (1,) * ndim, (False,) * ndim, order, 0)

    def __repr__(self):
        return "Layout(perm=%r, steps=%r, flips=%r, order=%r, offset=%r)" % (
            self.perm, self.steps, self.flips, self.order, self.offset)

    def _storage_shape(self, shape):
        full = [shape[k] * self.steps[k] for k in range(len(shape))]
        return tuple(full[p] for p in self.perm)

    def view(self, buf, shape):
        """The array of ``shape`` this layout describes inside ``buf``."""
        a = buf[self.offset:].reshape(self._storage_shape(shape), order=self.order)
        a = a.transpose(np.argsort(self.perm).astype(int).tolist())
        a = a[tuple(slice(None, None, -s if f else s) for s, f in zip(self.steps, self.flips))
              + (Ellipsis,)]
        assert a.shape == tuple(shape)
        return a

    def allocate(self, values, rng):
        """(buffer, view) with the view holding ``values``; the gaps hold junk."""
        shape = values.shape
        size = int(np.prod(self._storage_shape(shape), dtype=np.int64))
        buf = random_values(rng, (size + self.offset,), values.dtype)
        a = self.view(buf, shape)
        a[...] = values
        assert a.size == 0 or np.shares_memory(a, buf)
        return buf, a


@st.composite
def layouts(draw, ndim):
    contiguous = draw(st.integers(0, 3))
    if contiguous == 0:
        return Layout.contiguous(ndim, "C")
    if contiguous == 1:
        return Layout.contiguous(ndim, "F")
    perm = draw(st.permutations(list(range(ndim))))
    steps = draw(st.lists(st.integers(1, 3), min_size=ndim, max_size=ndim))
    flips = draw(st.lists(st.booleans(), min_size=ndim, max_size=ndim))
    order = draw(st.sampled_from("CF"))
    offset = draw(st.integers(0, 3))
    return Layout(perm, steps, flips, order, offset)


SCALAR_KINDS = ["python", "float16", "float32", "float64", "0d-float32", "0d-float64"]


def as_scalar(x, kind):
    """``x`` as a Python float, a NumPy scalar or a 0-d array."""
    if kind == "python":
        return float(x)
    if kind.startswith("0d-"):
        return np.array(x, dtype=kind[3:])
    return np.dtype(kind).type(x)


lr_values = st.one_of(st.sampled_from([0.0, 1e-3, 0.01, 0.1, 1.0, 10.0]),
                      st.floats(0.0, 10.0))
momentum_values = st.one_of(st.sampled_from([0.0, 0.5, 0.9, 0.99]),
                            st.floats(0.0, 1.0, exclude_max=True),
                            st.floats(-2.0, 2.0))


def run_case(dtype, shape, layout_p, layout_g, layout_v, broadcast, lr, momentum,
             n_steps, num_threads, seed):
    """Run the kernel on arrays with the given layouts and compare with the oracles.

    Checks the updated ``param`` and ``v`` bit for bit, that ``grad`` is not
    written, and that no byte of the buffers outside the views changes.
    """
    rng = np.random.default_rng(seed)
    p_vals = random_values(rng, shape, dtype)
    v_vals = random_values(rng, shape, dtype)
    g_shape = tuple(1 if b else s for s, b in zip(shape, broadcast))
    g_small = random_values(rng, g_shape, dtype)
    g_vals = np.broadcast_to(g_small, shape)

    p_buf, param = layout_p.allocate(p_vals, rng)
    v_buf, v = layout_v.allocate(v_vals, rng)
    g_buf, g_small_arr = layout_g.allocate(g_small, rng)
    grad = np.broadcast_to(g_small_arr, shape) if any(broadcast) else g_small_arr
    g_buf_before, p_buf_before, v_buf_before = g_buf.copy(), p_buf.copy(), v_buf.copy()
    event("path: %s" % _kernel_path(param, grad, v, skip=False))
    event("dtype: %s" % dtype)
    event("Chainer verbatim oracle: %s" % chainer_sequence_applies(len(shape), dtype, lr, momentum))

    p_exp, v_exp, g_exp = p_vals.copy(), v_vals.copy(), np.array(g_vals)
    use_chainer = chainer_sequence_applies(len(shape), dtype, lr, momentum)
    if use_chainer:
        p_ch, v_ch = p_vals.copy(), v_vals.copy()
    for step in range(n_steps):
        nesterov_ag_cpu(param, grad, v, lr, momentum, num_threads=num_threads)
        nesterov_ag_numpy(p_exp, g_exp, v_exp, lr, momentum)
        nan_payload = dtype != F16
        assert_same_bits(param, p_exp, "param after step %d" % step, nan_payload)
        assert_same_bits(v, v_exp, "v after step %d" % step, nan_payload)
        if use_chainer:
            chainer_numpy_sequence(p_ch, g_exp, v_ch, lr, momentum)
            assert_same_bits(param, p_ch, "param vs Chainer sequence, step %d" % step,
                             nan_payload)
            assert_same_bits(v, v_ch, "v vs Chainer sequence, step %d" % step, nan_payload)

    # Nothing outside the views was written, and grad was not written at all.
    assert_same_bits(g_buf, g_buf_before, "grad buffer")
    for buf, buf_before, layout, exp, name in ((p_buf, p_buf_before, layout_p, p_exp, "param"),
                                               (v_buf, v_buf_before, layout_v, v_exp, "v")):
        # the buffer as it was, with only the view's elements replaced
        expected_buf = buf_before.copy()
        layout.view(expected_buf, shape)[...] = exp
        assert_same_bits(buf, expected_buf, "%s buffer" % name, dtype != F16)


# ---------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------
shapes = st.one_of(
    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=300),
)


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(shapes)
    ndim = len(shape)
    broadcast = draw(st.one_of(
        st.just((False,) * ndim),
        st.lists(st.booleans(), min_size=ndim, max_size=ndim).map(tuple)))
    kind_lr = draw(st.sampled_from(SCALAR_KINDS))
    kind_m = draw(st.sampled_from([kind_lr] + SCALAR_KINDS))
    lr = as_scalar(draw(lr_values), kind_lr)
    momentum = as_scalar(draw(momentum_values), kind_m)
    return dict(
        dtype=dtype, shape=shape,
        layout_p=draw(layouts(ndim)), layout_g=draw(layouts(ndim)), layout_v=draw(layouts(ndim)),
        broadcast=broadcast, lr=lr, momentum=momentum,
        n_steps=draw(st.integers(1, 3)),
        num_threads=draw(st.sampled_from([None, 1, 2, 3])),
        seed=draw(st.integers(0, 2 ** 32 - 1)),
    )


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_matches_oracle_any_layout(case):
    run_case(**case)


@settings(max_examples=150, deadline=None)
@given(dtype=st.sampled_from([F32, F64]), shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=40),
       lr=lr_values, momentum=momentum_values, n_steps=st.integers(1, 4),
       seed=st.integers(0, 2 ** 32 - 1))
def test_python_float_hyperparameters_match_chainer_sequence(dtype, shape, lr, momentum,
                                                             n_steps, seed):
    """Contiguous arrays, Python floats: the verbatim Chainer sequence is the oracle."""
    assert chainer_sequence_applies(len(shape), dtype, lr, momentum)
    rng = np.random.default_rng(seed)
    p, g, v = (random_values(rng, shape, dtype) for _ in range(3))
    p_ch, v_ch = p.copy(), v.copy()
    for step in range(n_steps):
        nesterov_ag_cpu(p, g, v, lr, momentum)
        chainer_numpy_sequence(p_ch, g, v_ch, lr, momentum)
        assert_same_bits(p, p_ch, "param, step %d" % step)
        assert_same_bits(v, v_ch, "v, step %d" % step)


# ---------------------------------------------------------------------------
# Explicit layouts (each named case must work; some assert which path they take)
# ---------------------------------------------------------------------------
def _with_layout(kind):
    """Makers: take the logical shape, return an empty-ish array of that shape."""
    def c(shape, dtype):
        return np.empty(shape, dtype)

    def f(shape, dtype):
        return np.empty(shape, dtype, order="F")

    def transposed(shape, dtype):
        return np.empty(shape[::-1], dtype).T

    def negative(shape, dtype):
        return np.empty(shape, dtype)[(slice(None, None, -1),) * len(shape)]

    def strided(shape, dtype):
        big = np.empty(tuple(2 * s for s in shape), dtype)
        return big[(slice(None, None, 2),) * len(shape)]

    def last_axis_strided(shape, dtype):
        big = np.empty(shape[:-1] + (3 * shape[-1],), dtype)
        return big[..., ::3]

    def rolled(shape, dtype):
        # axes in memory order (1, 2, 0): not collapsible next to a C array
        nd = len(shape)
        perm = list(range(1, nd)) + [0]
        return np.empty(tuple(shape[p] for p in perm), dtype).transpose(np.argsort(perm).tolist())

    return dict(C=c, F=f, T=transposed, neg=negative, step2=strided, last3=last_axis_strided,
                rolled=rolled)[kind]


LAYOUT_COMBOS = [
    # (shape, param, grad, v, expected path or None)
    ((7, 9), "C", "C", "C", "contiguous"),
    ((7, 9), "F", "F", "F", "contiguous"),
    ((7, 9), "C", "T", "C", "strided"),          # param C, grad a transposed view
    ((7, 9), "T", "C", "F", "strided"),
    ((7, 9), "neg", "C", "C", "strided"),
    ((7, 9), "neg", "neg", "neg", "strided"),
    ((64, 33), "step2", "C", "T", "strided"),
    ((5, 6, 7), "C", "last3", "C", "strided"),
    ((5, 6, 7), "C", "F", "C", "fallback"),      # >2-d, no axes can be merged
    ((5, 6, 7), "C", "T", "C", "fallback"),
    ((3, 4, 5, 6), "rolled", "C", "F", "fallback"),
    ((3, 4, 5, 6), "step2", "step2", "step2", "fallback"),
    ((3, 4, 5, 6), "last3", "C", "last3", "strided"),
    ((3, 4, 5, 6), "neg", "T", "rolled", "fallback"),
    ((1000,), "neg", "step2", "C", "strided"),
    ((2, 1, 3), "T", "C", "C", "strided"),
]


def _kernel_path(param, grad, v, skip=True):
    """'contiguous', 'strided' or 'fallback', from the launcher's private helper."""
    from cynag_kernels import nesterov as mod
    helper = getattr(mod, "_kernel_views", None)
    if helper is None:
        if skip:
            pytest.skip("cynag_kernels.nesterov._kernel_views is gone")
        return "unknown"
    if param.size == 0:
        return "empty"
    if param.ndim == 0:
        return "0-d"
    if param.dtype == np.float16:
        param, grad, v = (a.view(np.uint16) for a in (param, grad, v))
    views = helper(param, grad, v)
    return "fallback" if views is None else views[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_threads", [1, 3])
@pytest.mark.parametrize("shape,lp,lg,lv,path", LAYOUT_COMBOS,
                         ids=["%s-%s-%s-%s" % (c[0], c[1], c[2], c[3]) for c in LAYOUT_COMBOS])
def test_mixed_layouts(dtype, num_threads, shape, lp, lg, lv, path):
    rng = np.random.default_rng(zlib.crc32(repr((shape, lp, lg, lv)).encode()))
    arrays = []
    for kind in (lp, lg, lv):
        a = _with_layout(kind)(shape, dtype)
        a[...] = random_values(rng, shape, dtype)
        arrays.append(a)
    param, grad, v = arrays
    assert _kernel_path(param, grad, v) == path
    p_exp, g_exp, v_exp = (np.array(a) for a in arrays)
    g_before = bits(grad)
    for _ in range(3):
        nesterov_ag_cpu(param, grad, v, 0.05, 0.9, num_threads=num_threads)
        nesterov_ag_numpy(p_exp, g_exp, v_exp, 0.05, 0.9)
    assert_same_bits(param, p_exp, "param")
    assert_same_bits(v, v_exp, "v")
    np.testing.assert_array_equal(bits(grad), g_before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (1, 0, 2), (0, 0), (3, 0, 4), (1,), (1, 1), (5,),
                                   (2, 3), (2, 3, 4), (2, 1, 3, 1), (3, 4, 5, 6)])
def test_shapes_contiguous(dtype, shape):
    rng = np.random.default_rng(len(shape))
    param, grad, v = (random_values(rng, shape, dtype) for _ in range(3))
    p_exp, v_exp = param.copy(), v.copy()
    nesterov_ag_cpu(param, grad, v, 0.1, 0.9)
    nesterov_ag_numpy(p_exp, grad, v_exp, 0.1, 0.9)
    assert param.shape == shape and v.shape == shape
    assert_same_bits(param, p_exp, "param")
    assert_same_bits(v, v_exp, "v")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_d_arrays(dtype):
    param, grad, v = np.array(1.5, dtype), np.array(-0.25, dtype), np.array(0.125, dtype)
    nesterov_ag_cpu(param, grad, v, 0.5, 0.75)
    p_exp, v_exp = nesterov_ag_numpy(np.array(1.5, dtype), np.array(-0.25, dtype),
                                     np.array(0.125, dtype), 0.5, 0.75)
    assert param.ndim == 0 and v.ndim == 0
    assert_same_bits(param, p_exp)
    assert_same_bits(v, v_exp)
    # v = 0.125*0.75 + 0.5*0.25 = 0.21875; p = 1.5 + 0.5625*0.21875 + 0.875*0.25
    assert float(v) == 0.21875
    assert float(param) == 1.5 + 0.5625 * 0.21875 + 0.875 * 0.25


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_d_arrays_follow_numpy1_scalar_promotion(dtype):
    """NumPy 1.x (Chainer's) treats 0-d arrays as scalars: with Python-float
    hyperparameters each of the four operations runs in float64 and only the
    stores round to the array dtype (float16 included), unlike a (1,) array."""
    rng = np.random.default_rng(42)
    lr, m = 0.1, 0.9
    n_differ = 0
    for _ in range(200):
        p0, g0, v0 = (dtype.type(x) for x in rng.standard_normal(3))
        param, grad, v = np.array(p0), np.array(g0), np.array(v0)
        nesterov_ag_cpu(param, grad, v, lr, m)
        st_ = dtype.type
        # Python floats: every operation in double, four roundings to dtype
        vv = st_(float(st_(float(v0) * m)) - lr * float(g0))
        pp = st_(float(st_(float(p0) + (m * m) * float(vv))) - ((1 + m) * lr) * float(g0))
        assert_same_bits(v, np.array(vv), "v")
        assert_same_bits(param, np.array(pp), "param")
        p1, v1 = np.array([p0]), np.array([v0])
        nesterov_ag_cpu(p1, np.array([g0]), v1, lr, m)
        n_differ += bits(p1)[0] != bits(param) or bits(v1)[0] != bits(v)
    if dtype != F64:
        assert n_differ > 0  # the 0-d path is really different from the array path


def test_zero_d_float16_store_rounds_once():
    """A float64 result stored into a float16 array rounds once, as NumPy's
    double-to-half conversion does: through float32 first, a result just
    above a tie between two float16 values (-7.939453125000001, between
    0xc7f0 and 0xc7f1) would lose the bit that breaks the tie."""
    f16 = np.float16
    param = np.array(-5.29296875, f16)   # 0xc54b
    grad = np.array(0.2646484375, f16)
    v = np.array(-2.646484375, f16)
    lr, m = 10.0, 3.6286943015967804e-16
    p_ch, v_ch = param.copy(), v.copy()
    nesterov_ag_cpu(param, grad, v, lr, m)
    chainer_numpy_sequence(p_ch, grad, v_ch, lr, m)
    # Python floats: every operation in double, four roundings to float16
    vv = f16(float(f16(float(v_ch.dtype.type(-2.646484375)) * m)) - lr * 0.2646484375)
    pp = f16(float(f16(-5.29296875 + (m * m) * float(vv))) - ((1 + m) * lr) * 0.2646484375)
    assert int(np.array(pp).view(np.uint16)) == 0xc7f1
    assert_same_bits(param, np.array(pp), "param")
    assert_same_bits(v, np.array(vv), "v")
    if chainer_sequence_applies(0, np.dtype(f16), lr, m):
        assert_same_bits(param, p_ch, "param vs Chainer's sequence")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,bshape", [((10,), ()), ((10,), (1,)), ((4, 6), (1, 6)),
                                          ((4, 6), (4, 1)), ((3, 4, 5), (3, 1, 5)),
                                          ((3, 4, 5), (1, 1, 1)), ((2, 0, 3), (2, 1, 1))])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_broadcast_grad(dtype, shape, bshape, num_threads):
    """A zero-stride (read-only, broadcast) grad is read correctly."""
    rng = np.random.default_rng(7)
    small = random_values(rng, bshape, dtype)
    grad = np.broadcast_to(small, shape)
    assert not grad.flags.writeable
    param, v = random_values(rng, shape, dtype), random_values(rng, shape, dtype)
    p_exp, v_exp = param.copy(), v.copy()
    nesterov_ag_cpu(param, grad, v, 0.3, 0.6, num_threads=num_threads)
    nesterov_ag_numpy(p_exp, np.array(grad), v_exp, 0.3, 0.6)
    assert_same_bits(param, p_exp, "param")
    assert_same_bits(v, v_exp, "v")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_readonly_grad_is_accepted(dtype):
    rng = np.random.default_rng(3)
    param, grad, v = (random_values(rng, (50,), dtype) for _ in range(3))
    grad.flags.writeable = False
    p_exp, v_exp = param.copy(), v.copy()
    nesterov_ag_cpu(param, grad, v, 0.1, 0.9)
    nesterov_ag_numpy(p_exp, grad, v_exp, 0.1, 0.9)
    assert_same_bits(param, p_exp)
    assert_same_bits(v, v_exp)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_threads", [1, 2])
def test_unaligned_arrays(dtype, num_threads):
    """Arrays at an odd byte address (e.g. from a byte buffer) still update correctly."""
    n = 1003
    rng = np.random.default_rng(11)
    arrays = []
    for _ in range(3):
        a = np.zeros(n * dtype.itemsize + 1, np.uint8)[1:].view(dtype)
        assert not a.flags.aligned
        a[...] = random_values(rng, (n,), dtype)
        arrays.append(a)
    param, grad, v = arrays
    p_exp, g_exp, v_exp = (np.array(a) for a in arrays)
    nesterov_ag_cpu(param, grad, v, 0.1, 0.9, num_threads=num_threads)
    nesterov_ag_numpy(p_exp, g_exp, v_exp, 0.1, 0.9)
    assert_same_bits(param, p_exp)
    assert_same_bits(v, v_exp)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interleaved_arrays_in_one_buffer(dtype):
    """param, grad and v interleaved in one buffer do not overlap: accepted."""
    rng = np.random.default_rng(5)
    buf = random_values(rng, (3 * 101,), dtype)
    param, grad, v = buf[0::3], buf[1::3], buf[2::3]
    p_exp, g_exp, v_exp = (np.array(a) for a in (param, grad, v))
    nesterov_ag_cpu(param, grad, v, 0.2, 0.8, num_threads=2)
    nesterov_ag_numpy(p_exp, g_exp, v_exp, 0.2, 0.8)
    assert_same_bits(param, p_exp)
    assert_same_bits(v, v_exp)
    assert_same_bits(grad, g_exp)


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_nonfinite_values_propagate(dtype):
    """inf and NaN in the inputs propagate as they do in NumPy."""
    vals = np.array([np.inf, -np.inf, np.nan, 1.0, 0.0, -0.0], dtype)
    rng = np.random.default_rng(0)
    cases = []
    for which in range(3):
        arrs = [np.ones(len(vals), dtype) * dtype.type(0.5) for _ in range(3)]
        arrs[which] = vals.copy()
        cases.append(arrs)
    cases.append([rng.permutation(vals) for _ in range(3)])
    for param, grad, v in cases:
        p_exp, v_exp = param.copy(), v.copy()
        nesterov_ag_cpu(param, grad, v, 0.1, 0.9)
        nesterov_ag_numpy(p_exp, grad, v_exp, 0.1, 0.9)
        np.testing.assert_array_equal(np.isnan(param), np.isnan(p_exp))
        np.testing.assert_array_equal(np.isnan(v), np.isnan(v_exp))
        assert_same_bits(param, p_exp, "param", nan_payload=False)
        assert_same_bits(v, v_exp, "v", nan_payload=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int_and_numpy_hyperparameters(dtype):
    """Python ints and NumPy scalars are accepted as lr and momentum."""
    rng = np.random.default_rng(2)
    for lr, m in [(1, 0), (0, 1), (2, -1), (np.float32(0.1), np.float32(0.9)),
                  (np.float64(0.1), np.float64(0.9)), (np.float16(0.1), np.float16(0.9)),
                  (np.float32(0.01), 0.9), (0.01, np.float64(0.9))]:
        param, grad, v = (random_values(rng, (33,), dtype) for _ in range(3))
        p_exp, v_exp = param.copy(), v.copy()
        nesterov_ag_cpu(param, grad, v, lr, m)
        nesterov_ag_numpy(p_exp, grad, v_exp, lr, m)
        assert_same_bits(param, p_exp, "param (lr=%r, m=%r)" % (lr, m))
        assert_same_bits(v, v_exp, "v (lr=%r, m=%r)" % (lr, m))


def test_coefficient_outside_float32_range():
    """lr = 1e39 with float32 arrays: on NumPy 1.x, ``v -= lr * g`` and
    ``p -= (1 + m) * lr * g`` run in float64 (the scalar does not fit in
    float32) and the results are stored as float32, which here are finite."""
    p = np.array([1.0, 2.0], np.float32)
    g = np.array([1e-30, 1e-35], np.float32)
    v = np.array([0.5, 0.0], np.float32)
    lr, m = 1e39, 0.5
    # NumPy 1.x / Chainer, spelled out
    v1 = v * np.float32(m)
    v2 = (v1.astype(np.float64) - lr * g.astype(np.float64)).astype(np.float32)
    p1 = p + np.float32(m * m) * v2
    p2 = (p1.astype(np.float64) - ((1 + m) * lr) * g.astype(np.float64)).astype(np.float32)
    assert np.isfinite(p2).all() and np.isfinite(v2).all()
    if NUMPY1:
        p_ch, v_ch = chainer_numpy_sequence(p.copy(), g, v.copy(), lr, m)
        assert_same_bits(p_ch, p2)
        assert_same_bits(v_ch, v2)
    with np.errstate(all="ignore"):
        nesterov_ag_cpu(p, g, v, lr, m)
    assert_same_bits(v, v2, "v")
    assert_same_bits(p, p2, "param")


# ---------------------------------------------------------------------------
# Multi-step trajectories
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_trajectory_200_steps(dtype, num_threads, layout):
    """200 steps with fresh gradients; bit-identical to the oracle after every step."""
    rng = np.random.default_rng(2024)
    n = 1037
    lr, m = 0.01, 0.9
    if layout == "contiguous":
        param, v = random_values(rng, (n,), dtype), np.zeros(n, dtype)
        grad = np.empty(n, dtype)
    else:
        param = random_values(rng, (2 * n,), dtype)[::-2]
        v = np.zeros((n, 3), dtype)[:, 1]
        grad = np.empty(2 * n, dtype)[1::2]
    p_exp, v_exp = np.array(param), np.array(v)
    use_chainer = dtype != F16
    if use_chainer:
        p_ch, v_ch = np.array(param), np.array(v)
    for step in range(200):
        grad[...] = random_values(rng, (n,), dtype)
        g = np.array(grad)
        nesterov_ag_cpu(param, grad, v, lr, m, num_threads=num_threads)
        nesterov_ag_numpy(p_exp, g, v_exp, lr, m)
        assert_same_bits(param, p_exp, "param after step %d" % step)
        assert_same_bits(v, v_exp, "v after step %d" % step)
        if use_chainer:
            chainer_numpy_sequence(p_ch, g, v_ch, lr, m)
            assert_same_bits(param, p_ch, "param vs Chainer after step %d" % step)


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_trajectory_quadratic_converges(dtype):
    """Sanity of the arithmetic itself: NesterovAG minimises a quadratic."""
    target = np.linspace(-3, 3, 101).astype(dtype)
    param = np.zeros(101, dtype)
    v = np.zeros(101, dtype)
    for _ in range(300):
        grad = (param - target).astype(dtype)
        nesterov_ag_cpu(param, grad, v, 0.05, 0.9)
    np.testing.assert_allclose(param, target, atol=1e-3)


# ---------------------------------------------------------------------------
# Coefficients
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lr,m", [(0.01, 0.9), (0.1, 0.99), (1e-3, 0.0), (3.0, -0.5),
                                  (np.float32(0.01), np.float32(0.9)),
                                  (np.float64(0.01), np.float64(0.9))])
def test_coefficients(dtype, lr, m):
    coeffs = nesterov_ag_coefficients(lr, m, dtype)
    cdt = compute_dtype(dtype)
    assert cdt == (F32 if dtype == F16 else dtype)
    assert len(coeffs) == 4
    assert all(type(c) is cdt.type for c in coeffs)
    lr_c, m_c, mm_c, c_c = coeffs
    assert lr_c == cdt.type(lr) and m_c == cdt.type(m)
    # m*m and (1+m)*lr are evaluated as NumPy 1.x evaluates them, then rounded once.
    for got, exp in zip(coeffs, numpy1_coefficients(lr, m, dtype)):
        assert type(got) is type(exp)
        assert bits(got) == bits(exp)
    gpu = nesterov_ag_coefficients(lr, m, dtype, device="gpu")
    assert len(gpu) == 2 and all(type(c) is cdt.type for c in gpu)
    with pytest.raises(ValueError):
        nesterov_ag_coefficients(lr, m, dtype, device="tpu")


@settings(max_examples=300, deadline=None)
@given(dtype=st.sampled_from(DTYPES), lr=lr_values, m=momentum_values,
       kind_lr=st.sampled_from(SCALAR_KINDS + ["int"]), kind_m=st.sampled_from(SCALAR_KINDS + ["int"]))
def test_coefficients_match_numpy1(dtype, lr, m, kind_lr, kind_m):
    lr = int(lr) if kind_lr == "int" else as_scalar(lr, kind_lr)
    m = int(m) if kind_m == "int" else as_scalar(m, kind_m)
    got = nesterov_ag_coefficients(lr, m, dtype)
    exp = numpy1_coefficients(lr, m, dtype)
    for name, a, b in zip(("lr", "m", "mm", "c"), got, exp):
        assert type(a) is type(b), name
        assert bits(a) == bits(b), (name, a, b)


def test_coefficients_numpy1_promotion():
    """Mixed scalar types promote as on NumPy 1.x: a Python float is float64."""
    m32 = np.float32(0.9)
    c = nesterov_ag_coefficients(0.01, m32, np.float64)[3]
    assert c == np.float64(np.float64(1) + np.float64(m32)) * 0.01
    # NEP 50 would have computed (1 + m32) * 0.01 in float32:
    assert c != np.float64(np.float32(np.float32(1) + m32) * np.float32(0.01))


def test_coefficients_round_once():
    """mm is m*m in double rounded once, not float32(m)*float32(m)."""
    m = 0.9
    mm = nesterov_ag_coefficients(0.01, m, np.float32)[2]
    assert mm == np.float32(0.81)
    assert mm != np.float32(m) * np.float32(m)


def test_supported_dtypes():
    assert set(SUPPORTED_DTYPES) == {F16, F32, F64}
    assert hasattr(cynag_kernels, "nesterov_ag_cpu")


# ---------------------------------------------------------------------------
# Argument checks: errors name the array and nothing is written
# ---------------------------------------------------------------------------
def _snapshot(*arrays):
    return [(a.dtype.str, a.shape, a.tobytes()) if isinstance(a, np.ndarray) else None
            for a in arrays]


def _assert_unchanged(arrays, before):
    assert _snapshot(*arrays) == before


def _fresh(dtype=F32, shape=(4, 5), seed=0):
    rng = np.random.default_rng(seed)
    return [random_values(rng, shape, dtype) for _ in range(3)]


def _bad_cases():
    """(id, builder returning (param, grad, v), exception type, name in message)."""
    cases = []

    def replace(i, value_fn, dtype=F32):
        def build():
            arrs = _fresh(dtype)
            arrs[i] = value_fn(arrs[i])
            return arrs
        return build

    names = ("param", "grad", "v")
    for i, name in enumerate(names):
        cases.append(("%s-list" % name, replace(i, lambda a: a.tolist()), TypeError, name))
        cases.append(("%s-scalar" % name, replace(i, lambda a: np.float32(1.0)), TypeError, name))
        cases.append(("%s-None" % name if i == 0 else "%s-memoryview" % name,
                      replace(i, (lambda a: None) if i == 0 else (lambda a: memoryview(a))),
                      TypeError, name))
    # unsupported dtypes on param (all three arrays of the same bad dtype)
    for bad in ["int32", "int64", "uint16", "bool", "complex64", "complex128", ">f4", ">f8", ">f2",
                "longdouble"]:
        if np.dtype(bad) in SUPPORTED_DTYPES:
            continue  # longdouble == float64 on some platforms

        def build(bad=bad):
            return [a.astype(bad) for a in _fresh(F64)]
        cases.append(("dtype-%s" % bad, build, TypeError, "param"))
    # dtype mismatch with param
    for i in (1, 2):
        for other in ["float64", "float16", ">f4", "int32"]:
            cases.append(("%s-dtype-%s" % (names[i], other),
                          replace(i, lambda a, o=other: a.astype(o)), TypeError, names[i]))
    # shape mismatch
    for i in (1, 2):
        cases.append(("%s-shape-T" % names[i], replace(i, lambda a: a.T.copy()), ValueError, names[i]))
        cases.append(("%s-shape-flat" % names[i], replace(i, lambda a: a.ravel()), ValueError, names[i]))
        cases.append(("%s-shape-0d" % names[i], replace(i, lambda a: np.array(a.flat[0])),
                      ValueError, names[i]))
    # read-only param or v

    def readonly(i):
        def build():
            arrs = _fresh()
            arrs[i].flags.writeable = False
            return arrs
        return build
    cases.append(("param-readonly", readonly(0), ValueError, "param"))
    cases.append(("v-readonly", readonly(2), ValueError, "v"))

    def readonly_view(i):
        def build():
            arrs = _fresh()
            arrs[i] = np.broadcast_to(arrs[i][:1], arrs[i].shape)
            return arrs
        return build
    cases.append(("param-broadcast", readonly_view(0), ValueError, "param"))
    cases.append(("v-broadcast", readonly_view(2), ValueError, "v"))

    # overlapping memory
    def overlap(kind):
        def build():
            p, g, v = _fresh(shape=(20,))
            buf = np.concatenate([p, v])
            if kind == "param-is-v":
                return [p, g, p]
            if kind == "param-is-grad":
                return [p, p, v]
            if kind == "v-is-grad":
                return [p, v, v]
            if kind == "param-view-v":
                return [p, g, p.view()]
            if kind == "param-reversed-grad":
                return [p, p[::-1], v]
            if kind == "shifted":
                return [buf[:20], g, buf[1:21]]
            if kind == "strided-overlap":
                return [buf[0:40:2], g, buf[2:40:2]]
            if kind == "same-buffer-2d":
                b = np.arange(30, dtype=np.float32).reshape(5, 6)
                return [b[:, :4], b[:, 2:6].copy(), b[:, 1:5]]
            raise AssertionError(kind)
        return build
    for kind, first, second in [("param-is-v", "param", "v"), ("param-is-grad", "param", "grad"),
                                ("v-is-grad", "grad", "v"), ("param-view-v", "param", "v"),
                                ("param-reversed-grad", "param", "grad"), ("shifted", "param", "v"),
                                ("strided-overlap", "param", "v"),
                                ("same-buffer-2d", "param", "v")]:
        cases.append(("overlap-" + kind, overlap(kind), ValueError, first))
        cases.append(("overlap-" + kind + "-second", overlap(kind), ValueError, second))
    return cases


BAD_CASES = _bad_cases()


@pytest.mark.parametrize("build,exc,name", [c[1:] for c in BAD_CASES],
                         ids=[c[0] for c in BAD_CASES])
def test_bad_arguments_raise_and_write_nothing(build, exc, name):
    arrays = build()
    before = _snapshot(*arrays)
    with pytest.raises(exc, match=r"\b%s\b" % name):
        check_nesterov_ag_arrays(*arrays)
    _assert_unchanged(arrays, before)
    for num_threads in (None, 1, 2):
        with pytest.raises(exc, match=r"\b%s\b" % name):
            nesterov_ag_cpu(*arrays, 0.1, 0.9, num_threads=num_threads)
        _assert_unchanged(arrays, before)


def test_check_accepts_missing_grad_or_v():
    p, g, v = _fresh()
    check_nesterov_ag_arrays(p, None, None)
    check_nesterov_ag_arrays(p, g, None)
    check_nesterov_ag_arrays(p, None, v)
    with pytest.raises(TypeError, match=r"\bv\b"):
        check_nesterov_ag_arrays(p, None, v.astype(np.float64))
    with pytest.raises(ValueError, match=r"\bgrad\b"):
        check_nesterov_ag_arrays(p, g.T.copy(), None)
    with pytest.raises(ValueError, match=r"\bv\b"):
        check_nesterov_ag_arrays(p, None, p)


@pytest.mark.parametrize("p_dtype,v_dtype", [(np.float32, np.float16), (np.float16, np.float32),
                                              (np.float64, np.float16), (np.float32, np.float64)])
def test_mixed_v_dtype_runs_numpys_lines(p_dtype, v_dtype):
    # A v kept across a switch of use_fp32_update: NumPy's own mixed
    # arithmetic, in Chainer's order (the arrays as the rule's lines leave them).
    rng = np.random.RandomState(7)
    p, g = rng.randn(3, 5).astype(p_dtype), rng.randn(3, 5).astype(p_dtype)
    v = rng.randn(3, 5).astype(v_dtype)
    ep, ev = p.copy(), v.copy()
    ev *= 0.9
    ev -= 0.05 * g
    ep += 0.9 * 0.9 * ev
    ep -= (1 + 0.9) * 0.05 * g
    check_nesterov_ag_arrays(p, g, v, v_any_float=True)
    with pytest.raises(TypeError, match=r"\bv has dtype\b"):
        check_nesterov_ag_arrays(p, g, v)
    cynag_kernels.nesterov_ag_mixed(p, g, v, 0.05, 0.9)
    assert p.dtype == p_dtype and v.dtype == v_dtype
    assert p.tobytes() == ep.tobytes() and v.tobytes() == ev.tobytes()


@pytest.mark.parametrize("v", [np.zeros(4, np.int32), np.zeros(5, np.float16),
                               np.zeros(4, ">f2"), np.zeros(4, np.complex64)])
def test_mixed_v_dtype_refuses_what_numpy_cannot_update(v):
    p, g = np.ones(4, np.float32), np.ones(4, np.float32)
    before = v.copy()
    with pytest.raises((TypeError, ValueError), match=r"\bv\b"):
        cynag_kernels.nesterov_ag_mixed(p, g, v, 0.05, 0.9)
    assert (p == 1).all() and v.tobytes() == before.tobytes()


@pytest.mark.parametrize("grad,lr", [(None, 0.05), ("g", None), ("g", "0.05"),
                                     ("g", np.ones(2))])
def test_mixed_refuses_before_writing(grad, lr):
    p, v = np.ones(4, np.float16), np.ones(4, np.float32)
    g = np.ones(4, np.float16) if grad == "g" else None
    with pytest.raises(TypeError):
        cynag_kernels.nesterov_ag_mixed(p, g, v, lr, 0.9)
    assert (p == 1).all() and (v == 1).all()


@pytest.mark.parametrize("scalar", [float, np.float32, np.float64])
def test_mixed_combines_scalars_as_numpy_1(scalar):
    # The expressions are NumPy scalars' (m * m, (1 + m) * lr), each rounded
    # once to the array's dtype where it meets an array: NumPy 1.x's rule,
    # whichever NumPy runs (NumPy 2 would keep a float32 scalar float32).
    lr, m = scalar(0.1), scalar(0.9)
    p, g, v = np.full(3, 1.5, np.float16), np.full(3, 0.3, np.float16), np.full(3, 0.2, np.float32)
    ep, ev = p.copy(), v.copy()
    ev *= float(m)
    ev -= float(lr) * g
    ep += float(m * m) * ev
    ep -= float((1 + m) * lr) * g
    cynag_kernels.nesterov_ag_mixed(p, g, v, lr, m)
    assert p.tobytes() == ep.tobytes() and v.tobytes() == ev.tobytes()


def test_check_accepts_good_arrays_and_subclasses():
    p, g, v = _fresh()
    check_nesterov_ag_arrays(p, g, v)
    check_nesterov_ag_arrays(np.asmatrix(p), np.asmatrix(g), np.asmatrix(v))
    # empty arrays from one buffer share no element: accepted
    buf = np.zeros(10, np.float32)
    check_nesterov_ag_arrays(buf[3:3], buf[3:3], buf[5:5])
    nesterov_ag_cpu(buf[3:3], buf[3:3], buf[5:5], 0.1, 0.9)
    assert not buf.any()


def _masked(x):
    return np.ma.masked_array(x, mask=np.zeros(x.shape, bool))


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
@pytest.mark.parametrize("wrap", [np.asmatrix, _masked], ids=["matrix", "masked"])
@pytest.mark.parametrize("role", ["param", "grad", "v", "all"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_ndarray_subclasses_run_numpys_lines(wrap, role, dtype):
    # A matrix multiplies by a scalar through dot() (in float64 for a Python
    # float), a masked array through its own operators: Chainer's four lines
    # on the objects themselves, not the kernel's float32 arithmetic.
    rng = np.random.RandomState(3)
    arrays = [rng.randn(3, 4).astype(dtype) for _ in range(3)]
    arrays = [wrap(a) if role in (name, "all") else a
              for name, a in zip(("param", "grad", "v"), arrays)]
    p, g, v = arrays
    ep, ev = p.copy(), v.copy()
    ev *= 0.9
    ev -= 0.05 * g
    ep += 0.9 * 0.9 * ev
    ep -= (1 + 0.9) * 0.05 * g
    nesterov_ag_cpu(p, g, v, 0.05, 0.9)
    assert type(p) is type(ep) and type(v) is type(ev)
    assert np.asarray(p).tobytes() == np.asarray(ep).tobytes()
    assert np.asarray(v).tobytes() == np.asarray(ev).tobytes()


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_matrix_gradient_differs_from_the_kernels_arithmetic():
    # (Why the lines above are needed: the kernel's float32 result is another.)
    p, g, v = (np.full((1, 2), x, np.float32) for x in (0.2857143, 0.6666667, -0.06))
    ep, ev = p.copy(), v.copy()
    nesterov_ag_cpu(ep, g, ev, 0.1, 0.9)
    nesterov_ag_cpu(p, np.asmatrix(g), v, 0.1, 0.9)
    assert p.tobytes() != ep.tobytes() or v.tobytes() != ev.tobytes()


def test_check_false_skips_validation_but_updates():
    p, g, v = _fresh()
    p_exp, v_exp = p.copy(), v.copy()
    nesterov_ag_cpu(p, g, v, 0.1, 0.9, check=False)
    nesterov_ag_numpy(p_exp, g, v_exp, 0.1, 0.9)
    assert_same_bits(p, p_exp)
    assert_same_bits(v, v_exp)


@pytest.mark.parametrize("dtype,view", [(F16, np.uint16), (F32, np.float32), (F64, np.float64)])
def test_entry_points_reject_length_mismatch(dtype, view):
    a = np.zeros(8, dtype).view(view)
    b = np.zeros(7, dtype).view(view)
    with pytest.raises(ValueError):
        _nesterov_cpu.nesterov_ag_contiguous(a, b, a.copy(), 0.1, 0.9, 0.81, 0.19, 1)
    with pytest.raises(ValueError):
        _nesterov_cpu.nesterov_ag_contiguous(a, a.copy(), b, 0.1, 0.9, 0.81, 0.19, 1)
    a2 = np.zeros((2, 4), dtype).view(view)
    b2 = np.zeros((4, 2), dtype).view(view)
    with pytest.raises(ValueError):
        _nesterov_cpu.nesterov_ag_strided(a2, b2, a2.copy(), 0.1, 0.9, 0.81, 0.19, 1)
    with pytest.raises(ValueError):
        _nesterov_cpu.nesterov_ag_strided(a2, a2.copy(), b2, 0.1, 0.9, 0.81, 0.19, 2)


@pytest.mark.skipif(np.finfo(np.longdouble).nmant <= np.finfo(np.float64).nmant,
                    reason="long double is double on this platform")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("which", ["lr", "momentum"])
def test_zero_d_with_a_long_double_hyperparameter_runs_in_long_double(dtype, which):
    """0-d arrays are scalars to NumPy 1.x: with a long double hyperparameter
    Chainer's four operations run in long double, each stored to the dtype."""
    rng = np.random.default_rng(7)
    for _ in range(50):
        p0, g0, v0 = (dtype(x) for x in rng.standard_normal(3))
        lr, m = 0.1, 0.9
        if which == "lr":
            lr = np.longdouble(lr) / np.longdouble(3)
        else:
            m = np.longdouble(m) / np.longdouble(3)
        param, grad, v = np.array(p0), np.array(g0), np.array(v0)
        nesterov_ag_cpu(param, grad, v, lr, m)
        ep, eg, ev = np.array(p0), np.array(g0), np.array(v0)
        lr_s = np.float64(lr) if isinstance(lr, float) else lr
        m_s = np.float64(m) if isinstance(m, float) else m
        ev *= m_s  # Chainer's lines (strong NumPy scalars: either NumPy's result)
        ev -= lr_s * eg
        ep += m_s * m_s * ev
        ep -= (np.int64(1) + m_s) * lr_s * eg
        assert_same_bits(v, ev, "v")
        assert_same_bits(param, ep, "param")
