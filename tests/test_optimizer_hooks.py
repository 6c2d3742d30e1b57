"""cynag.optimizer_hooks and the native operations behind them.

* Attributes (``name``, ``timing``, ``call_for_each_param``) are Chainer
  7.8.1's (written out here: this environment has no Chainer; the parity
  cases of ``chainer_hook_cases.py`` compare them with the real classes).
* Construction refuses negative, NaN, infinite, boolean and non-numeric
  coefficients, ``lower_bound > upper_bound`` and two ``None`` bounds.
* Kernel level: :func:`cynag_kernels.hooks.apply_ops` against an oracle of
  NumPy 1.x's arithmetic written below with explicit casts (the coefficient
  rounded to the type value-based casting picks, every operation rounded),
  for float16/32/64, every memory layout, 0-d and empty arrays, NaN, signed
  zeros, infinities and coefficients that make NumPy 1.x compute in a wider
  type; :func:`sum_squares` against an exact float64 sum.
* Optimizer level: every hook on a cynag model, as an optimizer hook and as
  a rule hook, 'pre' and 'post', with and without static loss scaling,
  against the same optimizer with an explicitly computed hook in its place;
  folded (multi-tensor) against ``use_multi_tensor(False)`` bit for bit for
  many hook orders on models with mixed dtypes, frozen and hooked
  parameters, also through dynamic loss scaling steps that are skipped;
  GradientNoise reproduced from ``numpy.random.seed``; bad input still
  leaves everything unchanged.

A few tests below fail on purpose: each pins one difference from Chainer /
NumPy 1.x found while writing these tests (see their docstrings).  The broad
property tests keep clear of exactly those inputs (``_known_difference``) so
that every difference fails one test, its own.
"""
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cynag
from cynag import Chain, Link, Parameter
from cynag import optimizer_hooks as H
from cynag import functional
from cynag._multi_tensor import foldable_suffix
from cynag.optimizers import NesterovAG
from cynag_kernels import hooks as K

from test_multi_tensor import _Init

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
DTYPES = [F16, F32, F64]
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def bits(a):
    a = np.ascontiguousarray(a)
    return a.reshape(-1).view(_UINT[a.dtype.itemsize])


def assert_bits(expected, actual, label=""):
    """Bit-identical arrays; any NaN matches any NaN (payloads are not compared)."""
    e, a = np.asarray(expected), np.asarray(actual)
    assert e.dtype == a.dtype and e.shape == a.shape, (label, e.dtype, e.shape, a.dtype,
                                                         a.shape)
    same = bits(e) == bits(a)
    same |= np.isnan(e).reshape(-1) & np.isnan(a).reshape(-1)
    if not same.all():
        i = int(np.flatnonzero(~same)[0])
        raise AssertionError("%s: %d of %d elements differ; first at flat %d: expected %r, "
                             "got %r" % (label, int((~same).sum()), e.size, i,
                                         e.reshape(-1)[i], a.reshape(-1)[i]))


# ---------------------------------------------------------------------------
# Attributes and construction
# ---------------------------------------------------------------------------
# Chainer 7.8.1's class attributes (chainer/optimizer_hooks/*.py).  Chainer's
# GradientClipping has no call_for_each_param: the optimizer reads it with
# getattr(hook, 'call_for_each_param', False).
CHAINER_ATTRIBUTES = {
    "WeightDecay": ("WeightDecay", "pre", True),
    "Lasso": ("Lasso", "pre", True),
    "GradientHardClipping": ("GradientHardClipping", "pre", True),
    "GradientNoise": ("GradientNoise", "pre", True),
    "GradientClipping": ("GradientClipping", "pre", False),
    "GradientLARS": ("GradientLARS", "pre", True),
}


def _instances():
    return {
        "WeightDecay": H.WeightDecay(1e-4),
        "Lasso": H.Lasso(1e-4),
        "GradientHardClipping": H.GradientHardClipping(-1.0, 1.0),
        "GradientNoise": H.GradientNoise(0.01),
        "GradientClipping": H.GradientClipping(1.0),
        "GradientLARS": H.GradientLARS(),
    }


@pytest.mark.parametrize("cls_name", sorted(CHAINER_ATTRIBUTES))
def test_attributes_are_chainers(cls_name):
    name, timing, each = CHAINER_ATTRIBUTES[cls_name]
    cls = getattr(H, cls_name)
    for obj in (cls, _instances()[cls_name]):
        assert obj.name == name
        assert obj.timing == timing
        assert getattr(obj, "call_for_each_param", False) is each
    assert cls_name in H.__all__


def test_constructor_values_and_defaults_as_chainer():
    assert H.WeightDecay(0.25).rate == 0.25
    r = np.float32(0.5)
    assert H.Lasso(r).rate is r                       # kept as given, as Chainer does
    h = H.GradientHardClipping(None, 2)
    assert h.lower_bound is None and h.upper_bound == 2
    n = H.GradientNoise(0.3)
    assert n.eta == 0.3 and n.noise_func is H.exponential_decay_noise
    assert H.GradientClipping(5).threshold == 5
    lars = H.GradientLARS()
    assert (lars.threshold, lars.weight_decay, lars.eps) == (1e-2, 0.0, 1e-9)
    lars = H.GradientLARS(threshold=0.5, weight_decay=1e-3, eps=1e-6)
    assert (lars.threshold, lars.weight_decay, lars.eps) == (0.5, 1e-3, 1e-6)
    # Boundary values that are valid.
    H.WeightDecay(0.0), H.Lasso(0), H.GradientClipping(0.0), H.GradientNoise(0.0)
    H.GradientHardClipping(-np.inf, np.inf), H.GradientHardClipping(1.0, 1.0)
    H.GradientHardClipping(-np.inf, None), H.GradientHardClipping(None, np.float64(-3))
    H.WeightDecay(np.float16(1e-3)), H.WeightDecay(np.int64(2))
    # A 0-d array, which Chainer takes too, is used as the scalar it holds.
    for make, attr in [(H.WeightDecay, "rate"), (H.Lasso, "rate"), (H.GradientNoise, "eta"),
                       (H.GradientClipping, "threshold"), (H.GradientLARS, "threshold")]:
        value = getattr(make(np.array(0.125, np.float32)), attr)
        assert type(value) is np.float32 and value == 0.125
    h = H.GradientHardClipping(np.array(-1.0), np.array(2))
    assert type(h.lower_bound) is np.float64 and type(h.upper_bound) is np.int64


_BAD_NUMBERS = [(-1e-3, ValueError), (-1, ValueError), (float("nan"), ValueError),
                (np.float32("nan"), ValueError), (float("inf"), ValueError),
                (-float("inf"), ValueError), (True, TypeError), (np.bool_(False), TypeError),
                ("0.1", TypeError), (None, TypeError), ([0.1], TypeError),
                (np.array([0.1]), TypeError), (1j, TypeError), (np.array(-0.5), ValueError),
                (np.array(True), TypeError), (np.array(0.5 + 0j), TypeError)]


def _constructors():
    yield "WeightDecay", lambda v: H.WeightDecay(v)
    yield "Lasso", lambda v: H.Lasso(v)
    yield "GradientNoise", lambda v: H.GradientNoise(v)
    yield "GradientClipping", lambda v: H.GradientClipping(v)
    yield "GradientLARS.threshold", lambda v: H.GradientLARS(threshold=v)
    yield "GradientLARS.weight_decay", lambda v: H.GradientLARS(weight_decay=v)
    yield "GradientLARS.eps", lambda v: H.GradientLARS(eps=v)


@pytest.mark.parametrize("value,error", _BAD_NUMBERS, ids=[repr(v) for v, _ in _BAD_NUMBERS])
@pytest.mark.parametrize("what,make", list(_constructors()), ids=[w for w, _ in _constructors()])
def test_bad_coefficients_refused(what, make, value, error):
    with pytest.raises(error, match=what.split(".")[0]):
        make(value)


@pytest.mark.parametrize("lo,hi,error", [
    (None, None, ValueError),
    (1.0, -1.0, ValueError),
    (0.5, 0.25, ValueError),
    (np.inf, -np.inf, ValueError),
    (float("nan"), 1.0, ValueError),
    (-1.0, float("nan"), ValueError),
    (True, 1.0, TypeError),
    (-1.0, np.bool_(True), TypeError),
    ("-1", 1.0, TypeError),
    (-1.0, "1", TypeError),
    (-1.0, [1.0], TypeError),
])
def test_bad_bounds_refused(lo, hi, error):
    with pytest.raises(error, match="GradientHardClipping"):
        H.GradientHardClipping(lo, hi)


def test_bad_noise_func_refused():
    with pytest.raises(TypeError, match="GradientNoise"):
        H.GradientNoise(0.1, noise_func=3)


def test_gradient_clipping_is_not_a_rule_hook():
    """As in Chainer: GradientClipping is called with the optimizer only."""
    p = Parameter(np.ones(3, np.float32))
    p.grad = np.ones(3, np.float32)
    opt = NesterovAG().setup(_single_link(p))
    p.update_rule.add_hook(H.GradientClipping(1.0))
    with pytest.raises(TypeError):
        opt.update()


# ---------------------------------------------------------------------------
# The NumPy 1.x oracle (written independently of cynag_kernels.hooks)
# ---------------------------------------------------------------------------
def strong(x):
    """A coefficient as NumPy 1.x types it: Python float -> float64, int -> int64."""
    if isinstance(x, bool):
        return np.int64(x)
    if isinstance(x, int):
        return np.int64(x)
    if isinstance(x, float):
        return np.float64(x)
    return x


def numpy1_min_scalar_type(x):
    """``numpy.min_scalar_type`` of NumPy 1.x, for the scalars hooks meet.

    Floats: float16 if ``-65000 < x < 65000``, float32 if ``-3.4e38 < x <
    3.4e38``, else float64 (NaN and infinities included).  Integers: the
    smallest (unsigned first) integer type that holds the value.
    """
    s = strong(x)
    if isinstance(s, np.floating):
        v = float(s)
        if -65000 < v < 65000:
            return F16
        if -3.4e38 < v < 3.4e38:
            return F32
        return F64
    v = int(s)
    for t in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64,
              np.int64):
        info = np.iinfo(t)
        if info.min <= v <= info.max:
            return np.dtype(t)
    raise ValueError(v)


def numpy1_type(x, dtype, zero_dim):
    """The type NumPy 1.x computes ``x * array`` (or ``array op x``) in.

    An array of at least one dimension: value-based casting (the array's
    float type unless the value needs a wider one).  A 0-d array counts as a
    scalar: ordinary promotion of the two scalar types.
    """
    dtype = np.dtype(dtype)
    if zero_dim:
        return np.promote_types(np.asarray(strong(x)).dtype, dtype)
    return np.promote_types(numpy1_min_scalar_type(x), dtype)


def np1_sign(x):
    """numpy.sign: 1, -1, +0 for either zero, NaN for NaN."""
    one = np.ones_like(x)
    out = np.where(x > 0, one, np.where(x < 0, -one, np.where(x == x, 0 * one, x)))
    return out.astype(x.dtype)


def np1_max(x, b, strict):
    """NumPy 1.26's maximum / clip lower bound: float16 loops keep x when equal
    (x >= b), the float32/float64 (SIMD) loops take b (x > b); NaN x stays."""
    keep = (x > b) if strict else (x >= b)
    return np.where(np.isnan(x) | keep, x, b)


def np1_min(x, b, strict):
    keep = (x < b) if strict else (x <= b)
    return np.where(np.isnan(x) | keep, x, b)


def oracle_op(g, p, op):
    """``op`` applied to a copy of ``g`` as Chainer's hook code computes it on NumPy 1.x."""
    dtype = g.dtype
    zero_dim = g.ndim == 0
    kind = op[0]
    with np.errstate(all="ignore"):
        if kind == "add":
            return (g + np.asarray(op[1])).astype(dtype)
        if kind == "clip":
            lo, hi = op[1], op[2]
            w = dtype
            for b in (lo, hi):
                if b is not None:
                    w = np.promote_types(w, numpy1_type(b, dtype, zero_dim))
            x = g.astype(w)
            strict = w != F16
            if lo is not None:
                x = np1_max(x, w.type(strong(lo)), strict)
            if hi is not None:
                x = np1_min(x, w.type(strong(hi)), strict)
            return x.astype(dtype)
        c = op[1]
        w = numpy1_type(c, dtype, zero_dim)
        cw = w.type(strong(c))
        gw = g.astype(w)
        if kind == "weight_decay":
            t = (cw * p.astype(w)).astype(w)
            return (gw + t).astype(w).astype(dtype)
        if kind == "lasso":
            t = (cw * np1_sign(p).astype(w)).astype(w)
            return (gw + t).astype(w).astype(dtype)
        if kind == "scale":
            return (gw * cw).astype(w).astype(dtype)
    raise ValueError(kind)


def oracle_ops(g, p, ops):
    g = np.array(g, copy=True)
    for op in ops:
        g = np.asarray(oracle_op(g, p, op))
    return g


def _known_difference(dtype, ndim, op):
    """True for the inputs on which cynag differs from NumPy 1.x (each pinned by a
    failing test of its own below); the property tests avoid them."""
    dtype = np.dtype(dtype)
    kind = op[0]
    if kind == "clip":
        with np.errstate(all="ignore"):
            if ndim == 0:
                # test_zero_dim_gradients_as_numpy1: a nonzero bound that is zero
                # in the dtype
                return any(b is not None and b != 0 and dtype.type(strong(b)) == 0
                           for b in op[1:])
            # test_clip_float16_signed_zeros_as_numpy1: a bound that is zero in float16
            return dtype == F16 and any(
                b is not None and F16.type(strong(b)) == 0 for b in op[1:])
    if kind == "add":
        return False
    c = strong(op[1])
    if not np.isfinite(np.float64(c)):
        return False            # computed in any float type, the same specials
    if ndim == 0:
        # test_zero_dim_gradients_as_numpy1
        return numpy1_type(c, dtype, True) != F64
    # test_integer_coefficients_promote_as_numpy1,
    # test_float_coefficients_near_the_type_limits_as_numpy1
    return numpy1_type(c, dtype, False) != cynag_assumed_type(c, dtype)


def cynag_assumed_type(c, dtype):
    """The type cynag computes ``c * array`` in (ndim >= 1): the dtype unless the
    value overflows it (then float32 for float16 where it fits, else float64)."""
    with np.errstate(all="ignore"):
        for t in ((dtype, F32, F64) if dtype == F16 else (dtype, F64)):
            if np.isfinite(t.type(strong(c))):
                return t
    return F64


# ---------------------------------------------------------------------------
# Kernel level: apply_ops
# ---------------------------------------------------------------------------
SPECIALS = [0.0, -0.0, np.nan, np.inf, -np.inf, 1.0, -1.0, 5e-324, 1e-40, 1e-7, 65504.0,
            3e38, 1e300]


def special_values(rng, n, dtype):
    x = rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 3, n)
    mask = rng.random(n) < 0.25
    x[mask] = rng.choice(SPECIALS, int(mask.sum()))
    with np.errstate(all="ignore"):
        return x.astype(dtype)


def layout(a, kind):
    """``a``'s values in the memory layout ``kind`` (same shape)."""
    if kind == "C" or a.ndim == 0:
        return np.array(a, copy=True, order="C")
    if kind == "F":
        return np.array(a, copy=True, order="F")
    if kind == "strided":   # every other element of a bigger buffer
        buf = np.zeros((2,) + a.shape, a.dtype)
        buf = np.moveaxis(buf, 0, -1)
        v = buf[..., 0]
        v[...] = a
        return v
    if kind == "reversed":  # negative strides
        buf = np.empty_like(a)
        v = buf[tuple(slice(None, None, -1) for _ in a.shape)]
        v[...] = a
        return v
    raise ValueError(kind)


COEFFICIENTS = [0.0, 1e-4, 5e-4, 0.1, 1.0, 3.0, 1e5, 70000.0, 1e39, 1e300, 2, 100,
                np.float64(0.3), np.float32(0.7), np.float32(1e5), np.float16(0.01),
                np.int64(3), 4.9e-324, 1e-45]
BOUNDS = [(-1.0, 1.0), (-0.0, 0.0), (0.0, -0.0), (0.0, 0.0), (None, 0.5), (-0.5, None),
          (-1e39, 1e39), (-np.inf, 2.0), (-7e4, 7e4), (-1e-3, 1e-3), (-3, 3),
          (np.float32(-0.25), np.float64(0.75)), (-np.inf, np.inf)]
SHAPES = [(37,), (3, 5), (2, 3, 4), (), (0,), (3, 0), (2100,)]


def _all_ops():
    ops = []
    for c in COEFFICIENTS:
        ops += [("weight_decay", c), ("lasso", c), ("scale", c)]
    ops += [("clip", lo, hi) for lo, hi in BOUNDS]
    return ops


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_apply_ops_single_operations_match_numpy1(dtype, shape):
    rng = np.random.default_rng([len(shape), int(np.prod(shape)), dtype.itemsize])
    n = int(np.prod(shape))
    checked = 0
    for op in _all_ops():
        if _known_difference(dtype, len(shape), op):
            continue
        g = special_values(rng, n, dtype).reshape(shape)
        p = special_values(rng, n, dtype).reshape(shape)
        expected = oracle_ops(g, p, [op])
        got = np.array(g, copy=True)
        with np.errstate(all="ignore"):
            K.apply_ops(got, p, [op])
        assert_bits(expected, got, "%s %s %s" % (dtype, shape, op))
        checked += 1
    assert checked > 40


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("g_layout", ["C", "F", "strided", "reversed"])
@pytest.mark.parametrize("p_layout", ["C", "F", "strided"])
def test_apply_ops_programs_in_any_layout(dtype, g_layout, p_layout):
    """A program of several operations on arrays of any layout: in place, as the
    NumPy operations one after the other."""
    rng = np.random.default_rng(11)
    ops = [("weight_decay", 0.01), ("clip", -2.0, 2.0), ("lasso", 1e-3), ("scale", 0.75),
           ("weight_decay", 1e39), ("clip", None, 1.5)]
    for shape in [(5, 7), (3, 4, 6), (1, 9), (4100,)]:
        g0 = special_values(rng, int(np.prod(shape)), dtype).reshape(shape)
        p0 = special_values(rng, int(np.prod(shape)), dtype).reshape(shape)
        g, p = layout(g0, g_layout), layout(p0, p_layout)
        p_before = p.copy()
        with np.errstate(all="ignore"):
            K.apply_ops(g, p, ops)               # in place, whatever the layout
        assert_bits(oracle_ops(g0, p0, ops), g, "%s %s/%s %s" % (
            dtype, g_layout, p_layout, shape))
        assert_bits(p_before, p, "p unchanged")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_ops_add_noise_and_aliasing(dtype):
    rng = np.random.default_rng(5)
    g = special_values(rng, 300, dtype)
    x = special_values(rng, 300, dtype)
    got = g.copy()
    with np.errstate(all="ignore"):
        K.apply_ops(got, None, [("scale", 0.5), ("add", x), ("clip", -1.0, None)])
    assert_bits(oracle_ops(g, None, [("scale", 0.5), ("add", x), ("clip", -1.0, None)]), got)
    # p is g itself: NumPy reads the whole of p before writing g (a temporary).
    g = special_values(rng, 300, dtype)
    expected = oracle_ops(g, g.copy(), [("weight_decay", 0.5)])
    with np.errstate(all="ignore"):
        K.apply_ops(g, g, [("weight_decay", 0.5)])
    assert_bits(expected, g)
    # Noise that does not broadcast to the gradient is refused, naming it; noise
    # of another dtype is added as NumPy 1.x adds it (see the GradientNoise tests).
    with pytest.raises(ValueError, match="noise"):
        K.apply_ops(np.zeros(3, dtype), None, [("add", np.zeros(4, dtype))])
    other = F64 if dtype != F64 else F32
    g = np.zeros(3, dtype)
    K.apply_ops(g, None, [("add", np.full(3, 0.25, other))])
    assert_bits(np.full(3, 0.25, dtype), g)


def test_apply_ops_refuses_other_dtypes_and_empty_programs_do_nothing():
    for dt in (np.int32, np.complex64, np.bool_):
        with pytest.raises(TypeError):
            K.apply_ops(np.zeros(3, dt), np.zeros(3, dt), [("scale", 0.5)])
    g = np.arange(4, dtype=np.float32)
    K.apply_ops(g, None, [])
    assert g.tolist() == [0, 1, 2, 3]
    K.apply_ops(np.zeros(0, np.float32), np.zeros(0, np.float32), [("weight_decay", 1.0)])


def test_apply_ops_read_only_gradient_raises_and_is_not_written():
    g = np.ones(5, np.float32)
    g.flags.writeable = False
    with pytest.raises(ValueError):
        K.apply_ops(g, np.ones(5, np.float32), [("weight_decay", 1.0)])
    assert g.tolist() == [1.0] * 5
    g2 = np.ones(10, np.float32)[::2]
    g2.flags.writeable = False
    with pytest.raises(ValueError):
        K.apply_ops(g2, None, [("scale", 3.0)])
    assert g2.tolist() == [1.0] * 5


_FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, 0.5, 1e-4, 3.0, 65504.0, 65520.0, 1e5, 3e38, 3.5e38,
                     1e39, 1e300, 5e-324, 1e-8]),
    st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False),
    st.floats(min_value=0.0, max_value=1e300, allow_nan=False, allow_infinity=False),
)
_COEF = st.one_of(
    _FLOATS,
    _FLOATS.map(np.float64),
    _FLOATS.filter(lambda v: v < 3.4e38).map(np.float32),
    st.integers(0, 127),
    st.integers(0, 10 ** 6),
)
_BOUND = st.one_of(st.none(), st.floats(-1e40, 1e40, allow_nan=False), st.sampled_from(
    [0.0, -0.0, np.inf, -np.inf, 1.0, -1.0]), st.integers(-300, 300))


@st.composite
def _op(draw):
    kind = draw(st.sampled_from(["weight_decay", "lasso", "scale", "clip"]))
    if kind != "clip":
        return (kind, draw(_COEF))
    lo, hi = draw(_BOUND), draw(_BOUND)
    if lo is None and hi is None:
        hi = 1.0
    if lo is not None and hi is not None and lo > hi:
        lo, hi = hi, lo
    return ("clip", lo, hi)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(dtype=st.sampled_from(DTYPES), shape=st.sampled_from(SHAPES),
       ops=st.lists(_op(), min_size=1, max_size=4), seed=st.integers(0, 2 ** 32 - 1),
       g_layout=st.sampled_from(["C", "F", "strided", "reversed"]))
def test_apply_ops_property(dtype, shape, ops, seed, g_layout):
    if any(_known_difference(dtype, len(shape), op) for op in ops):
        return
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    g0 = special_values(rng, n, dtype).reshape(shape)
    p = special_values(rng, n, dtype).reshape(shape)
    g = layout(g0, g_layout)
    with np.errstate(all="ignore"):
        K.apply_ops(g, p, ops)
    assert_bits(oracle_ops(g0, p, ops), g, "%s %s %s" % (dtype, shape, ops))


def test_op_row_rounds_the_coefficient_to_the_dtype():
    for dtype in DTYPES:
        code, a, _, _ = K.op_row(dtype, ("weight_decay", 0.1))
        assert code == K.OP_CODES["weight_decay"] and a == float(dtype.type(0.1))
        code, lo, hi, flags = K.op_row(dtype, ("clip", None, 0.3))
        assert (lo, hi, flags) == (0.0, float(dtype.type(0.3)), 2.0)
    assert K.op_row(F32, ("scale", 1e39)) is None     # NumPy 1.x: float64
    assert K.op_row(F16, ("scale", 1e5)) is None      # NumPy 1.x: float32
    assert K.op_row(F64, ("scale", 1e300)) is not None


# -- the differences found (these tests fail until cynag is fixed) ----------
def test_clip_float16_signed_zeros_as_numpy1():
    """NumPy 1.26's float16 clip/maximum/minimum keep x when it equals the bound
    (``x >= lo``, ``x <= hi``); its float32/float64 loops take the bound.  So
    with Chainer, ``GradientHardClipping(-0.0, 0.0)`` leaves a float16 ``-0.0``
    gradient at ``-0.0``.  cynag_kernels/_hook_ops.h (CYNAG_NP_MAX/MIN, used by
    cynag_op_f16) compares strictly for float16 too and gives ``+0.0``."""
    g = np.array([-0.0, 0.0, -0.0, 1.0, -1.0], F16)
    for lo, hi in [(-0.0, 0.0), (0.0, -0.0), (-0.0, None), (None, 0.0)]:
        expected = oracle_ops(g, None, [("clip", lo, hi)])
        got = g.copy()
        K.apply_ops(got, None, [("clip", lo, hi)])
        assert_bits(expected, got, "float16 clip(%r, %r)" % (lo, hi))


def test_integer_coefficients_promote_as_numpy1():
    """NumPy 1.x types a Python int by its value (``min_scalar_type``): against a
    float16 array an int beyond int8/uint8 (e.g. 300) makes ``rate * p`` a
    float32 operation, against float32 an int beyond 16 bits (e.g. 100003) a
    float64 one.  cynag_kernels.hooks.op_row / _fits round any int that does
    not overflow to the array dtype instead (WeightDecay(300) on float16,
    WeightDecay(100003) on float32 differ from Chainer)."""
    rng = np.random.default_rng(0)
    for dtype, c in [(F16, 300), (F16, -200), (F16, 4097), (F32, 100003), (F32, 2 ** 31 + 7)]:
        p = (rng.standard_normal(500) * 0.01).astype(dtype)
        g = rng.standard_normal(500).astype(dtype)
        for kind in ("weight_decay", "lasso"):
            got = g.copy()
            with np.errstate(all="ignore"):
                K.apply_ops(got, p, [(kind, c)])
            assert_bits(oracle_ops(g, p, [(kind, c)]), got, "%s %s(%r)" % (dtype, kind, c))


def test_float_coefficients_near_the_type_limits_as_numpy1():
    """NumPy 1.x's ``min_scalar_type`` calls a float a float16 only if
    ``|x| < 65000`` and a float32 only if ``|x| < 3.4e38``; cynag_kernels.hooks
    (_fits) rounds to the dtype whatever does not overflow it, so a coefficient
    in [65000, 65520) for float16 (or [3.4e38, 3.4028236e38) for float32) is
    rounded to the array dtype where NumPy 1.x computes in a wider type."""
    rng = np.random.default_rng(1)
    for dtype, c in [(F16, 65000.0), (F16, 65519.0), (F32, 3.4e38), (F16, 3.4e38)]:
        p = (rng.standard_normal(500) * 1e-3).astype(dtype)
        g = rng.standard_normal(500).astype(dtype)
        got = g.copy()
        with np.errstate(all="ignore"):
            K.apply_ops(got, p, [("weight_decay", c)])
        assert_bits(oracle_ops(g, p, [("weight_decay", c)]), got, "%s rate %r" % (dtype, c))


def test_zero_dim_gradients_as_numpy1():
    """A 0-d gradient is a scalar to NumPy 1.x: each operation runs in the
    ordinary promotion of the two scalar types.  cynag_kernels.hooks gets two
    cases wrong:

    * ``np.float32(r) * p`` with a 0-d float32 ``p`` is a float32 product, but
      ``_wide_type`` takes every 0-d operation to float64 (right for Python
      floats only): WeightDecay(np.float32(0.7)) on a 0-d float32 parameter
      differs from Chainer in about 1 case in 5;
    * ``np.clip`` of a 0-d array with Python-float bounds runs in float64, but
      ``op_row`` rounds the bounds to the dtype and clips natively: a bound
      that rounds to zero (``-1e-50`` for float32) turns a ``+0.0`` gradient
      into ``-0.0``.
    """
    rng = np.random.default_rng(2)
    differ = 0
    for _ in range(200):
        g = np.array(rng.standard_normal(), F32)
        p = np.array(rng.standard_normal(), F32)
        c = np.float32(rng.uniform(0.01, 1))
        got = g.copy()
        K.apply_ops(got, p, [("weight_decay", c)])
        differ += bits(got)[0] != bits(oracle_ops(g, p, [("weight_decay", c)]))[0]
    assert differ == 0, "weight decay with a float32 rate: %d of 200 differ" % differ
    for dtype in (F16, F32):
        g = np.array(0.0, dtype)
        got = g.copy()
        K.apply_ops(got, None, [("clip", -1e-50, 1.0)])
        assert_bits(oracle_ops(g, None, [("clip", -1e-50, 1.0)]), got,
                    "0-d %s clip(-1e-50, 1.0) of +0.0" % dtype)


def test_apply_ops_never_reads_p_as_another_dtype():
    """apply_ops hands ``p``'s memory to the kernel typed as ``g``'s dtype without
    checking it (cynag_kernels/hooks.py _run_native; _nesterov_cpu.hook_ops
    checks only the element count).  A float64 ``p`` with a float32 ``g``
    gives garbage; a float16 ``p`` with a float32 ``g`` reads past the end of
    ``p``'s buffer.  NumPy (Chainer's ``g += rate * p``) promotes instead.
    Either the NumPy result or an exception is acceptable."""
    g = np.zeros(8, np.float32)
    for p in (np.arange(8, dtype=np.float64), np.arange(8, dtype=np.float16)):
        got = g.copy()
        try:
            K.apply_ops(got, p, [("weight_decay", 1.0)])
        except (TypeError, ValueError):
            continue
        assert got.tolist() == list(range(8)), (p.dtype, got)


# ---------------------------------------------------------------------------
# Kernel level: sum_squares
# ---------------------------------------------------------------------------
def exact_sum_squares(arrays):
    return math.fsum(float(x) ** 2 for a in arrays for x in np.asarray(a, F64).reshape(-1))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sum_squares_matches_float64(dtype, threads):
    rng = np.random.default_rng([threads, dtype.itemsize])
    sizes = [0, 1, 3, 4, 5, 17, 1000, 4099, 70001, 0, 2, 33333]
    arrays = [(rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3)).astype(dtype)
              for n in sizes]
    arrays.append(np.asarray(rng.standard_normal(), dtype))              # 0-d
    arrays.append(np.asfortranarray(rng.standard_normal((30, 40)).astype(dtype)))
    arrays.append(rng.standard_normal(301).astype(dtype)[::3])           # strided
    # The exact sum of the float64 squares (squares of float16/float32 are exact).
    exact = math.fsum(np.concatenate([np.asarray(a, F64).reshape(-1) ** 2 for a in arrays]))
    got = K.sum_squares(arrays, num_threads=threads)
    assert isinstance(got, float)
    assert abs(got - exact) <= 1e-13 * exact
    each = K.sum_squares_each(arrays, num_threads=threads)
    for a, s in zip(arrays, each):
        e = math.fsum(np.asarray(a, F64).reshape(-1) ** 2)
        assert abs(s - e) <= 1e-13 * e, (a.shape, s, e)
    # The result depends on the thread count only.
    assert K.sum_squares(arrays, num_threads=threads) == got


def test_sum_squares_mixed_dtypes_specials_and_empty():
    a = np.array([3.0, 4.0], F32)
    b = np.array([[1.0, 2.0]], F16)
    c = np.array(2.0, F64)
    assert K.sum_squares([a, b, c]) == 9 + 16 + 1 + 4 + 4
    assert K.sum_squares([]) == 0.0
    assert K.sum_squares([np.zeros(0, F32)]) == 0.0
    assert K.sum_squares_each([]).shape == (0,)
    assert math.isinf(K.sum_squares([np.array([np.inf, 1.0], F32)]))
    assert math.isnan(K.sum_squares([np.array([np.nan, 1.0], F64), a]))
    assert K.sum_squares([np.array([3e38], F32)]) == float(np.float32(3e38)) ** 2
    with pytest.raises(TypeError):
        K.sum_squares_each([a, c])
    with pytest.raises(TypeError):
        K.sum_squares_each([np.zeros(3, np.int32)])


# ---------------------------------------------------------------------------
# Optimizer level: helpers
# ---------------------------------------------------------------------------
def _single_link(param, name="W"):
    link = Link()
    with link.init_scope():
        setattr(link, name, param)
    return link


def _params(rng, link, shapes):
    with link.init_scope():
        for name, (shape, dtype) in shapes.items():
            setattr(link, name, Parameter(np.asarray(rng.standard_normal(shape)).astype(dtype)))
    return link


def mixed_model(seed=0, dtypes=(F32, F64, F16)):
    """Groups of each dtype, a frozen layer, a rule-hooked parameter, a 0-d, a
    strided, a Fortran-order, an empty and a late-initialized parameter."""
    rng = np.random.default_rng(seed)
    model = Chain()
    with model.init_scope():
        for i, dt in enumerate(dtypes):
            setattr(model, "l%d" % i, _params(rng, Link(), {"W": ((4, 5), dt), "b": ((5,), dt)}))
        model.frozen = _params(rng, Link(), {"W": ((3,), F32), "b": ((2,), F64)})
        model.misc = Link()
    misc = model.misc
    with misc.init_scope():
        misc.scalar = Parameter(np.asarray(rng.standard_normal(), F32))
        base = rng.standard_normal(14).astype(F32)
        misc.strided = Parameter(base[::2])
        misc.fortran = Parameter(np.asfortranarray(rng.standard_normal((3, 4))))
        misc.hooked = Parameter(rng.standard_normal(7).astype(F32))
        misc.empty = Parameter(np.zeros((0, 3), F32))
        misc.late = Parameter(_Init(F32, seed + 1))
    return model


def setup_model(model, opt):
    opt.setup(model)
    model.frozen.disable_update()
    model.misc.hooked.update_rule.add_hook(H.Lasso(1e-3), name="rule_lasso")
    return model, opt


def grads_for(model, step, scale=1.0, specials=False):
    out = {}
    for path, p in model.namedparams():
        if p.array is None:
            continue
        rng = np.random.default_rng([step, sum(map(ord, path))])
        g = np.empty_like(p.array)
        g[...] = rng.standard_normal(p.shape) * scale
        if specials and g.size and step % 5 == 3:
            g.reshape(-1)[0] = [np.inf, -np.inf, np.nan][step % 3]
        out[path] = g
    return out


def _bits_or_none(a):
    if a is None:
        return None
    a = np.asarray(a)
    return (a.dtype.str, a.shape, np.ascontiguousarray(a).tobytes())


def state_of(model, opt):
    out = {"opt.t": opt.t, "loss_scale": repr(getattr(opt, "_loss_scale", None))}
    for path, p in model.namedparams():
        rule = p.update_rule
        entry = {"array": _bits_or_none(p.array), "grad": _bits_or_none(p.grad)}
        if rule is not None:
            entry["t"] = rule.t
            entry["state"] = None if rule.state is None else {
                k: _bits_or_none(v) for k, v in rule.state.items()}
        out[path] = entry
    return out


def assert_same_states(a, b, where):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], "%s: %s differs" % (where, key)


class _ScaledLoss:
    """What ``loss.backward(loss_scale=s)`` of ``sum(param * x)`` leaves: grad = s * x
    (rounded to the parameter dtype); adds into an existing gradient."""

    def __init__(self, pairs):
        self.pairs = pairs

    def backward(self, loss_scale=None):
        for param, x in self.pairs:
            g = np.array(x, param.dtype)
            if loss_scale is not None:
                g = np.asarray(g.astype(F64) * loss_scale).astype(param.dtype)
            param.grad = g if param.grad is None else np.asarray(param.grad + g)


def lossfun_for(model, specials=False):
    def lossfun(step):
        grads = grads_for(model, step, specials=specials)
        return _ScaledLoss([(p, grads[path]) for path, p in model.namedparams()
                            if path in grads])
    return lossfun


class _Spy:
    """Records the programs the multi-tensor groups ran with (monkeypatched)."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = functional.nesterov_ag_table
        original_rows = functional.nesterov_ag_rows

        def run(table, ops=None, num_threads=None):
            self.calls.append(None if ops is None else np.array(ops))
            return original(table, ops=ops, num_threads=num_threads)

        def run_rows(table, lo, hi, type_num, scratch, ops=None, num_threads=None):
            self.calls.append(None if ops is None else np.array(ops))
            return original_rows(table, lo, hi, type_num, scratch, ops=ops,
                                 num_threads=num_threads)

        monkeypatch.setattr(functional, "nesterov_ag_table", run)
        monkeypatch.setattr(functional, "nesterov_ag_rows", run_rows)

    def folded(self):
        return [c for c in self.calls if c is not None]


# ---------------------------------------------------------------------------
# Optimizer level: each hook against an explicitly computed one
# ---------------------------------------------------------------------------
def explicit_hook(kind, coef):
    """The effect of a cynag hook written with the oracle: a plain function hook
    (never folded).  ``coef``: the hook's parameters."""
    def per_param(rule, param):
        p, g = param.array, param.grad
        if g is None:
            return
        if kind == "WeightDecay":
            if p is None:
                return
            rate = coef
            if param._loss_scale is not None:
                rate = strong(rate) * strong(param._loss_scale)
            g[...] = oracle_ops(g, p, [("weight_decay", rate)])
        elif kind == "Lasso":
            if p is None:
                return
            g[...] = oracle_ops(g, p, [("lasso", coef)])
        elif kind == "GradientHardClipping":
            g[...] = oracle_ops(g, p, [("clip",) + tuple(coef)])
        elif kind == "GradientNoise":
            std = np.sqrt(coef / np.power(1 + rule.t, 0.55))
            noise = np.asarray(np.random.normal(0, std, g.shape)).astype(g.dtype)
            g[...] = oracle_ops(g, p, [("add", noise)])
        elif kind == "GradientLARS":
            if p is None:
                return
            threshold, wd, eps = coef
            p_norm = np.float64(math.sqrt(exact_sum_squares([p])))
            g_norm = np.float64(math.sqrt(exact_sum_squares([g])))
            with np.errstate(all="ignore"):
                local = p_norm / (np.float64(eps) + g_norm + np.float64(wd) * p_norm)
            rate = local if p_norm > threshold else np.float64(1.0)
            g[...] = oracle_ops(g, p, [("weight_decay", wd), ("scale", rate)])
        else:
            raise ValueError(kind)

    if kind == "GradientClipping":
        def whole(opt):
            grads = [p.grad for p in opt.target.params(False) if p.grad is not None]
            norm = math.sqrt(exact_sum_squares(grads))
            with np.errstate(all="ignore"):
                rate = np.float64(coef) / np.float64(norm)
            if rate >= 1:
                return
            for p in opt.target.params(False):
                if p.grad is not None:
                    p.grad[...] = oracle_ops(p.grad, None, [("scale", rate)])
        whole.name = "explicit_" + kind
        return whole
    per_param.name = "explicit_" + kind
    per_param.call_for_each_param = True
    return per_param


HOOK_KINDS = {
    "WeightDecay": (lambda: H.WeightDecay(0.01), 0.01),
    "Lasso": (lambda: H.Lasso(0.003), 0.003),
    "GradientHardClipping": (lambda: H.GradientHardClipping(-0.8, 0.5), (-0.8, 0.5)),
    "GradientClipping": (lambda: H.GradientClipping(2.0), 2.0),
    "GradientNoise": (lambda: H.GradientNoise(0.02), 0.02),
    "GradientLARS": (lambda: H.GradientLARS(threshold=0.5, weight_decay=1e-3),
                     (0.5, 1e-3, 1e-9)),
}


def _plain_model(seed, dtype):
    rng = np.random.default_rng(seed)
    return _params(rng, Link(), {"W": ((6, 7), dtype), "b": ((7,), dtype),
                                 "c": ((33,), dtype)})


def _close(a, b, rtol):
    a, b = np.asarray(a, F64), np.asarray(b, F64)
    scale = max(np.abs(a).max(initial=0), np.abs(b).max(initial=0), 1e-300)
    return np.abs(a - b).max(initial=0) <= rtol * scale


@pytest.mark.parametrize("loss_scale", [None, 8.0, 3.0])
@pytest.mark.parametrize("where", ["optimizer", "rule"])
@pytest.mark.parametrize("timing", ["pre", "post"])
@pytest.mark.parametrize("kind", sorted(HOOK_KINDS))
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_hook_matches_explicit_computation(kind, timing, where, loss_scale, dtype):
    if kind == "GradientClipping" and where == "rule":
        pytest.skip("GradientClipping is an optimizer hook only (as in Chainer)")
    make, coef = HOOK_KINDS[kind]
    runs = []
    for variant in ("cynag", "explicit"):
        model = _plain_model(3, dtype)
        opt = NesterovAG(lr=0.05, momentum=0.9)
        if loss_scale is not None:
            opt.loss_scaling(scale=loss_scale)
        opt.setup(model)
        hook = make() if variant == "cynag" else explicit_hook(kind, coef)
        if where == "optimizer":
            opt.add_hook(hook, name="h", timing=timing)
        else:
            model.W.update_rule.add_hook(hook, name="h", timing=timing)
            model.c.update_rule.add_hook(hook, name="h", timing=timing)
        lossfun = lossfun_for(model)
        traj = []
        for step in range(12):
            np.random.seed(step)         # GradientNoise draws from numpy.random
            opt.update(lossfun, step)
            traj.append({path: (p.array.copy(), p.grad.copy())
                         for path, p in model.namedparams()})
        runs.append(traj)
    exact = kind not in ("GradientClipping", "GradientLARS")
    for step, (a, b) in enumerate(zip(*runs)):
        for path in a:
            for what, x, y in zip(("array", "grad"), b[path], a[path]):
                label = "step %d %s %s" % (step, path, what)
                if exact:
                    assert_bits(x, y, label)
                else:
                    # Norms: float64 sums in another order than the exact one.
                    assert _close(x, y, 1e-12 if dtype == F64 else 1e-5), label


def test_weight_decay_is_multiplied_by_the_loss_scale_others_are_not():
    """Static scale 4 (exact): an optimizer 'pre' hook sees the scaled gradient;
    WeightDecay adds ``rate * 4 * p`` to it, Lasso ``rate * sign(p)``, and the
    rule then divides by 4.  Rule hooks see the unscaled gradient but
    WeightDecay still multiplies by ``param._loss_scale`` (Chainer does the same)."""
    p0 = np.array([1.0, -2.0, 0.5, 0.0], F64)
    x = np.array([0.25, 0.5, -1.0, 2.0], F64)
    for where in ("optimizer", "rule"):
        for kind, hook, expect in [
                ("wd", H.WeightDecay(0.125), lambda g: g + 0.125 * 4 * p0),
                ("lasso", H.Lasso(0.125), lambda g: g + 0.125 * np.sign(p0))]:
            param = Parameter(p0.copy())
            link = _single_link(param)
            opt = NesterovAG(lr=0.0, momentum=0.0)
            opt.loss_scaling(scale=4.0)
            opt.setup(link)
            seen = {}
            (opt if where == "optimizer" else param.update_rule).add_hook(hook)
            if where == "optimizer":
                opt.add_hook(lambda o: seen.setdefault("g", o.target.W.grad.copy()),
                             name="after")
                opt.update(lambda: _ScaledLoss([(param, x)]))
                assert seen["g"].tolist() == expect(4 * x).tolist(), kind
                assert param.grad.tolist() == (expect(4 * x) / 4).tolist(), kind
            else:
                opt.update(lambda: _ScaledLoss([(param, x)]))
                assert param.grad.tolist() == expect(x).tolist(), kind


def test_hooks_skip_missing_arrays_and_gradients():
    link = Link()
    with link.init_scope():
        link.u = Parameter(_Init(F32, 0))         # uninitialized: no array, no grad
        link.w = Parameter(np.ones(3, F32))
    opt = NesterovAG().setup(link)
    for hook in _instances().values():
        if hook.call_for_each_param:
            hook(link.u.update_rule, link.u)
            link.w.cleargrad()
            hook(link.w.update_rule, link.w)
            assert link.w.grad is None
        else:
            hook(opt)
    link.w.grad = np.ones(3, F32)
    H.GradientClipping(1.0)(opt)
    assert _close(link.w.grad, np.full(3, 1 / math.sqrt(3)), 1e-7)


# ---------------------------------------------------------------------------
# Optimizer level: folded against unfolded
# ---------------------------------------------------------------------------
def _hook_set(name):
    """Optimizer hook lists ([(hook, timing)]) in Chainer's registration order."""
    wd, lasso = H.WeightDecay(5e-3), H.Lasso(1e-3)
    hard, clip = H.GradientHardClipping(-0.9, 0.7), H.GradientClipping(3.0)
    sets = {
        "wd": [wd],
        "clip_wd": [clip, wd],
        "wd_clip": [wd, clip],
        "clip_only": [clip],
        "wd_lasso_hard": [wd, lasso, hard],
        "hard_lasso_wd": [hard, lasso, wd],
        "clip_hard_wd_lasso": [clip, hard, wd, lasso],
        "lars_wd": [H.GradientLARS(threshold=0.1, weight_decay=1e-3), wd],
        "wd_lars": [wd, H.GradientLARS(threshold=0.1, weight_decay=1e-3)],
        "lasso_clip_hard": [lasso, clip, hard],
        "hard_wd_post": [hard, (wd, "post"), (lasso, "post")],
        "noise_wd": [H.GradientNoise(0.01), clip, wd],
        "foreign_last": [wd, lasso, _ForeignHook()],
        "tiny_clip_wd": [H.GradientClipping(1e-30), wd],
    }
    out = []
    for h in sets[name]:
        out.append(h if isinstance(h, tuple) else (h, "pre"))
    return out


class _ForeignHook:
    """A per-parameter hook cynag does not know: nothing before it can fold."""

    name = "foreign"
    call_for_each_param = True
    timing = "pre"

    def __call__(self, rule, param):
        if param.grad is not None:
            param.grad *= param.grad.dtype.type(0.5)


HOOK_SETS = ["wd", "clip_wd", "wd_clip", "clip_only", "wd_lasso_hard", "hard_lasso_wd",
             "clip_hard_wd_lasso", "lars_wd", "wd_lars", "lasso_clip_hard", "hard_wd_post",
             "noise_wd", "foreign_last", "tiny_clip_wd"]
EXPECT_FOLD = {"wd", "clip_wd", "wd_clip", "clip_only", "wd_lasso_hard", "hard_lasso_wd",
               "clip_hard_wd_lasso", "lars_wd", "lasso_clip_hard", "noise_wd",
               "tiny_clip_wd", "hard_wd_post"}


def run_folded_and_unfolded(hook_set, steps=8, scaling=None, specials=False,
                            model_fn=mixed_model, monkeypatch=None, contiguous=False):
    """Both runs' per-step states; asserts they are bit-identical."""
    trajectories, spies = [], []
    for multi in (True, False):
        np.random.seed(1234)             # GradientNoise draws from numpy.random
        model = model_fn()
        opt = NesterovAG(lr=0.03, momentum=0.9)
        setup_model(model, opt) if model_fn is mixed_model else opt.setup(model)
        opt.use_multi_tensor(multi)
        if scaling == "dynamic":
            opt.loss_scaling(interval=2)
        elif scaling is not None:
            opt.loss_scaling(scale=scaling)
        for i, (hook, timing) in enumerate(_hook_set(hook_set)):
            opt.add_hook(hook, name="h%d" % i, timing=timing)
        spy = _Spy(monkeypatch) if (multi and monkeypatch is not None) else None
        lossfun = lossfun_for(model, specials)
        traj = []
        with np.errstate(all="ignore"):
            for step in range(steps):
                if step == 3:
                    model.misc.late.initialize((2, 3))
                if scaling is None:
                    for path, g in grads_for(model, step, specials=specials).items():
                        p = dict(model.namedparams())[path]
                        p.grad = g
                    opt.update()
                else:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        opt.update(lossfun, step)
                traj.append((state_of(model, opt), opt.is_safe_to_update()))
        if spy is not None:
            monkeypatch.undo()
            spies.append(spy)
        trajectories.append(traj)
    for step, ((a, safe_a), (b, safe_b)) in enumerate(zip(*trajectories)):
        assert safe_a == safe_b
        assert_same_states(a, b, "%s step %d" % (hook_set, step))
    return trajectories[0], spies


@pytest.mark.parametrize("hook_set", HOOK_SETS)
def test_folded_equals_unfolded(hook_set, monkeypatch):
    _, (spy,) = run_folded_and_unfolded(hook_set, monkeypatch=monkeypatch)
    # The folding did take place (or not) as intended.
    assert bool(spy.folded()) == (hook_set in EXPECT_FOLD), spy.calls


def test_foldable_suffix():
    wd, lasso, hard = H.WeightDecay(1e-3), H.Lasso(1e-3), H.GradientHardClipping(-1, 1)
    clip, noise, lars = H.GradientClipping(1.0), H.GradientNoise(0.1), H.GradientLARS()
    assert foldable_suffix([]) == 0
    assert foldable_suffix([wd]) == 1
    assert foldable_suffix([clip, wd, lasso, hard]) == 4
    assert foldable_suffix([wd, clip]) == 1
    assert foldable_suffix([clip, clip, wd]) == 2
    assert foldable_suffix([noise, wd]) == 1
    assert foldable_suffix([wd, noise]) == 0
    assert foldable_suffix([wd, lars]) == 0
    assert foldable_suffix([wd, _ForeignHook()]) == 0

    class MyDecay(H.WeightDecay):
        pass

    assert foldable_suffix([MyDecay(1e-3)]) == 0       # a subclass may do anything
    odd = H.WeightDecay(1e-3)
    odd.call_for_each_param = False
    assert foldable_suffix([odd]) == 0


@pytest.mark.parametrize("hook_set", ["clip_hard_wd_lasso", "wd_clip", "lars_wd"])
@pytest.mark.parametrize("scaling", [8.0, 3, "dynamic"])
def test_folded_equals_unfolded_with_loss_scaling(hook_set, scaling, monkeypatch):
    traj, (spy,) = run_folded_and_unfolded(hook_set, steps=14, scaling=scaling,
                                           specials=scaling == "dynamic",
                                           monkeypatch=monkeypatch)
    if scaling == "dynamic":
        skipped = [i for i, (_, safe) in enumerate(traj) if not safe]
        assert skipped, "no step was skipped"
    assert spy.folded()


def test_skipped_steps_still_run_the_hooks():
    """Dynamic loss scaling skips a step with a non-finite gradient: the 'pre'
    hooks still run on the gradients (as in Chainer), folded or not."""
    for multi in (True, False):
        p = Parameter(np.array([1.0, 2.0, 3.0], F32))
        link = _single_link(p)
        opt = NesterovAG(lr=0.1).setup(link)
        opt.use_multi_tensor(multi)
        opt.loss_scaling()
        opt.add_hook(H.WeightDecay(0.5))
        p.grad = np.ones(3, F32)
        opt.update()                      # creates the state
        p.grad = np.array([np.inf, 0.0, 0.0], F32)
        before = p.array.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.update()
        assert not opt.is_safe_to_update()
        assert p.array.tolist() == before.tolist()
        expected = np.array([np.inf, 0.0, 0.0], F32) + np.float32(0.5 * 1.0) * before
        assert p.grad.tolist() == expected.tolist(), multi


@pytest.mark.parametrize("hook_set", ["clip_hard_wd_lasso", "wd", "clip_only"])
def test_folded_equals_unfolded_with_specials_and_contiguous(hook_set):
    def model_fn():
        m = mixed_model(seed=5, dtypes=(F32, F64))
        return m
    run_folded_and_unfolded(hook_set, steps=10, specials=True, model_fn=model_fn)

    def contiguous_run(multi):
        model = mixed_model(seed=7, dtypes=(F32, F64, F32))
        del model.misc
        opt = NesterovAG(lr=0.02)
        opt.setup(model, contiguous=True)
        opt.use_multi_tensor(multi)
        for i, (hook, timing) in enumerate(_hook_set(hook_set)):
            opt.add_hook(hook, name="h%d" % i, timing=timing)
        states = []
        for step in range(6):
            for path, g in grads_for(model, step).items():
                dict(model.namedparams())[path].grad = g   # copied into the buffer
            opt.update()
            states.append(state_of(model, opt))
        assert model.l0.W.grad.base is not None       # still a view of the buffer
        return states

    for step, (a, b) in enumerate(zip(contiguous_run(True), contiguous_run(False))):
        assert_same_states(a, b, "contiguous %s step %d" % (hook_set, step))


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(order=st.permutations(["clip", "wd", "lasso", "hard", "lars", "noise"]),
       n=st.integers(1, 6), dtypes=st.sampled_from([(F32,), (F64, F32), (F16, F32, F64)]))
def test_folded_equals_unfolded_random_orders(order, n, dtypes):
    makers = {"clip": lambda: H.GradientClipping(2.5), "wd": lambda: H.WeightDecay(1e-2),
              "lasso": lambda: H.Lasso(2e-3), "hard": lambda: H.GradientHardClipping(-1, 0.75),
              "lars": lambda: H.GradientLARS(threshold=0.2, weight_decay=1e-4),
              "noise": lambda: H.GradientNoise(0.05)}
    names = order[:n]
    runs = []
    for multi in (True, False):
        np.random.seed(99)
        model = mixed_model(seed=2, dtypes=dtypes)
        opt = NesterovAG(lr=0.02, momentum=0.8)
        setup_model(model, opt)
        opt.use_multi_tensor(multi)
        for i, name in enumerate(names):
            opt.add_hook(makers[name](), name="h%d" % i)
        states = []
        for step in range(5):
            for path, g in grads_for(model, step).items():
                dict(model.namedparams())[path].grad = g
            opt.update()
            states.append(state_of(model, opt))
        runs.append(states)
    for step, (a, b) in enumerate(zip(*runs)):
        assert_same_states(a, b, "%s step %d" % (names, step))


def test_folding_keeps_float16_coefficients_numpy_would_widen():
    """A WeightDecay rate that NumPy 1.x applies to float16 in float32 (1e5 does
    not fit float16): the float16 group takes the hooks outside its pass."""
    def model_fn():
        rng = np.random.default_rng(0)
        return _params(rng, Link(), {"a": ((40,), F16), "b": ((9,), F32)})

    runs = []
    for multi in (True, False):
        model = model_fn()
        opt = NesterovAG(lr=1e-9).setup(model)
        opt.use_multi_tensor(multi)
        opt.add_hook(H.WeightDecay(1e5))
        for step in range(3):
            for path, g in grads_for(model, step, scale=1e-3).items():
                dict(model.namedparams())[path].grad = g
            with np.errstate(all="ignore"):
                opt.update()
        runs.append(state_of(model, opt))
    assert_same_states(runs[0], runs[1], "float16 rate 1e5")


def test_folded_hook_on_read_only_gradient_raises_as_unfolded():
    """Chainer's ``g += rate * p`` raises ValueError on a read-only gradient, and
    so does cynag's unfolded WeightDecay.  Folded into the multi-tensor pass
    (cynag/_multi_tensor.py Plan.fold_prepare; the step table admits a
    read-only gradient when there is no loss scale to divide by) it writes the
    read-only array instead and updates the parameter."""
    results = {}
    for multi in (True, False):
        link = Link()
        with link.init_scope():
            link.W = Parameter(np.arange(12, dtype=F32).reshape(3, 4) / 7)
            link.b = Parameter(np.arange(5, dtype=F32) / 3)
        opt = NesterovAG(lr=0.1).setup(link)
        opt.use_multi_tensor(multi)
        opt.add_hook(H.WeightDecay(0.1))
        for p in link.params():
            p.grad = np.ones_like(p.array)
        opt.update()
        for p in link.params():
            g = np.ones_like(p.array)
            g.flags.writeable = False
            p.grad = g
        before = {n: (p.array.copy(), p.grad.copy()) for n, p in link.namedparams()}
        try:
            opt.update()
            raised = None
        except ValueError as e:
            raised = str(e)
        changed_grads = [n for n, p in link.namedparams() if p.grad.tolist()
                         != before[n][1].tolist()]
        changed_params = [n for n, p in link.namedparams() if p.array.tolist()
                          != before[n][0].tolist()]
        results[multi] = (raised is not None, changed_grads, changed_params)
    assert results[False] == (True, [], [])
    assert results[True] == results[False], results


def test_failing_folded_hook_leaves_the_step_count_as_unfolded():
    """A folded hook that raises (here WeightDecay on a read-only 0-d gradient,
    a parameter updated one by one) must leave the optimizer as the unfolded
    path does: Chainer and cynag's per-parameter path raise from the 'pre'
    hooks, before ``optimizer.t += 1``.  cynag/optimizer.py
    GradientMethod.update increments ``self.t`` before ``plan.run(fold)``
    applies the folded hooks, so ``opt.t`` is one step ahead after the error.
    (The gradients differ too: the unfolded path has already applied the hook
    to the parameters before the failing one, the folded one to none.)"""
    outcome = {}
    for multi in (True, False):
        link = Link()
        with link.init_scope():
            link.W = Parameter(np.ones((3, 4), F32))
            link.s = Parameter(np.array(2.0, F32))      # 0-d: updated one by one
        opt = NesterovAG().setup(link)
        opt.use_multi_tensor(multi)
        opt.add_hook(H.WeightDecay(0.1))
        for p in link.params():
            p.grad = np.ones_like(p.array)
        opt.update()
        for p in link.params():
            p.grad = np.ones_like(p.array)
        g = np.array(1.0, F32)
        g.flags.writeable = False
        link.s.grad = g
        with pytest.raises(ValueError):
            opt.update()
        outcome[multi] = (opt.t, [(n, p.array.tolist(), p.update_rule.t)
                                  for n, p in link.namedparams()])
    assert outcome[True] == outcome[False]


class _NoiseLog:
    def __init__(self):
        self.calls = []

    def __call__(self, xp, shape, dtype, hook, rule):
        self.calls.append((shape, np.dtype(dtype).name, rule.t))
        return H.exponential_decay_noise(xp, shape, dtype, hook, rule)


@pytest.mark.parametrize("multi", [True, False])
def test_gradient_noise_reproduced_from_numpy_random_seed(multi):
    """GradientNoise draws ``numpy.random.normal(0, sqrt(eta / (1 + t)**0.55),
    shape).astype(dtype)`` per parameter in the target's order, ``t`` the rule's
    count before this step; the sum is rounded in the gradient dtype."""
    rng = np.random.default_rng(0)
    link = _params(rng, Link(), {"a": ((3, 4), F32), "b": ((5,), F64), "c": ((), F32),
                                 "d": ((2, 2), F16)})
    assert isinstance(link.c.array, np.ndarray) and link.c.array.ndim == 0
    opt = NesterovAG(lr=0.01).setup(link)
    opt.use_multi_tensor(multi)
    log = _NoiseLog()
    eta = 0.3
    opt.add_hook(H.GradientNoise(eta, noise_func=log))
    for step in range(6):
        grads = {n: np.asarray(rng.standard_normal(p.shape)).astype(p.dtype)
                 for n, p in link.namedparams()}
        for n, p in link.namedparams():
            p.grad = grads[n].copy()
        # The expected noise, drawn from the same seed in the same order.
        np.random.seed(step)
        expected = {}
        for n, p in link.namedparams():
            std = np.sqrt(eta / np.power(1 + p.update_rule.t, 0.55))
            noise = np.random.normal(0, std, p.shape).astype(p.dtype)
            expected[n] = np.asarray(grads[n] + noise).astype(p.dtype)
        seen = {}
        opt.add_hook(lambda o: seen.update({n: p.grad.copy() for n, p in
                                            o.target.namedparams()}), name="look")
        np.random.seed(step)
        opt.update()
        opt.remove_hook("look")
        for n in expected:
            assert_bits(expected[n], seen[n], "step %d %s" % (step, n))
    assert [c[2] for c in log.calls[:4]] == [0, 0, 0, 0]
    assert [c[2] for c in log.calls[-4:]] == [5, 5, 5, 5]
    assert log.calls[:4] == [((3, 4), "float32", 0), ((5,), "float64", 0), ((), "float32", 0),
                             ((2, 2), "float16", 0)]


def test_gradient_noise_of_a_wider_dtype_is_added_as_numpy1_adds_it():
    """Chainer's ``g += noise`` with a float64 noise array and a float32 gradient
    adds in float64 and rounds once (NumPy 1.x and 2 alike).  cynag's
    GradientNoise (cynag/optimizer_hooks.py, ``noise.astype(g.dtype)`` before
    the native add) rounds the noise to float32 first: a different sum for
    about a third of the elements when noise and gradient are of similar size."""
    def noise64(xp, shape, dtype, hook, rule):
        return np.random.RandomState(rule.t).standard_normal(shape) * 0.5

    g0 = np.linspace(0.3, 0.7, 10000).astype(F32)
    p = Parameter(np.linspace(-1, 1, 10000).astype(F32))
    link = _single_link(p)
    NesterovAG().setup(link)
    hook = H.GradientNoise(0.1, noise_func=noise64)
    p.grad = g0.copy()
    hook(p.update_rule, p)
    expected = (g0 + noise64(np, g0.shape, g0.dtype, hook, p.update_rule)).astype(F32)
    assert_bits(expected, p.grad, "float64 noise on a float32 gradient")


def test_gradient_noise_scalar_and_broadcast_noise():
    """A noise function may return a scalar or a broadcastable array of the
    gradient's dtype (NumPy rounds a Python float to the dtype)."""
    p = Parameter(np.ones((2, 3), F32))
    NesterovAG().setup(_single_link(p))
    p.grad = np.zeros((2, 3), F32)
    H.GradientNoise(0.1, noise_func=lambda *a: 0.1)(p.update_rule, p)
    assert p.grad.tolist() == np.full((2, 3), np.float32(0.1)).tolist()
    H.GradientNoise(0.1, noise_func=lambda *a: np.array([1, 2, 3], F32))(p.update_rule, p)
    assert p.grad.tolist() == (np.float32(0.1) + np.array([[1, 2, 3]] * 2, F32)).tolist()
    with pytest.raises(ValueError):
        H.GradientNoise(0.1, noise_func=lambda *a: np.zeros(4, F32))(p.update_rule, p)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("multi", [True, False])
@pytest.mark.parametrize("hook_set", ["clip_hard_wd_lasso", "wd_lars", "noise_wd"])
@pytest.mark.parametrize("bad", ["grad dtype", "grad shape", "read-only param",
                                 "grad on a list"])
def test_bad_input_changes_nothing(multi, hook_set, bad):
    """A bad parameter is found before any hook runs: every array, gradient and
    state stays as it was, and the error names the parameter."""
    model = mixed_model(seed=4, dtypes=(F32, F64))
    opt = NesterovAG(lr=0.02)
    setup_model(model, opt)
    opt.use_multi_tensor(multi)
    for i, (hook, timing) in enumerate(_hook_set(hook_set)):
        opt.add_hook(hook, name="h%d" % i, timing=timing)
    for step in range(2):
        for path, g in grads_for(model, step).items():
            dict(model.namedparams())[path].grad = g
        opt.update()
    for path, g in grads_for(model, 2).items():
        dict(model.namedparams())[path].grad = g
    target = model.l1.W
    if bad == "grad dtype":
        target.grad = target.grad.astype(F32)
    elif bad == "grad shape":
        target.grad = target.grad.reshape(-1)
    elif bad == "read-only param":
        target.array.flags.writeable = False
    else:
        target.grad = target.grad.tolist()
    before = state_of(model, opt)
    rng_state = np.random.get_state()[1].copy()
    with pytest.raises((TypeError, ValueError), match="l1/W"):
        opt.update()
    assert_same_states(before, state_of(model, opt), bad)
    assert (np.random.get_state()[1] == rng_state).all()   # no noise was drawn


def _aliased_model(kind, dtype):
    """Gradients that share memory: a parameter registered in two links
    (``params()`` yields it twice, as in Chainer), or two parameters given one
    gradient array, next to ordinary grouped parameters."""
    rng = np.random.default_rng(7)
    model = Chain()
    with model.init_scope():
        model.a = Link()
        model.b = Link()
        model.c = Link()
        with model.c.init_scope():
            model.c.W = Parameter(rng.standard_normal((5, 3)).astype(dtype))
            model.c.b = Parameter(rng.standard_normal(3).astype(dtype))
        if kind == "tied":
            w = Parameter(rng.standard_normal(6).astype(dtype))
            with model.a.init_scope():
                model.a.w = w
            with model.b.init_scope():
                model.b.w = w
        else:
            with model.a.init_scope():
                model.a.w = Parameter(rng.standard_normal(6).astype(dtype))
            with model.b.init_scope():
                model.b.w = Parameter(rng.standard_normal(6).astype(dtype))
    return model


@pytest.mark.parametrize("kind", ["tied", "shared_grad"])
@pytest.mark.parametrize("hook_set", ["wd_lasso_hard", "clip_wd", "clip_hard_wd_lasso"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_folded_hooks_keep_chainers_order_on_shared_gradients(kind, hook_set, dtype):
    """Chainer calls each optimizer hook on every parameter before the next
    hook; where gradients share memory the folded path must keep that order
    (hook by hook over the parameters it cannot fold), not parameter by
    parameter."""
    trajectories = []
    for multi in (True, False):
        model = _aliased_model(kind, dtype)
        opt = NesterovAG(lr=0.05, momentum=0.9).setup(model)
        opt.use_multi_tensor(multi)
        for i, (hook, timing) in enumerate(_hook_set(hook_set)):
            opt.add_hook(hook, name="h%d" % i, timing=timing)
        rng = np.random.default_rng(3)
        traj = []
        for step in range(6):
            shared = (rng.standard_normal(6) * 4).astype(dtype)
            model.a.w.grad = shared.copy()
            model.b.w.grad = shared if kind == "tied" else model.a.w.grad
            model.c.W.grad = rng.standard_normal((5, 3)).astype(dtype)
            model.c.b.grad = rng.standard_normal(3).astype(dtype)
            opt.update()
            traj.append(state_of(model, opt))
        trajectories.append(traj)
    for step, (a, b) in enumerate(zip(*trajectories)):
        assert_same_states(a, b, "%s %s step %d" % (kind, hook_set, step))


@pytest.mark.parametrize("multi", [True, False])
@pytest.mark.parametrize("what", ["lr", "grad"])
def test_bad_input_from_a_rule_pre_hook_names_the_parameter(multi, what):
    """The checks before the hooks passed; what a rule-level 'pre' hook sets
    that the update cannot take fails in the update, as in Chainer, but
    naming the parameter."""
    link = cynag.Link()
    with link.init_scope():
        link.W = cynag.Parameter(np.ones(3, np.float32))
    opt = cynag.optimizers.NesterovAG().setup(link)
    opt.use_multi_tensor(multi)

    def bad(rule, param):
        if what == "lr":
            rule.hyperparam.lr = "x"
        else:
            param.grad = np.ones(4, np.float32)
    link.W.update_rule.add_hook(bad)
    link.W.grad = np.ones(3, np.float32)
    with pytest.raises((TypeError, ValueError), match="parameter 'W'.*(lr must be a real "
                                                      "number|grad has shape)"):
        opt.update()


@pytest.mark.parametrize("multi", [True, False])
@pytest.mark.parametrize("timing", ["pre", "post"])
def test_a_hook_that_removes_a_hook_ends_the_loop_as_in_chainer(multi, timing):
    # Chainer iterates the OrderedDict itself: after the hook returns, the
    # next item raises, so 'second' is not called (and, for 'pre', nothing
    # is updated).
    link = cynag.Link()
    with link.init_scope():
        link.w = cynag.Parameter(np.ones(3, np.float32))
    opt = cynag.optimizers.NesterovAG(lr=0.1).setup(link)
    opt.use_multi_tensor(multi)
    calls = []

    def once(o):
        calls.append("once")
        o.remove_hook("once")

    opt.add_hook(once, name="once", timing=timing)
    opt.add_hook(lambda o: calls.append("second"), name="second", timing=timing)
    opt.add_hook(cynag.optimizer_hooks.WeightDecay(0.5), timing=timing)
    link.w.grad = np.ones(3, np.float32)
    with pytest.raises(RuntimeError, match="mutated during iteration"):
        opt.update()
    assert calls == ["once"]
    if timing == "pre":
        assert opt.t == 0 and (link.w.array == 1).all() and link.w.update_rule.state is None
    else:
        assert opt.t == 1 and link.w.update_rule.t == 1
    opt.update()  # the hook is gone: the next step runs
    assert calls == ["once", "second"]


def test_settings_that_meet_only_floats_may_be_fractions():
    # A norm's threshold, LARS's eps and the noise's eta meet Python floats
    # before any array: Chainer computes with a Fraction there, and so does
    # cynag (the rates and bounds, which meet arrays, are refused).
    from fractions import Fraction

    H = cynag.optimizer_hooks
    H.GradientClipping(Fraction(1, 2))
    H.GradientLARS(threshold=Fraction(1, 100), eps=Fraction(1, 10 ** 9))
    H.GradientNoise(Fraction(3, 10))
    for make in (lambda: H.WeightDecay(Fraction(1, 2)), lambda: H.Lasso(Fraction(1, 2)),
                 lambda: H.GradientHardClipping(Fraction(-1), 1.0),
                 lambda: H.GradientLARS(weight_decay=Fraction(1, 10))):
        with pytest.raises(TypeError, match="real number"):
            make()
    link = cynag.Link()
    with link.init_scope():
        link.w = cynag.Parameter(np.array([3.0, -4.0], np.float32))
    opt = cynag.optimizers.NesterovAG(lr=0.1).setup(link)
    opt.add_hook(H.GradientClipping(Fraction(1, 2)))
    link.w.grad = np.array([3.0, -4.0], np.float32)
    opt.update()
    ref = cynag.Link()
    with ref.init_scope():
        ref.w = cynag.Parameter(np.array([3.0, -4.0], np.float32))
    ropt = cynag.optimizers.NesterovAG(lr=0.1).setup(ref)
    ropt.add_hook(H.GradientClipping(0.5))
    ref.w.grad = np.array([3.0, -4.0], np.float32)
    ropt.update()
    assert link.w.array.tobytes() == ref.w.array.tobytes()
