"""Tests of the portable float16 <-> float32 conversions in ``_half.h``.

``cynag_kernels._nesterov_cpu`` exposes them as ``half_bits_to_float`` and
``float_to_half_bits``; they must agree with NumPy's ``astype`` bit for bit
(round to nearest even, gradual underflow, overflow to infinity).  NaNs are
only required to stay NaNs: their payload is not part of the contract.

Set ``CYNAG_TEST_EXHAUSTIVE=1`` to also compare float32 -> float16 over all
2**32 float32 bit patterns (about 4 minutes on 2 cores).
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cynag_kernels
from cynag_kernels import _nesterov_cpu, nesterov_ag_cpu
from cynag_kernels._nesterov_cpu import float_to_half_bits, half_bits_to_float

from oracle import assert_same_bits, nesterov_ag_numpy

ALL_HALF_BITS = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def kernel_half_to_float(hbits):
    hbits = np.ascontiguousarray(hbits, dtype=np.uint16)
    out = np.empty(hbits.shape, np.float32)
    half_bits_to_float(hbits.reshape(-1), out.reshape(-1))
    return out


def kernel_float_to_half(f):
    f = np.ascontiguousarray(f, dtype=np.float32)
    out = np.empty(f.shape, np.uint16)
    float_to_half_bits(f.reshape(-1), out.reshape(-1))
    return out


def numpy_float_to_half(f):
    with np.errstate(all="ignore"):
        return np.asarray(f, np.float32).astype(np.float16).view(np.uint16)


def assert_half_bits_match(f32_inputs):
    """float32 -> float16 of the kernel equals NumPy's, except NaN payloads."""
    f32_inputs = np.ascontiguousarray(f32_inputs, np.float32)
    got = kernel_float_to_half(f32_inputs)
    exp = numpy_float_to_half(f32_inputs)
    got_nan = np.isnan(got.view(np.float16))
    exp_nan = np.isnan(exp.view(np.float16))
    bad = (got != exp) & ~(got_nan & exp_nan)
    bad |= got_nan != exp_nan
    if bad.any():
        i = np.flatnonzero(bad)
        lines = ["%d of %d conversions differ, e.g.:" % (i.size, f32_inputs.size)]
        for k in i[:10]:
            lines.append("  float32 %r (0x%08x): got 0x%04x, expected 0x%04x" % (
                f32_inputs[k], f32_inputs.view(np.uint32)[k], got[k], exp[k]))
        raise AssertionError("\n".join(lines))


# ---------------------------------------------------------------------------
# float16 -> float32
# ---------------------------------------------------------------------------
def test_half_to_float_all_65536_patterns():
    got = kernel_half_to_float(ALL_HALF_BITS)
    exp = ALL_HALF_BITS.view(np.float16).astype(np.float32)
    nan = np.isnan(exp)
    assert nan.sum() == 2 * (0x400 - 1)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], exp.view(np.uint32)[~nan])
    # NaN keeps its sign
    np.testing.assert_array_equal(np.signbit(got[nan]), np.signbit(exp[nan]))


def test_half_to_float_known_values():
    cases = {0x0000: 0.0, 0x8000: -0.0, 0x3c00: 1.0, 0xbc00: -1.0, 0x7bff: 65504.0,
             0x0001: 2.0 ** -24, 0x03ff: 2.0 ** -14 - 2.0 ** -24, 0x0400: 2.0 ** -14,
             0x7c00: np.inf, 0xfc00: -np.inf, 0x3555: 0.333251953125}
    got = kernel_half_to_float(np.array(list(cases), np.uint16))
    exp = np.array(list(cases.values()), np.float32)
    assert_same_bits(got, exp)


# ---------------------------------------------------------------------------
# float32 -> float16
# ---------------------------------------------------------------------------
def test_float_to_half_random_bit_patterns():
    rng = np.random.default_rng(20240601)
    patterns = rng.integers(0, 1 << 32, size=1 << 22, dtype=np.uint64).astype(np.uint32)
    assert_half_bits_match(patterns.view(np.float32))


def test_float_to_half_random_values_in_half_range():
    """Random bit patterns concentrated on the float16 exponent range."""
    rng = np.random.default_rng(7)
    n = 1 << 21
    sign = rng.integers(0, 2, n, dtype=np.uint32) << 31
    exponent = rng.integers(127 - 27, 127 + 17, n, dtype=np.uint32) << 23
    mantissa = rng.integers(0, 1 << 23, n, dtype=np.uint32)
    assert_half_bits_match((sign | exponent | mantissa).view(np.float32))


def _half_boundary_values():
    """float32 values at and around every float16 value and rounding boundary."""
    pos = ALL_HALF_BITS[:0x7c00].view(np.float16).astype(np.float64)  # 0 .. 65504
    nxt = np.append(pos[1:], 65536.0)           # the next float16 (65536 would be inf)
    mid = (pos + nxt) / 2                        # halfway points, exact in float32
    vals = [pos, mid]
    for base in (pos, mid):
        b32 = base.astype(np.float32)
        vals.append(np.nextafter(b32, np.float32(np.inf)).astype(np.float64))
        vals.append(np.nextafter(b32, np.float32(0)).astype(np.float64))
    info32 = np.finfo(np.float32)
    extra = [
        65504.0, 65519.99609375, 65520.0, 65520.00390625, 65535.0, 65536.0, 65537.0, 1e6,
        float(info32.max), np.inf,
        2.0 ** -24, 2.0 ** -25, 2.0 ** -25 * (1 + 2.0 ** -23), 2.0 ** -25 * (1 - 2.0 ** -24),
        2.0 ** -26, 3 * 2.0 ** -25, 2.0 ** -14, 2.0 ** -14 - 2.0 ** -25, 2.0 ** -14 - 2.0 ** -24,
        float(info32.smallest_subnormal), float(info32.smallest_normal), 1e-30, 1e-40, 0.0,
        1.0, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, 2048.0 + 1.0, 2048.0 + 3.0, 0.1, 1 / 3,
    ]
    vals.append(np.array(extra))
    v = np.concatenate(vals).astype(np.float32)
    return np.concatenate([v, -v])


def test_float_to_half_boundaries():
    vals = _half_boundary_values()
    assert vals.size > 6 * 0x7c00
    assert_half_bits_match(vals)


def test_float_to_half_exact_rounding_rules():
    f = np.array([65520.0, np.nextafter(np.float32(65520.0), np.float32(0)), 65504.0, np.inf,
                  -np.inf, -0.0, 0.0, 2.0 ** -25, 2.0 ** -25 * 3, 1e-45, -1e-45,
                  1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11], np.float32)
    exp = np.array([0x7c00, 0x7bff, 0x7bff, 0x7c00, 0xfc00, 0x8000, 0x0000, 0x0000, 0x0002,
                    0x0000, 0x8000, 0x3c00, 0x3c02], np.uint16)
    np.testing.assert_array_equal(kernel_float_to_half(f), exp)


def test_float_to_half_nan_stays_nan():
    # every payload that fits in the 13 bits that float16 drops (a naive
    # truncation would turn these into infinity), plus random payloads
    low = np.arange(0x7f800001, 0x7f800001 + (1 << 14), dtype=np.uint32)
    rng = np.random.default_rng(3)
    rand = rng.integers(0x7f800001, 0x80000000, size=1 << 16, dtype=np.uint64).astype(np.uint32)
    special = np.array([0x7fc00000, 0x7f800001, 0x7fbfffff, 0x7fffffff, 0x7fc00001, 0x7fa00000],
                       np.uint32)
    pos = np.concatenate([low, rand, special])
    nans = np.concatenate([pos, pos | np.uint32(0x80000000)]).view(np.float32)
    assert np.isnan(nans).all()
    got = kernel_float_to_half(nans).view(np.float16)
    assert np.isnan(got).all()
    np.testing.assert_array_equal(np.signbit(got), np.signbit(nans))


def test_round_trip_all_halves():
    got = kernel_float_to_half(kernel_half_to_float(ALL_HALF_BITS))
    nan = np.isnan(ALL_HALF_BITS.view(np.float16))
    np.testing.assert_array_equal(got[~nan], ALL_HALF_BITS[~nan])
    assert np.isnan(got[nan].view(np.float16)).all()


@pytest.mark.skipif(os.environ.get("CYNAG_TEST_EXHAUSTIVE", "") in ("", "0"),
                    reason="set CYNAG_TEST_EXHAUSTIVE=1 for all 2**32 float32 patterns")
def test_float_to_half_exhaustive():
    chunk = 1 << 24
    for start in range(0, 1 << 32, chunk):
        patterns = np.arange(start, start + chunk, dtype=np.uint64).astype(np.uint32)
        assert_half_bits_match(patterns.view(np.float32))


def test_conversion_argument_types():
    with pytest.raises(ValueError):
        half_bits_to_float(np.zeros(4, np.float32), np.zeros(4, np.float32))
    with pytest.raises(ValueError):
        float_to_half_bits(np.zeros(4, np.float64), np.zeros(4, np.uint16))
    with pytest.raises(ValueError):  # not contiguous
        float_to_half_bits(np.zeros(8, np.float32)[::2], np.zeros(4, np.uint16))
    # empty is fine
    half_bits_to_float(np.zeros(0, np.uint16), np.zeros(0, np.float32))
    float_to_half_bits(np.zeros(0, np.float32), np.zeros(0, np.uint16))


@pytest.mark.parametrize("func", ["half_bits_to_float", "float_to_half_bits"])
def test_conversion_rejects_short_destination(func):
    """A destination shorter than the source must raise, not write out of bounds.

    Runs in a subprocess: the bug corrupts memory or crashes the interpreter.
    """
    code = textwrap.dedent("""
        import numpy as np
        from cynag_kernels._nesterov_cpu import half_bits_to_float, float_to_half_bits
        func = %s
        src_t, dst_t = ((np.uint16, np.float32) if func is half_bits_to_float
                        else (np.float32, np.uint16))
        for n_src, n_dst in ((1 << 20, 0), (1 << 20, 1), (10, 5)):
            try:
                func(np.ones(n_src, src_t), np.zeros(n_dst, dst_t))
            except (ValueError, IndexError):
                continue
            raise SystemExit("no error for len(src)=%%d, len(dst)=%%d" %% (n_src, n_dst))
        print("ok")
    """ % func)
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(cynag_kernels.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stdout, r.stderr)


# ---------------------------------------------------------------------------
# The kernel's float16 path rounds like NumPy (ties included)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("lr,m", [(0.0, 1.0), (0.0, -1.0), (1.0, 0.0), (0.5, 0.5), (0.1, 0.9),
                                  (10.0, 0.99), (3.0, 1.5)])
def test_kernel_float16_rounding_matches_numpy(num_threads, lr, m):
    """Random float16 bit patterns (all finite ones, subnormals and huge values
    included) through the kernel's float16 path: bit-identical to the float32
    oracle, overflow to inf included; NaN results only need to be NaN.

    With ``lr=0, m=1`` the update is ``p = half(p + v)``: the float32 sum is
    exact, so many results are exact ties between two float16 values.
    """
    rng = np.random.default_rng(abs(int(lr * 1000 + m * 10)))
    n = 1 << 18
    finite = ALL_HALF_BITS[~np.isnan(ALL_HALF_BITS.view(np.float16))
                           & ~np.isinf(ALL_HALF_BITS.view(np.float16))]
    p, g, v = (rng.choice(finite, n).view(np.float16) for _ in range(3))
    p_exp, v_exp = p.copy(), v.copy()
    nesterov_ag_cpu(p, g, v, lr, m, num_threads=num_threads)
    with np.errstate(all="ignore"):
        nesterov_ag_numpy(p_exp, g, v_exp, lr, m)
    assert_same_bits(v, v_exp, "v", nan_payload=False)
    assert_same_bits(p, p_exp, "param", nan_payload=False)
    np.testing.assert_array_equal(np.isnan(p), np.isnan(p_exp))


# ---------------------------------------------------------------------------
# The F16C span against the portable one
# ---------------------------------------------------------------------------
def _special_halves(rng, n):
    """float16 values mixing ordinary, subnormal, huge, zero, inf and NaN."""
    pool = np.concatenate([
        rng.standard_normal(n).astype(np.float16),
        (rng.standard_normal(n) * 1e-6).astype(np.float16),       # subnormals
        np.clip(rng.standard_normal(n) * 3e4, -65504, 65504).astype(np.float16),  # near overflow
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, -65504,
                  6e-8, -6e-8, 6.1e-5], dtype=np.float16),
    ])
    return rng.permutation(pool)


@pytest.mark.skipif(not _nesterov_cpu.f16c_available(),
                    reason="this CPU has no F16C instructions: only the portable span exists")
@pytest.mark.parametrize("lr, m", [(0.01, 0.9), (3.0, 0.5), (1e-4, 0.999), (200.0, 1.5)])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 4099])
def test_f16c_span_is_bit_identical_to_portable(lr, m, n):
    rng = np.random.default_rng(n)
    p0, g, v0 = (_special_halves(rng, n)[:n].copy() for _ in range(3))
    results = []
    old = _nesterov_cpu.f16c_enabled()
    try:
        for flag in (True, False):
            _nesterov_cpu.set_f16c_enabled(flag)
            p, v = p0.copy(), v0.copy()
            with np.errstate(all="ignore"):
                for _ in range(3):
                    nesterov_ag_cpu(p, g, v, lr, m, num_threads=1)
            results.append((p, v))
    finally:
        _nesterov_cpu.set_f16c_enabled(old)
    (p_hw, v_hw), (p_sw, v_sw) = results
    assert_same_bits(p_hw, p_sw, "param", nan_payload=False)
    assert_same_bits(v_hw, v_sw, "v", nan_payload=False)
