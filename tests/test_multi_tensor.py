"""The multi-tensor update: one native call per group of parameters.

Kernel level (``cynag_kernels.multi_tensor.CPUTable``): a table over many
arrays gives, bit for bit, what updating each array on its own gives
(``cynag_kernels.nesterov_ag_cpu`` after ``grad /= float(scale)`` in place)
and what the NumPy oracle gives; entries the kernel cannot take are left out
(or refused with ``strict=True``); entries adjacent in memory are merged;
the work items cover every element exactly once.

Optimizer level: ``use_multi_tensor(True)`` and ``use_multi_tensor(False)``
give bit-identical trajectories (parameters, gradients, state, ``t``) on
mixed models and under everything a training loop does between steps;
checkpoints, copies and pickles carry over; bad input still raises before
anything changes.
"""
import copy
import ctypes
import io
import pickle
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cynag import Chain, ChainList, Link, Parameter, serializers
from cynag.optimizers import NesterovAG
from cynag_kernels import nesterov_ag_cpu
from cynag_kernels import multi_tensor
from cynag_kernels.multi_tensor import ITEM_ALIGN, CPUTable, coefficient_table

from oracle import assert_same_bits, nesterov_ag_numpy

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
DTYPES = [F16, F32, F64]


# ---------------------------------------------------------------------------
# Kernel level: helpers
# ---------------------------------------------------------------------------
def random_values(rng, shape, dtype):
    """Finite values of mixed magnitudes (zeros and subnormals included)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    hi = 1.0 if dtype == F16 else 2.0
    x = rng.standard_normal(n) * 10.0 ** rng.uniform(-3, hi, n)
    specials = np.array([0.0, -0.0, float(np.finfo(dtype).smallest_subnormal), 1.0, -0.5])
    mask = rng.random(n) < 0.05
    x[mask] = rng.choice(specials, int(mask.sum()))
    return x.astype(dtype).reshape(shape)


def random_shape(rng, size_kind, large):
    """A shape of 1 to 3 axes whose size follows ``size_kind``."""
    def pick(options):
        return options[int(rng.integers(len(options)))]

    if size_kind == "zero":
        return pick([(0,), (3, 0), (0, 4, 2)])
    if size_kind == "one":
        return pick([(1,), (1, 1), (1, 1, 1)])
    if large:
        return pick([(200_003,), (401, 500), (64, 37, 91)])
    n = int(np.exp(rng.uniform(np.log(2), np.log(5000))))
    ndim = int(rng.integers(1, 4))
    if ndim == 1 or n < 4:
        return (n,)
    a = int(rng.integers(1, max(2, int(np.sqrt(n))) + 1))
    if ndim == 2:
        return (a, max(1, n // a))
    b = int(rng.integers(1, max(2, int(np.sqrt(n // a))) + 1))
    return (a, b, max(1, n // (a * b)))


def make_entries(seed, n, dtype, with_scales, large):
    """``n`` tensors: (param, grad, v, lr, momentum, loss scale or None)."""
    rng = np.random.default_rng(seed)
    entries = []
    big = int(rng.integers(0, n)) if large and n else -1
    for i in range(n):
        kind = rng.choice(["zero", "one", "any", "any", "any", "any"])
        shape = tuple(int(s) for s in random_shape(rng, kind, i == big))
        order = "F" if rng.random() < 0.3 else "C"
        p, g, v = (np.array(random_values(rng, shape, dtype), order=order) for _ in range(3))
        if rng.random() < 0.3:
            lr = float(rng.choice([0.0, 1e-3, 0.01, 0.1, 1.0]))
        else:
            lr = float(rng.uniform(0.0, 2.0))
        if rng.random() < 0.3:
            momentum = float(rng.choice([0.0, 0.5, 0.9, 0.99]))
        else:
            momentum = float(rng.uniform(-1.5, 1.5))
        scale = None
        if with_scales and rng.random() < 0.7:
            scale = rng.choice([1.0, 2.0, 3.3, 128.0, 1000.5, 8, 1024, 0.25])
            scale = int(scale) if float(scale).is_integer() and rng.random() < 0.5 \
                else float(scale)
        entries.append((p, g, v, lr, momentum, scale))
    return entries


def per_tensor(entries, steps, oracle=False):
    """Copies of the entries updated one by one (kernel or oracle)."""
    out = []
    for p, g, v, lr, m, s in entries:
        p, g, v = p.copy(order="K"), g.copy(order="K"), v.copy(order="K")
        for _ in range(steps):
            if s is not None:
                g /= float(s)
            if p.size == 0:
                continue
            if oracle:
                nesterov_ag_numpy(p, g, v, lr, m)
            else:
                nesterov_ag_cpu(p, g, v, lr, m, num_threads=1)
        out.append((p, g, v))
    return out


def assert_entries_equal(actual, expected, dtype, what):
    nan_payload = np.dtype(dtype) != F16
    for i, ((p, g, v), (pe, ge, ve)) in enumerate(zip(actual, expected)):
        assert_same_bits(p, pe, "%s: param %d" % (what, i), nan_payload)
        assert_same_bits(g, ge, "%s: grad %d" % (what, i), nan_payload)
        assert_same_bits(v, ve, "%s: v %d" % (what, i), nan_payload)


def table_of(entries, strict=True, with_scales=True):
    params = [e[0] for e in entries]
    grads = [e[1] for e in entries]
    vs = [e[2] for e in entries]
    lrs = [e[3] for e in entries]
    ms = [e[4] for e in entries]
    scales = [e[5] for e in entries] if with_scales else None
    return CPUTable(params, grads, vs, lrs, ms, scales, strict=strict)


# ---------------------------------------------------------------------------
# Kernel level: the table equals the per-tensor kernel and the oracle
# ---------------------------------------------------------------------------
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.one_of(st.integers(0, 12), st.integers(0, 300)),
       dtype=st.sampled_from(DTYPES),
       with_scales=st.booleans(),
       large=st.integers(0, 5).map(lambda k: k == 0),
       num_threads=st.sampled_from([1, 2, 3]),
       seed=st.integers(0, 2 ** 32 - 1))
def test_table_matches_per_tensor_kernel_and_oracle(n, dtype, with_scales, large,
                                                    num_threads, seed):
    entries = make_entries(seed, n, dtype, with_scales, large)
    steps = 2
    expected = per_tensor(entries, steps)
    oracle = per_tensor(entries, steps, oracle=True)
    table = table_of(entries, with_scales=with_scales)
    assert table.excluded == []
    assert table.dtype == (dtype if n else F32)
    nonempty = sum(1 for e in entries if e[0].size)
    assert len(table) == table.n_tensors <= nonempty
    assert table.n_elements == sum(e[0].size for e in entries)
    for _ in range(steps):
        table.run(num_threads=num_threads)
    actual = [(e[0], e[1], e[2]) for e in entries]
    assert_entries_equal(actual, expected, dtype, "table vs nesterov_ag_cpu")
    assert_entries_equal(actual, oracle, dtype, "table vs oracle")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_threads", [None, 1, 2, 3, 8])
def test_table_default_thread_count_and_large_tensor(dtype, num_threads):
    """One large tensor among small ones, with the default thread choice too."""
    entries = make_entries(11, 40, dtype, True, True)
    rng = np.random.default_rng(5)
    big = [np.array(random_values(rng, (300_001,), dtype)) for _ in range(3)]
    entries.insert(17, (big[0], big[1], big[2], 0.01, 0.9, 2.0))
    expected = per_tensor(entries, 1)
    table_of(entries).run(num_threads=num_threads)
    assert_entries_equal([e[:3] for e in entries], expected, dtype, "large tensor")


def test_empty_table():
    table = CPUTable([], [], [], 0.1, 0.9)
    assert table.n_tensors == 0 and table.n_elements == 0 and table.excluded == []
    table.run(num_threads=4)
    zero = np.zeros(0, np.float32)
    table = CPUTable([zero], [zero.copy()], [zero.copy()], 0.1, 0.9)
    assert table.n_tensors == 0 and table.excluded == []
    table.run()


@pytest.mark.parametrize("dtype", DTYPES)
def test_scalar_hyperparameters_broadcast_to_every_tensor(dtype):
    entries = make_entries(3, 20, dtype, False, False)
    entries = [(p, g, v, 0.05, 0.8, None) for p, g, v, _, _, _ in entries]
    expected = per_tensor(entries, 3)
    params, grads, vs = ([e[k] for e in entries] for k in range(3))
    table = CPUTable(params, grads, vs, 0.05, 0.8, loss_scale=None)
    for _ in range(3):
        table.run(num_threads=2)
    assert_entries_equal([e[:3] for e in entries], expected, dtype, "scalar hyperparameters")


def test_loss_scale_scalar_for_every_tensor():
    entries = make_entries(4, 10, F32, False, False)
    entries = [(p, g, v, lr, m, 16.0) for p, g, v, lr, m, _ in entries]
    expected = per_tensor(entries, 1)
    params, grads, vs = ([e[k] for e in entries] for k in range(3))
    CPUTable(params, grads, vs, [e[3] for e in entries], [e[4] for e in entries],
             loss_scale=16.0).run(num_threads=2)
    assert_entries_equal([e[:3] for e in entries], expected, F32, "scalar loss scale")


# ---------------------------------------------------------------------------
# Kernel level: work items cover every element exactly once
# ---------------------------------------------------------------------------
def _counting_table(sizes, dtype=F32):
    """Tensors where one update sets every element of param to exactly -1.

    ``p = 0, v = 0, g = 1, lr = 1, m = 0``: one update gives ``p = -1``; an
    element updated twice would read ``-2`` and one never updated ``0``.
    """
    params = [np.zeros(s, dtype) for s in sizes]
    grads = [np.ones(s, dtype) for s in sizes]
    vs = [np.zeros(s, dtype) for s in sizes]
    return params, CPUTable(params, grads, vs, 1.0, 0.0)


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.one_of(st.integers(0, 40), st.integers(0, 3000)), max_size=40),
       num_threads=st.integers(1, 9),
       dtype=st.sampled_from(DTYPES))
def test_work_items_cover_every_element_once(sizes, num_threads, dtype):
    params, table = _counting_table(sizes, dtype)
    total = sum(sizes)
    assert table.n_elements == total
    bounds, first = table.work_items(num_threads)
    assert bounds[0] == 0 and bounds[-1] == total
    assert len(first) == len(bounds) - 1
    if total:
        assert (np.diff(bounds) > 0).all()
        assert len(bounds) - 1 <= max(1, num_threads * multi_tensor.ITEMS_PER_THREAD)
        assert (bounds[1:-1] % ITEM_ALIGN == 0).all()
        cum = np.concatenate(([0], np.cumsum([s for s in sizes if s])))
        for b, f in zip(bounds[:-1], first):
            assert cum[f] <= b < cum[f + 1]
    table.run(num_threads=num_threads)
    for i, p in enumerate(params):
        assert (p == -1).all(), "tensor %d (size %d): %r" % (i, p.size, np.unique(p))


def test_work_items_many_threads_few_elements():
    params, table = _counting_table([1, 0, 2, 0, 0, 1])
    for k in (1, 2, 16, 64):
        bounds, first = table.work_items(k)
        assert list(bounds) == [0, 4]
    table.run(num_threads=64)
    assert all((p == -1).all() for p in params)


# ---------------------------------------------------------------------------
# Kernel level: exclusion
# ---------------------------------------------------------------------------
def _good(n=6, dtype=F32, seed=0):
    rng = np.random.default_rng(seed)
    return [random_values(rng, (n,), dtype) for _ in range(3)]


def _strided(dtype=F32):
    rng = np.random.default_rng(1)
    return [random_values(rng, (12,), dtype)[::2] for _ in range(3)]


def _bad_entry(kind):
    """(arrays of the bad entry, its loss scale, its lr, its momentum)."""
    if kind == "strided_param":
        p = _good(12)[0][::2]
        return [p] + _good()[1:], None, 0.1, 0.9
    if kind == "strided_grad":
        return [_good()[0], _good(12)[1][::2], _good()[2]], None, 0.1, 0.9
    if kind == "strided_all":
        return _strided(), None, 0.1, 0.9
    if kind == "mixed_c_and_f":
        a = np.arange(12, dtype=np.float32).reshape(3, 4)
        return [a.copy(), np.asfortranarray(a), a.copy()], None, 0.1, 0.9
    if kind == "wrong_dtype":
        return _good(dtype=F64), None, 0.1, 0.9
    if kind == "grad_wrong_dtype":
        g = _good(dtype=F64)
        return [_good()[0], g[1], _good()[2]], None, 0.1, 0.9
    if kind == "wrong_shape":
        return [_good(6)[0], _good(7)[1], _good(6)[2]], None, 0.1, 0.9
    if kind == "zero_d":
        return [np.array(1.5, np.float32), np.array(0.5, np.float32),
                np.array(0.0, np.float32)], None, 0.1, 0.9
    if kind == "readonly_param":
        a = _good()
        a[0].flags.writeable = False
        return a, None, 0.1, 0.9
    if kind == "readonly_v":
        a = _good()
        a[2].flags.writeable = False
        return a, None, 0.1, 0.9
    if kind == "readonly_grad_with_scale":
        a = _good()
        a[1].flags.writeable = False
        return a, 4.0, 0.1, 0.9
    if kind == "broadcast_grad":
        a = _good()
        return [a[0], np.broadcast_to(np.float32(0.5), (6,)), a[2]], None, 0.1, 0.9
    if kind == "byteswapped":
        return [x.astype(x.dtype.newbyteorder()) for x in _good()], None, 0.1, 0.9
    if kind == "lr_overflows_float32":
        return _good(), None, 1e39, 0.9
    if kind == "momentum_square_overflows_float32":
        return _good(), None, 0.1, 1e20
    if kind == "c_overflows_float32":
        return _good(), None, 3e38, 0.9
    if kind == "loss_scale_overflows_float32":
        return _good(), 1e39, 0.1, 0.9
    if kind == "loss_scale_numpy_scalar":
        return _good(), np.float32(2.0), 0.1, 0.9
    if kind == "loss_scale_bool":
        return _good(), True, 0.1, 0.9
    if kind == "loss_scale_huge_int":
        return _good(), 2 ** 60 + 1, 0.1, 0.9
    if kind == "param_is_grad":
        a = _good()
        return [a[0], a[0], a[2]], None, 0.1, 0.9
    if kind == "grad_is_v":
        a = _good()
        return [a[0], a[1], a[1]], None, 0.1, 0.9
    raise AssertionError(kind)


EXCLUDED_KINDS = [
    "strided_param", "strided_grad", "strided_all", "mixed_c_and_f", "wrong_dtype",
    "grad_wrong_dtype", "wrong_shape", "zero_d", "readonly_param", "readonly_v",
    "readonly_grad_with_scale", "broadcast_grad", "byteswapped", "lr_overflows_float32",
    "momentum_square_overflows_float32", "c_overflows_float32",
    "loss_scale_overflows_float32", "loss_scale_numpy_scalar", "loss_scale_bool",
    "loss_scale_huge_int", "param_is_grad", "grad_is_v",
]


def _table_with_bad(kind, position, strict):
    good = [_good(n, seed=10 + i) for i, n in enumerate([5, 33, 1, 70])]
    params = [a[0] for a in good]
    grads = [a[1] for a in good]
    vs = [a[2] for a in good]
    lrs, ms, scales = [0.1] * 4, [0.9] * 4, [None, 2.0, None, 3.0]
    bad, scale, lr, m = _bad_entry(kind)
    params.insert(position, bad[0])
    grads.insert(position, bad[1])
    vs.insert(position, bad[2])
    lrs.insert(position, lr)
    ms.insert(position, m)
    scales.insert(position, scale)
    before = [(p.copy(), g.copy(), v.copy()) for p, g, v in zip(params, grads, vs)]
    table = CPUTable(params, grads, vs, lrs, ms, scales, strict=strict)
    return table, (params, grads, vs, lrs, ms, scales), before


@pytest.mark.parametrize("kind", EXCLUDED_KINDS)
def test_entry_is_excluded_and_left_alone(kind):
    table, (params, grads, vs, lrs, ms, scales), before = _table_with_bad(kind, 2, False)
    assert table.excluded == [2]
    assert table.n_tensors == 4
    table.run(num_threads=2)
    for i in range(5):
        if i == 2:
            for a, b, name in zip((params[i], grads[i], vs[i]), before[i], "pgv"):
                assert_same_bits(a, b, "excluded entry's %s" % name)
            continue
        p, g, v = (x.copy() for x in before[i])
        if scales[i] is not None:
            g /= float(scales[i])
        nesterov_ag_cpu(p, g, v, lrs[i], ms[i])
        assert_same_bits(params[i], p, "param %d" % i)
        assert_same_bits(grads[i], g, "grad %d" % i)
        assert_same_bits(vs[i], v, "v %d" % i)


@pytest.mark.parametrize("kind", EXCLUDED_KINDS)
@pytest.mark.parametrize("position", [1, 4])
def test_strict_table_names_the_entry(kind, position):
    with pytest.raises(ValueError, match=r"entry %d\b" % position):
        _table_with_bad(kind, position, True)


def test_strict_names_the_first_bad_entry():
    a = _good()
    a[0].flags.writeable = False
    c = _strided()
    with pytest.raises(ValueError, match=r"entry 1\b"):
        CPUTable([_good()[0], a[0], c[0]], [_good()[1], a[1], c[1]],
                 [_good()[2], a[2], c[2]], 0.1, 0.9)


def test_float64_keeps_coefficients_float32_cannot():
    arrays = _good(dtype=F64)
    table = CPUTable([arrays[0]], [arrays[1]], [arrays[2]], [1e39], [0.9], strict=True)
    assert table.excluded == [] and table.n_tensors == 1
    coef, ok = coefficient_table(F32, [1e39, 0.1, 0.1], [0.9, 1e20, 0.9], [None, None, 1e39])
    assert ok.tolist() == [False, False, False]
    coef, ok = coefficient_table(F64, [1e39, 0.1], [0.9, 1e20], [None, 1e39])
    assert ok.tolist() == [True, True]


def test_float16_loss_scale_beyond_float16_is_excluded():
    arrays = _good(dtype=F16)
    table = CPUTable([arrays[0]], [arrays[1]], [arrays[2]], 0.1, 0.9, [70000.0], strict=False)
    assert table.excluded == [0]
    table = CPUTable([arrays[0]], [arrays[1]], [arrays[2]], 0.1, 0.9, [60000.0], strict=False)
    assert table.excluded == []


def test_read_only_grad_without_loss_scale_is_fine():
    p, g, v = _good()
    g.flags.writeable = False
    pe, ge, ve = p.copy(), g.copy(), v.copy()
    table = CPUTable([p], [g], [v], 0.1, 0.9, [None])
    assert table.excluded == [] and table.verify()
    table.run()
    nesterov_ag_cpu(pe, ge, ve, 0.1, 0.9)
    assert_same_bits(p, pe, "param")
    assert_same_bits(v, ve, "v")


def test_python_float_hyperparameters_required():
    p, g, v = _good()
    with pytest.raises(TypeError, match="lr"):
        CPUTable([p], [g], [v], np.float32(0.1), 0.9)
    with pytest.raises(TypeError, match="momentum"):
        CPUTable([p], [g], [v], 0.1, [1])
    with pytest.raises(ValueError):
        CPUTable([p], [g], [v], [0.1, 0.2], 0.9)
    with pytest.raises(ValueError):
        CPUTable([p], [g, g], [v], 0.1, 0.9)
    with pytest.raises(TypeError):
        CPUTable([p.tolist()], [g], [v], 0.1, 0.9)
    with pytest.raises(TypeError):
        CPUTable([p.astype(np.int32)], [g], [v], 0.1, 0.9)


@pytest.mark.parametrize("what", ["param", "v", "grad_scaled"])
def test_writeable_notices_arrays_made_read_only_in_place(what):
    p, g, v = _good()
    table = CPUTable([p], [g], [v], 0.1, 0.9, [2.0 if what == "grad_scaled" else None])
    assert table.verify()
    {"param": p, "v": v, "grad_scaled": g}[what].flags.writeable = False
    assert not table.verify()


def test_table_cannot_be_copied_or_pickled():
    p, g, v = _good()
    table = CPUTable([p], [g], [v], 0.1, 0.9)
    with pytest.raises(TypeError):
        pickle.dumps(table)
    with pytest.raises(TypeError):
        copy.deepcopy(table)


# ---------------------------------------------------------------------------
# Kernel level: overlap detection
# ---------------------------------------------------------------------------
def test_param_view_overlapping_another_entry_excludes_both():
    rng = np.random.default_rng(2)
    buf = random_values(rng, (20,), F32)
    a = [buf[0:10], random_values(rng, (10,), F32), random_values(rng, (10,), F32)]
    b = [buf[5:15], random_values(rng, (10,), F32), random_values(rng, (10,), F32)]
    c = _good(10)
    table = CPUTable([a[0], c[0], b[0]], [a[1], c[1], b[1]], [a[2], c[2], b[2]], 0.1, 0.9,
                     strict=False)
    assert table.excluded == [0, 2]
    with pytest.raises(ValueError, match=r"entry 0\b"):
        CPUTable([a[0], c[0], b[0]], [a[1], c[1], b[1]], [a[2], c[2], b[2]], 0.1, 0.9)


@pytest.mark.parametrize("shared", ["grad", "v", "param", "grad_is_other_param",
                                    "v_is_other_grad", "last_byte"])
def test_overlapping_entries_are_excluded(shared):
    x, y, z = _good(8, seed=1), _good(8, seed=2), _good(8, seed=3)
    if shared == "grad":
        y[1] = x[1]
    elif shared == "v":
        y[2] = x[2]
    elif shared == "param":
        y[0] = x[0]
    elif shared == "grad_is_other_param":
        y[1] = x[0]
    elif shared == "v_is_other_grad":
        y[2] = x[1]
    else:  # views sharing one element only
        buf = np.zeros(15, np.float32)
        x[0], y[0] = buf[0:8], buf[7:15]
    table = CPUTable([x[0], z[0], y[0]], [x[1], z[1], y[1]], [x[2], z[2], y[2]], 0.1, 0.9,
                     strict=False)
    assert table.excluded == [0, 2]


def test_disjoint_views_of_one_buffer_are_not_overlapping():
    buf = np.zeros(30, np.float32)
    views = [buf[0:5], buf[5:10], buf[10:15], buf[15:20], buf[20:25], buf[25:30]]
    table = CPUTable([views[0], views[3]], [views[1], views[4]], [views[2], views[5]],
                     0.1, 0.9)
    assert table.excluded == [] and table.n_tensors == 2


def test_many_entries_one_overlap_found():
    rng = np.random.default_rng(9)
    sizes = [int(rng.integers(1, 50)) for _ in range(200)]
    sizes[150] = sizes[37]
    entries = [_good(n, seed=i) for i, n in enumerate(sizes)]
    entries[150][1] = entries[37][2]  # grad of 150 is v of 37
    table = CPUTable([e[0] for e in entries], [e[1] for e in entries],
                     [e[2] for e in entries], 0.1, 0.9, strict=False)
    assert table.excluded == [37, 150]


# ---------------------------------------------------------------------------
# Kernel level: adjacent entries merge
# ---------------------------------------------------------------------------
def _views_of_buffers(sizes, dtype=F32, seed=0, gap_after=None, order=None):
    rng = np.random.default_rng(seed)
    total = sum(sizes) + (0 if gap_after is None else 3)
    bufs = [random_values(rng, (total,), dtype) for _ in range(3)]
    out = []
    offset = 0
    for i, s in enumerate(sizes):
        out.append([b[offset:offset + s] for b in bufs])
        offset += s
        if i == gap_after:
            offset += 3
    if order is not None:
        out = [out[i] for i in order]
    return bufs, out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,rows", [("adjacent", 1), ("gap", 2), ("lr_differs", 3),
                                       ("scale_differs", 2), ("reordered", 4),
                                       ("with_empty", 1)])
def test_adjacent_entries_merge_into_one_row(dtype, case, rows):
    sizes = [10, 37, 0, 200, 1, 64] if case == "with_empty" else [10, 37, 200, 1, 64]
    n = len(sizes)
    lrs, scales = [0.05] * n, [None] * n
    kwargs = {}
    if case == "gap":
        kwargs["gap_after"] = 1
    if case == "reordered":
        kwargs["order"] = [0, 1, 3, 2, 4]
    if case == "lr_differs":
        lrs[2] = 0.01
    if case == "scale_differs":
        scales = [4.0] * 3 + [None] * 2
    _, views = _views_of_buffers(sizes, dtype, **kwargs)
    entries = [(p, g, v, lr, 0.9, s) for (p, g, v), lr, s in zip(views, lrs, scales)]
    expected = per_tensor(entries, 2)
    table = table_of(entries)
    assert table.excluded == []
    assert table.n_tensors == rows
    assert table.n_elements == sum(sizes)
    table.run(num_threads=3)
    table.run(num_threads=1)
    assert_entries_equal([e[:3] for e in entries], expected, dtype, case)


def test_merge_of_reshaped_views_of_one_buffer():
    """Multi-d views (as contiguous mode makes them) merge too."""
    bufs = [np.arange(60, dtype=np.float64) / 7 for _ in range(3)]
    shapes = [(3, 4), (2, 2, 3), (6,), (2, 3)]
    views, offset = [], 0
    for s in shapes:
        n = int(np.prod(s))
        views.append([b[offset:offset + n].reshape(s) for b in bufs])
        offset += n
    entries = [(p, g, v, 0.1, 0.9, None) for p, g, v in views]
    expected = per_tensor(entries, 1)
    table = table_of(entries, with_scales=False)
    assert table.n_tensors == 1 and table.n_elements == 36
    table.run(num_threads=2)
    assert_entries_equal([e[:3] for e in entries], expected, F64, "reshaped views")


# ---------------------------------------------------------------------------
# Optimizer level: helpers
# ---------------------------------------------------------------------------
def _bits_or_none(a):
    if a is None:
        return None
    a = np.asarray(a)
    return (a.dtype.str, a.shape, np.ascontiguousarray(a).tobytes())


def state_of(model, opt):
    """Everything a step changes, as comparable values (bits for arrays)."""
    out = {"opt.t": opt.t, "opt.epoch": opt.epoch}
    for path, p in model.namedparams():
        rule = p.update_rule
        entry = {"array": _bits_or_none(p.array), "grad": _bits_or_none(p.grad)}
        if rule is not None:
            entry["t"] = rule.t
            entry["state"] = None if rule.state is None else {
                k: _bits_or_none(v) for k, v in rule.state.items()}
            master = getattr(rule, "_fp32_param", None)
            entry["master"] = None if master is None else _bits_or_none(master.array)
        out[path] = entry
    ls = getattr(opt, "_loss_scale", None)
    out["loss_scale"] = ls
    return out


def assert_same_state(a, b, where):
    assert a.keys() == b.keys(), (where, sorted(a), sorted(b))
    for key in a:
        assert a[key] == b[key], "%s: %s differs:\n multi:    %r\n per-param: %r" % (
            where, key, a[key], b[key])


def run_both(setup, step, n_steps=22, check=None):
    """Run ``setup``/``step`` with and without the multi-tensor path; compare per step.

    ``setup()`` returns ``(model, opt)``; ``step(model, opt, i)`` does step
    ``i`` (assigning gradients and calling ``opt.update``).  ``check(model,
    opt, i)``, if given, runs after each step of the multi-tensor run.
    Returns the two ``(model, opt)`` pairs.
    """
    runs = []
    trajectories = []
    for multi in (True, False):
        model, opt = setup()
        opt.use_multi_tensor(multi)
        traj = []
        for i in range(n_steps):
            step(model, opt, i)
            traj.append(state_of(model, opt))
            if multi and check is not None:
                check(model, opt, i)
        runs.append((model, opt))
        trajectories.append(traj)
    for i, (a, b) in enumerate(zip(*trajectories)):
        assert_same_state(a, b, "step %d" % i)
    return runs


def grads_for(model, step, scale=1.0, seed=0):
    """Deterministic gradients for the initialized parameters of ``model``."""
    out = {}
    for path, p in model.namedparams():
        if p.array is None:
            continue
        rng = np.random.default_rng([seed, step, sum(map(ord, path))])
        g = np.empty_like(p.array)  # the parameter's memory order
        g[...] = rng.standard_normal(p.shape) * scale
        out[path] = g
    return out


def layer(rng, shapes, dtype=np.float32):
    link = Link()
    with link.init_scope():
        for name, shape in shapes.items():
            setattr(link, name, Parameter(np.asarray(rng.standard_normal(shape)).astype(dtype)))
    return link


class _Init:
    """An initializer that fills with fixed random values (and carries a dtype)."""

    def __init__(self, dtype, seed):
        self.dtype = np.dtype(dtype)
        self.seed = seed

    def __call__(self, array):
        array[...] = np.random.default_rng(self.seed).standard_normal(array.shape)


def _grad_hook(rule, param):
    """A rule-level 'pre' hook: weight decay on the gradient, in place."""
    param.grad += param.grad.dtype.type(1e-3) * param.array


def mixed_model(seed=0):
    """Parameters of many kinds (see the comments); the update rules are set by setup."""
    rng = np.random.default_rng(seed)
    model = Chain()
    with model.init_scope():
        model.l1 = layer(rng, {"W": (4, 5), "b": (5,)})
        model.l2 = layer(rng, {"W": (3, 3), "b": (3,)}, np.float64)
        model.h = layer(rng, {"W": (6,), "b": (2, 2)}, np.float16)
        model.frozen = layer(rng, {"W": (3,), "b": (2,)})
        model.misc = Link()
    misc = model.misc
    with misc.init_scope():
        misc.scalar = Parameter(np.asarray(rng.standard_normal(), np.float32))  # 0-d
        base = rng.standard_normal(14).astype(np.float32)
        misc.strided = Parameter(base[::2])  # a non-contiguous view
        misc.fortran = Parameter(np.asfortranarray(rng.standard_normal((3, 4))))
        misc.hooked = Parameter(rng.standard_normal(7).astype(np.float32))
        misc.override = Parameter(rng.standard_normal(9).astype(np.float32))
        misc.disabled = Parameter(rng.standard_normal(4).astype(np.float64))
        misc.late = Parameter(_Init(np.float32, seed + 1))  # uninitialized
        misc.empty = Parameter(np.zeros((0, 3), np.float32))
        misc.one = Parameter(np.ones(1, np.float16))
    return model


def setup_mixed(model, opt):
    opt.setup(model)
    model.frozen.disable_update()
    model.misc.disabled.update_rule.enabled = False
    model.misc.hooked.update_rule.add_hook(_grad_hook, name="decay", timing="pre")
    model.misc.override.update_rule.hyperparam.lr = 0.05
    return model, opt


def assign_grads(model, step, how="new", scale=1.0):
    grads = grads_for(model, step, scale)
    for path, p in model.namedparams():
        if path not in grads:
            continue
        if how == "inplace" and p.grad is not None and p.grad.shape == p.shape:
            p.grad[...] = grads[path]
        else:
            p.grad = grads[path]


def mixed_step(how):
    def step(model, opt, i):
        if i == 4:
            model.misc.late.initialize((2, 3))
        if how == "cleargrads":
            model.cleargrads()
            grads = grads_for(model, i)
            for k, (path, p) in enumerate(model.namedparams()):
                if path in grads and (k + i) % 3:
                    p.grad = grads[path]  # the others stay None: zeros
        else:
            assign_grads(model, i, how)
        opt.update()
    return step


# ---------------------------------------------------------------------------
# Optimizer level: trajectories
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["new", "inplace", "cleargrads"])
def test_mixed_model_trajectories_identical(how):
    def setup():
        return setup_mixed(mixed_model(), NesterovAG(lr=0.02, momentum=0.9))

    def check(model, opt, i):
        plan = opt.multi_tensor_plan()
        rest = set(plan["rest"])
        for path in ("/misc/scalar", "/misc/strided", "/misc/hooked", "/misc/disabled",
                     "/frozen/W", "/frozen/b"):
            assert path in rest, (path, plan)
        for path in ("/l1/W", "/l1/b", "/l2/W", "/l2/b", "/h/W", "/h/b", "/misc/override",
                     "/misc/fortran", "/misc/one"):
            assert path not in rest, (path, plan)
        assert ("/misc/late" in rest) == (i < 4)
        groups = {(g["device"], g["dtype"]): g for g in plan["groups"]}
        assert set(groups) == {("cpu", "float16"), ("cpu", "float32"), ("cpu", "float64")}
        assert groups[("cpu", "float64")]["params"] == 3  # l2/W, l2/b, misc/fortran
        assert groups[("cpu", "float16")]["params"] == 3  # h/W, h/b, misc/one
        n32 = 4 + (1 if i >= 4 else 0)  # l1/W, l1/b, override, empty (+ late)
        assert groups[("cpu", "float32")]["params"] == n32
        assert all(g["table_rows"] is not None for g in plan["groups"])

    (model, opt), _ = run_both(setup, mixed_step(how), check=check)
    # the frozen and disabled parameters never moved, the others did
    assert model.frozen.W.update_rule.t == 0 and model.misc.disabled.update_rule.t == 0
    # an uninitialized parameter's rule counts its steps too (as in Chainer)
    assert model.l1.W.update_rule.t == 22 and model.misc.late.update_rule.t == 22


def test_plan_before_the_first_update_has_everything_in_rest():
    """Rules without state (before their first update) are updated one by one."""
    model, opt = setup_mixed(mixed_model(), NesterovAG())
    assign_grads(model, 0)
    plan = opt.multi_tensor_plan()
    assert plan["groups"] == []
    assert len(plan["rest"]) == len(list(model.namedparams()))
    opt.update()
    assert len(opt.multi_tensor_plan()["groups"]) == 3
    opt.use_multi_tensor(False)
    assert opt.multi_tensor_plan() is None


def _count_collects(monkeypatch):
    """A list that gets ``scanned`` of every call of the general path's ``Plan.collect``."""
    from cynag import _multi_tensor

    collects = []
    original = _multi_tensor.Plan.collect

    def counting(self, scanned=False):
        collects.append(scanned)
        return original(self, scanned)

    monkeypatch.setattr(_multi_tensor.Plan, "collect", counting)
    return collects


@pytest.mark.parametrize("contiguous", [False, True])
def test_usual_step_is_one_native_call(monkeypatch, contiguous):
    """Once every rule has state, a step without 'pre' hooks is one call of
    _step.step (the general path's collect never runs), with the per-parameter
    path's bits, for every dtype, empty arrays and contiguous mode; 'post'
    hooks still run after it."""
    collects = _count_collects(monkeypatch)
    posts = []

    def setup():
        rng = np.random.default_rng(5)
        model = ChainList(*[layer(rng, {"W": (int(rng.integers(0, 30)),),
                                        "b": (int(rng.integers(1, 4)), 2)}, dtype)
                            for dtype in (np.float16, np.float32, np.float64) * 5])
        opt = NesterovAG(lr=0.01, momentum=0.95)
        opt.setup(model, contiguous=contiguous) if contiguous else opt.setup(model)
        opt.add_hook(lambda o: posts.append(o.t), name="post", timing="post")
        return model, opt

    def step(model, opt, i):
        del collects[:]
        assign_grads(model, i, "inplace" if i % 2 else "new")
        opt.update()
        if i and opt._use_multi_tensor:
            assert collects == [], i  # nothing but the native call

    (model, opt), _ = run_both(setup, step)
    assert posts == list(range(1, 23)) * 2
    assert all(p.update_rule.t == 22 for p in model.params())


def test_usual_step_falls_back_without_a_change(monkeypatch):
    """Where the one call cannot do the step (a cleared gradient, overlapping
    arrays, a rule with a hook) the general path goes on from its scan: the
    per-parameter path's bits."""
    collects = _count_collects(monkeypatch)

    def setup():
        rng = np.random.default_rng(6)
        model = ChainList(*[layer(rng, {"W": (7,), "b": (3,)}, np.float32)
                            for _ in range(4)])
        return model, NesterovAG(lr=0.01, momentum=0.9).setup(model)

    def step(model, opt, i):
        del collects[:]
        assign_grads(model, i)
        if i == 3:
            model[1].W.grad = None  # cleared: zeros, as Chainer reallocates
        if i == 5:
            model[2].b.grad = model[3].b.grad  # one gradient, two rows: by their rules
        if i == 7:
            model[0].W.update_rule.add_hook(_grad_hook, name="decay", timing="pre")
        if i == 9:
            model[0].W.update_rule.remove_hook("decay")
        opt.update()
        if opt._use_multi_tensor and i:
            expected = [True] if i in (3, 5, 7, 8) else []
            assert collects == expected, (i, collects)

    run_both(setup, step, n_steps=12)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_many_small_params_trajectory(dtype):
    def setup():
        rng = np.random.default_rng(3)
        model = ChainList(*[layer(rng, {"W": (int(rng.integers(1, 30)),),
                                        "b": (int(rng.integers(1, 4)), 2)}, dtype)
                            for _ in range(60)])
        return model, NesterovAG(lr=0.01, momentum=0.95).setup(model)

    def step(model, opt, i):
        assign_grads(model, i, "inplace" if i % 2 else "new")
        opt.update()

    (model, opt), _ = run_both(setup, step)
    plan = opt.multi_tensor_plan()
    assert plan["rest"] == [] and len(plan["groups"]) == 1
    assert plan["groups"][0]["params"] == 120


def test_shared_parameter_updated_twice_in_both_modes():
    """A parameter registered twice is visited twice, as in Chainer."""
    def setup():
        rng = np.random.default_rng(4)
        shared = layer(rng, {"W": (5,)})
        model = Chain()
        with model.init_scope():
            model.a = shared
            model.b = shared
            model.c = layer(rng, {"W": (3,)})
        return model, NesterovAG(lr=0.1).setup(model)

    def step(model, opt, i):
        assign_grads(model, i)
        opt.update()

    (model, opt), _ = run_both(setup, step, n_steps=8)
    assert model.a.W.update_rule.t == 16
    assert "/a/W" in opt.multi_tensor_plan()["rest"]


def test_parameter_overlapping_a_rest_parameter():
    """A dense parameter sharing memory with a strided one (updated one by one).

    Per parameter, the updates happen in the target's order: ``/a`` (the
    strided view) first, then ``/b``.  The multi-tensor path must keep that
    order for parameters whose memory overlaps, or leave both to the
    per-parameter loop (the plan's docstring: a grouped parameter's arrays
    "overlap no other parameter's arrays").
    """
    def setup():
        rng = np.random.default_rng(0)
        buf = rng.standard_normal(16).astype(np.float32)
        model = Link()
        with model.init_scope():
            model.a = Parameter(buf[::2])
            model.b = Parameter(buf)
            model.c = Parameter(rng.standard_normal(5).astype(np.float32))
        return model, NesterovAG(lr=0.1).setup(model)

    def step(model, opt, i):
        assign_grads(model, i)
        opt.update()

    run_both(setup, step, n_steps=10)


def test_frozen_link_enabled_again_mid_training():
    def setup():
        return setup_mixed(mixed_model(), NesterovAG())

    def step(model, opt, i):
        if i == 5:
            model.frozen.enable_update()
            model.misc.disabled.update_rule.enabled = True
        if i == 12:
            model.l1.disable_update()
        if i == 15:
            model.misc.hooked.update_rule.remove_hook("decay")
        if i == 18:
            model.l2.W.update_rule.add_hook(_grad_hook, name="decay", timing="post")
        assign_grads(model, i)
        opt.update()

    (model, opt), _ = run_both(setup, step)
    rest = opt.multi_tensor_plan()["rest"]
    assert "/frozen/W" not in rest and "/l1/W" in rest and "/l2/W" in rest
    assert "/misc/hooked" not in rest


class _StaticLoss:
    def __init__(self, model, step, expected_scale):
        self.model, self.step, self.expected = model, step, expected_scale

    def backward(self, loss_scale=None):
        assert loss_scale == self.expected
        for path, g in grads_for(self.model, self.step, loss_scale or 1.0).items():
            p = dict(self.model.namedparams())[path]
            assert p.grad is None
            p.grad = g


@pytest.mark.parametrize("scale", [128.0, 64, 3.3])
def test_static_loss_scaling_with_lossfun(scale):
    def setup():
        model, opt = setup_mixed(mixed_model(), NesterovAG(lr=0.01))
        opt.loss_scaling(scale=scale)
        return model, opt

    def step(model, opt, i):
        if i == 4:
            model.misc.late.initialize((2, 3))
        opt.update(lambda: _StaticLoss(model, i, scale))

    (model, opt), _ = run_both(setup, step)
    groups = opt.multi_tensor_plan()["groups"]
    assert sum(g["params"] for g in groups) >= 10


def test_static_loss_scale_on_params_without_lossfun():
    def setup():
        model, opt = setup_mixed(mixed_model(), NesterovAG())
        for p in model.params():
            p._loss_scale = 8.0
        model.l2.b._loss_scale = None
        model.h.W._loss_scale = 3
        return model, opt

    def step(model, opt, i):
        assign_grads(model, i, "new", scale=8.0)
        if i == 10:
            model.l1.W._loss_scale = 2.0
        opt.update()

    run_both(setup, step)


class _DynLoss:
    def __init__(self, model, step):
        self.model, self.step = model, step

    def backward(self, loss_scale=None):
        grads = grads_for(self.model, self.step, loss_scale)
        if self.step in (3, 9, 10):
            paths = sorted(k for k, g in grads.items() if g.size)
            grads[paths[self.step % len(paths)]].flat[0] = np.inf
        for path, g in grads.items():
            dict(self.model.namedparams())[path].grad = g


def test_dynamic_loss_scaling():
    def setup():
        model, opt = setup_mixed(mixed_model(), NesterovAG(lr=0.01))
        opt.loss_scaling(interval=2)
        return model, opt

    def step(model, opt, i):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.update(lambda: _DynLoss(model, i))

    (model, opt), (model2, opt2) = run_both(setup, step)
    assert opt._loss_scale == opt2._loss_scale and opt._loss_scale != 1.0


def test_fp32_update_with_float16():
    def setup():
        model, opt = setup_mixed(mixed_model(), NesterovAG(lr=0.01))
        opt.use_fp32_update()
        return model, opt

    def step(model, opt, i):
        if i == 7:
            opt.loss_scaling(scale=4.0)
        if i < 7:
            assign_grads(model, i)
            opt.update()
        else:
            opt.update(lambda: _StaticLoss(model, i, 4.0))

    (model, opt), _ = run_both(setup, step)
    rest = opt.multi_tensor_plan()["rest"]
    assert "/h/W" in rest and "/h/b" in rest and "/misc/one" in rest
    assert "/l1/W" not in rest


class _ForEach:
    """A call_for_each_param optimizer hook."""

    call_for_each_param = True

    def __init__(self, fn, timing="pre"):
        self.fn = fn
        self.timing = timing
        self.name = fn.__name__

    def __call__(self, rule, param):
        if param.grad is not None:
            self.fn(rule, param)


def _scale_in_place(rule, param):
    param.grad *= param.grad.dtype.type(0.5)


def _replace_grad(rule, param):
    param.grad = np.asarray(param.grad * param.grad.dtype.type(0.75))  # 0-d: an array


def _clear_some(rule, param):
    if param.name in ("b", "override"):
        param.cleargrad()


def _clip_params(rule, param):
    np.clip(param.array, -3, 3, out=param.array)


def test_optimizer_hooks():
    def setup():
        model, opt = setup_mixed(mixed_model(), NesterovAG(lr=0.02))
        opt.add_hook(_ForEach(_scale_in_place), timing="pre")
        opt.add_hook(_ForEach(_replace_grad), timing="pre")
        opt.add_hook(_ForEach(_clear_some), timing="pre")
        opt.add_hook(_ForEach(_clip_params, "post"), timing="post")

        def lr_schedule(o):
            o.lr = 0.02 / (1 + o.t % 4)
            o.momentum = 0.9 if o.t % 3 else 0.5

        opt.add_hook(lr_schedule, name="schedule", timing="pre")
        return model, opt

    run_both(setup, mixed_step("new"))
    run_both(setup, mixed_step("inplace"))


def test_hyperparameters_changed_between_steps():
    def setup():
        return setup_mixed(mixed_model(), NesterovAG())

    def step(model, opt, i):
        if i % 3 == 0:
            opt.lr = 0.01 * (1 + i % 5)
        if i % 4 == 1:
            opt.momentum = [0.9, 0.5, 0.0, 0.99][(i // 4) % 4]
        if i == 6:
            model.l1.W.update_rule.hyperparam.lr = 0.2        # a new override
        if i == 9:
            model.l1.W.update_rule.hyperparam.lr = 0.3        # a new value
            model.h.b.update_rule.hyperparam.momentum = 0.7
        if i == 12:
            del model.l1.W.update_rule.hyperparam.lr          # back to the optimizer's
        if i == 14:
            model.l2.W.update_rule.hyperparam.lr = 1e39       # too large for float32 only
            model.l1.b.update_rule.hyperparam.lr = 1e39       # float32: promoted path
        if i == 16:
            opt.lr = np.float32(0.01)                         # not a Python float
        if i == 18:
            opt.lr = 1                                        # an int
        if i == 20:
            opt.lr = 0.01
            del model.l2.W.update_rule.hyperparam.lr
            del model.l1.b.update_rule.hyperparam.lr
        assign_grads(model, i, "inplace")
        with np.errstate(all="ignore"):
            opt.update()

    run_both(setup, step)


def test_state_and_arrays_replaced_between_steps():
    def setup():
        return setup_mixed(mixed_model(), NesterovAG())

    def step(model, opt, i):
        if i == 3:
            rule = model.l1.W.update_rule
            rule.state["v"] = rule.state["v"] * 2  # a new array
        if i == 5:
            model.l1.b.array = model.l1.b.array + 1  # a new parameter array
            model.h.W.array = model.h.W.array.copy()
        if i == 7:
            model.l2.b.update_rule.state["v"][...] = 0.25  # in place
        if i == 9:
            model.l1.W.array = np.asfortranarray(model.l1.W.array)  # F-order, grads C
        if i == 11:
            v = model.l2.W.update_rule.state["v"]
            model.l2.W.update_rule.state["v"] = np.asfortranarray(v)
        if i == 13:
            model.l1.W.array = np.ascontiguousarray(model.l1.W.array)
            model.l1.W.update_rule.state["v"] = np.asfortranarray(
                model.l1.W.update_rule.state["v"])
        if i == 15:
            rule = model.l1.b.update_rule
            rule.state["v"] = rule.state["v"][:]  # a view of the same memory
        assign_grads(model, i, "new")
        opt.update()

    run_both(setup, step)


def test_params_and_links_added_mid_training():
    def setup():
        return setup_mixed(mixed_model(), NesterovAG())

    def step(model, opt, i):
        if i == 4:
            with model.l1.init_scope():
                # added after setup: no update rule, never updated (as in Chainer)
                model.l1.c = Parameter(np.ones(3, np.float32))
        if i == 6:
            with model.l2.init_scope():
                model.l2.c = Parameter(np.linspace(0, 1, 4))
            model.l2.c.update_rule = opt.create_update_rule()
        if i == 9:
            rng = np.random.default_rng(7)
            new = layer(rng, {"W": (2, 2), "b": (2,)})
            for p in new.params():
                p.update_rule = opt.create_update_rule()
            model.add_link("l3", new)
        if i == 13:
            delattr(model.l2, "c")
        if i == 15:
            model.misc.hooked.update_rule = opt.create_update_rule()  # a fresh rule
        assign_grads(model, i)
        opt.update()

    (model, opt), _ = run_both(setup, step)
    assert model.l1.c.update_rule is None
    assert np.array_equal(model.l1.c.array, np.ones(3, np.float32))
    assert model.l3.W.update_rule.t == 13
    assert "/l3/W" not in opt.multi_tensor_plan()["rest"]


def test_rule_t_assignment():
    def setup():
        return setup_mixed(mixed_model(), NesterovAG())

    def step(model, opt, i):
        if i == 5:
            model.l1.W.update_rule.t = 5
            model.misc.hooked.update_rule.t = 100
        if i == 8:
            for p in model.params():
                if p.update_rule is not None:
                    p.update_rule.t = 0
        if i == 11:
            opt.t = 3
        assign_grads(model, i)
        opt.update()
        if i == 5:
            assert model.l1.W.update_rule.t == 6
            assert model.misc.hooked.update_rule.t == 101

    (model, opt), _ = run_both(setup, step, n_steps=14)
    assert model.l1.W.update_rule.t == 6 and opt.t == 6


def test_rule_t_when_switching_the_path_mid_training():
    model, opt = setup_mixed(mixed_model(), NesterovAG())
    expected = 0
    for i in range(12):
        opt.use_multi_tensor(i % 3 != 0)
        assign_grads(model, i)
        opt.update()
        expected += 1
        assert model.l1.W.update_rule.t == expected == opt.t
    ref_model, ref_opt = setup_mixed(mixed_model(), NesterovAG())
    ref_opt.use_multi_tensor(False)
    for i in range(12):
        assign_grads(ref_model, i)
        ref_opt.update()
    assert_same_state(state_of(model, opt), state_of(ref_model, ref_opt), "switched")


def test_param_update_called_directly_counts_t():
    model, opt = setup_mixed(mixed_model(), NesterovAG())
    for i in range(3):
        assign_grads(model, i)
        opt.update()
    model.l1.W.update()  # outside the optimizer: through the rule
    assert model.l1.W.update_rule.t == 4
    assign_grads(model, 3)
    opt.update()
    assert model.l1.W.update_rule.t == 5 and model.l1.b.update_rule.t == 4


def test_two_optimizers_sharing_parameters_count_t():
    """``rule.t`` counts every update of the rule, whichever optimizer made it.

    ``copy.copy(opt)`` shares the target (and so the rules) with ``opt``; a
    second optimizer set up on a sub-link shares its parameters.  Each
    optimizer builds its own plan over the same rules.
    """
    def setup():
        rng = np.random.default_rng(0)
        model = Chain()
        with model.init_scope():
            model.l1 = layer(rng, {"W": (3,)})
            model.l2 = layer(rng, {"W": (4,)})
        opt = NesterovAG(lr=0.1).setup(model)
        model.opt2 = None
        return model, opt

    def step(model, opt, i):
        if i == 1:
            model.opt2 = copy.copy(opt)
        assign_grads(model, i)
        (opt if i % 2 == 0 or model.opt2 is None else model.opt2).update()

    for_multi = []
    for multi in (True, False):
        model, opt = setup()
        opt.use_multi_tensor(multi)
        for i in range(6):
            step(model, opt, i)
        for_multi.append([p.update_rule.t for p in model.params()])
    assert for_multi[0] == for_multi[1] == [6, 6]


def test_optimizer_on_a_sub_link_shares_rules():
    results = []
    for multi in (True, False):
        rng = np.random.default_rng(0)
        model = Chain()
        with model.init_scope():
            model.l1 = layer(rng, {"W": (3,)})
            model.l2 = layer(rng, {"W": (4,)})
        opt_all = NesterovAG(lr=0.1).setup(model)
        opt_sub = NesterovAG(lr=0.05).setup(model.l1)  # l1's rules are now opt_sub's
        opt_all.use_multi_tensor(multi)
        opt_sub.use_multi_tensor(multi)
        for i in range(6):
            assign_grads(model, i)
            (opt_all if i % 2 else opt_sub).update()
        results.append((model.l1.W.update_rule.t, model.l2.W.update_rule.t,
                        state_of(model, opt_all)))
    assert results[0][:2] == results[1][:2] == (6, 3)
    assert_same_state(results[0][2], results[1][2], "sub-link")


# ---------------------------------------------------------------------------
# Optimizer level: random models and random changes between steps
# ---------------------------------------------------------------------------
def _safe_grad_hook(rule, param):
    """``_grad_hook`` where it cannot raise (a hook that raises mid-step leaves
    a partial update, which differs with the order of the updates)."""
    if param.grad is not None and param.grad.flags.writeable:
        _grad_hook(rule, param)


def _random_model(seed, n_params):
    rng = np.random.default_rng(seed)
    model = Link()
    with model.init_scope():
        for k in range(n_params):
            dtype = [np.float16, np.float32, np.float64][int(rng.integers(3))]
            shape = [(), (0,), (1,), (5,), (3, 4), (2, 3, 2), (40,)][int(rng.integers(7))]
            a = np.asarray(rng.standard_normal(shape)).astype(dtype)
            layout = int(rng.integers(4))
            if layout == 1 and a.ndim >= 2:
                a = np.asfortranarray(a)
            elif layout == 2 and a.ndim >= 1:
                base = np.zeros((2,) + a.shape, dtype)
                base[0] = a
                a = base[0] if a.ndim == 0 else base.swapaxes(0, 1)[:, 0]  # strided
            setattr(model, "p%02d" % k, Parameter(a))
    return model


def _apply_op(model, opt, op, k, x):
    """One change between steps; the same (op, k, x) does the same in both runs."""
    params = list(model.params())
    p = params[k % len(params)]
    rule = p.update_rule
    rng = np.random.default_rng(x)
    if op == 0:  # new gradient arrays for everybody
        for q in params:
            q.grad = np.asarray(rng.standard_normal(q.shape)).astype(q.dtype)
    elif op == 1:  # gradients updated in place
        for q in params:
            if q.grad is not None and q.grad.flags.writeable:
                q.grad[...] = rng.standard_normal(q.shape)
    elif op == 2:
        p.cleargrad()
    elif op == 3:
        opt.lr = float(rng.choice([0.0, 0.001, 0.01, 0.1, 0.5]))
    elif op == 4:
        opt.momentum = float(rng.choice([0.0, 0.5, 0.9, 0.99]))
    elif op == 5:
        if "lr" in rule.hyperparam.__dict__ and x % 2:
            del rule.hyperparam.lr
        else:
            rule.hyperparam.lr = float(rng.uniform(0, 0.2))
    elif op == 6:
        rule.enabled = not rule.enabled
    elif op == 7:
        if rule.has_hooks:
            rule.remove_hook("decay")
        else:
            rule.add_hook(_safe_grad_hook, name="decay", timing="pre" if x % 2 else "post")
    elif op == 8:
        if rule.state is not None:
            v = rule.state["v"]
            w = v.copy(order="F" if x % 2 else "C")
            w *= v.dtype.type(0.5)
            rule.state["v"] = w
    elif op == 9:
        p.array = p.array.copy(order="F" if x % 2 else "C")
    elif op == 10:
        scale = [None, 4.0, 2, 0.5][x % 4]
        for q in params:
            q._loss_scale = scale
    elif op == 11:
        rule.t = x % 7
    elif op == 12:
        if p.grad is not None:
            p.grad = p.grad.copy(order="F")
    elif op == 13:  # a bad gradient (until the next op 0)
        p.grad = np.zeros((2,) + p.shape, p.dtype)
    elif op == 14:
        opt.t = x % 5


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 16), n_params=st.integers(1, 12),
       steps=st.lists(st.lists(st.tuples(st.integers(0, 14), st.integers(0, 11),
                                         st.integers(0, 2 ** 16)), max_size=4),
                      min_size=1, max_size=10))
def test_random_changes_between_steps(seed, n_params, steps):
    trajectories = []
    for multi in (True, False):
        model = _random_model(seed, n_params)
        opt = NesterovAG(lr=0.01).setup(model)
        opt.use_multi_tensor(multi)
        for q in model.params():
            q.grad = np.ones_like(q.array)
        traj = []
        for i, ops in enumerate(steps):
            for op, k, x in ops:
                _apply_op(model, opt, op, k, x)
            try:
                with np.errstate(all="ignore"):
                    opt.update()
                outcome = None
            except (TypeError, ValueError) as e:
                outcome = (type(e).__name__, str(e))
            traj.append((outcome, state_of(model, opt)))
        trajectories.append(traj)
    for i, ((oa, a), (ob, b)) in enumerate(zip(*trajectories)):
        assert oa == ob, (i, oa, ob)
        assert_same_state(a, b, "step %d" % i)


# ---------------------------------------------------------------------------
# Serialization, copies, pickles
# ---------------------------------------------------------------------------
def _simple_model(seed=0):
    rng = np.random.default_rng(seed)
    model = Chain()
    with model.init_scope():
        model.a = layer(rng, {"W": (4, 3), "b": (3,)})
        model.d = layer(rng, {"W": (5,)}, np.float64)
        model.h = layer(rng, {"W": (6,)}, np.float16)
        model.s = layer(rng, {"W": ()})  # 0-d: rest
    return model


def _train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        assign_grads(model, i)
        opt.update()


def _reference(steps, model_fn=_simple_model, **kwargs):
    model = model_fn()
    opt = NesterovAG(lr=0.03, **kwargs).setup(model)
    opt.use_multi_tensor(False)
    _train(model, opt, steps)
    return state_of(model, opt)


@pytest.mark.parametrize("load_multi", [True, False])
def test_checkpoint_mid_training(load_multi):
    model = _simple_model()
    opt = NesterovAG(lr=0.03).setup(model)
    _train(model, opt, 10)
    f_model, f_opt = io.BytesIO(), io.BytesIO()
    serializers.save_npz(f_model, model)
    serializers.save_npz(f_opt, opt)
    _train(model, opt, 10, start=10)
    assert_same_state(state_of(model, opt), _reference(20), "uninterrupted")

    for fresh in (True, False):
        f_model.seek(0)
        f_opt.seek(0)
        if fresh:
            model2 = _simple_model(seed=5)
            opt2 = NesterovAG(lr=0.03).setup(model2)
        else:  # load into the optimizer that went on training (its plan is built)
            model2, opt2 = model, opt
        opt2.use_multi_tensor(load_multi)
        serializers.load_npz(f_model, model2)
        serializers.load_npz(f_opt, opt2)
        assert opt2.t == 10 and model2.a.W.update_rule.t == 10
        _train(model2, opt2, 10, start=10)
        assert_same_state(state_of(model2, opt2), _reference(20), "resumed (fresh=%s)" % fresh)


def test_checkpoint_keys_same_in_both_modes():
    saved = []
    for multi in (True, False):
        model = _simple_model()
        opt = NesterovAG(lr=0.03).setup(model)
        opt.use_multi_tensor(multi)
        _train(model, opt, 5)
        saved.append(serializers.serialize(opt))
    assert saved[0].keys() == saved[1].keys()
    for k in saved[0]:
        assert np.array_equal(np.asarray(saved[0][k]), np.asarray(saved[1][k])), k


def _all_arrays(model, opt):
    out = []
    for _, p in model.namedparams():
        out += [p.array, p.grad]
        if p.update_rule is not None and p.update_rule.state:
            out += list(p.update_rule.state.values())
    return out


@pytest.mark.parametrize("what", ["opt", "model_and_opt"])
def test_deepcopy_trains_independently(what):
    model = _simple_model()
    opt = NesterovAG(lr=0.03).setup(model)
    _train(model, opt, 6)
    before = state_of(model, opt)
    if what == "opt":
        opt2 = copy.deepcopy(opt)
        model2 = opt2.target
    else:
        model2, opt2 = copy.deepcopy((model, opt))
        assert opt2.target is model2
    assert model2 is not model
    originals = _all_arrays(model, opt)
    for a in _all_arrays(model2, opt2):
        for b in originals:
            assert not np.shares_memory(a, b)
    _train(model2, opt2, 6, start=6)
    assert_same_state(state_of(model, opt), before, "original after the copy trained")
    assert_same_state(state_of(model2, opt2), _reference(12), "copy")
    # the original goes on with its own (cached) plan
    _train(model, opt, 6, start=6)
    assert_same_state(state_of(model, opt), _reference(12), "original")
    assert opt.multi_tensor_plan()["groups"]


def test_pickle_optimizer_mid_training():
    model = _simple_model()
    opt = NesterovAG(lr=0.03).setup(model)
    _train(model, opt, 6)
    opt2 = pickle.loads(pickle.dumps(opt))
    model2 = opt2.target
    assert opt2.t == 6 and model2.a.W.update_rule.t == 6
    _train(model2, opt2, 6, start=6)
    assert_same_state(state_of(model2, opt2), _reference(12), "unpickled")
    assert opt2.multi_tensor_plan()["groups"]
    model3, opt3 = pickle.loads(pickle.dumps((model, opt)))
    assert opt3.target is model3
    _train(model3, opt3, 6, start=6)
    assert_same_state(state_of(model3, opt3), _reference(12), "unpickled pair")


# ---------------------------------------------------------------------------
# Bad input under the multi-tensor path
# ---------------------------------------------------------------------------
import test_bad_input as bad  # noqa: E402  (helpers only)


def _warm(dtype, steps=3):
    model = bad.make_model(dtype)
    opt = NesterovAG(lr=bad.LR, momentum=bad.MOMENTUM).setup(model)
    for i in range(steps):
        bad.set_grads(model, 100 + i)
        opt.update()
    # the same gradient arrays from now on: the cached plan stays valid
    bad.set_grads(model, 7)
    opt.update()
    plan = opt.multi_tensor_plan()
    assert plan["groups"] and "/l1/W" not in plan["rest"]
    for p in model.params():
        if p.grad is None:
            p.grad = np.ones_like(p.array)
    opt.update()
    return model, opt


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("case", bad.CASES, ids=[c[0] for c in bad.CASES])
def test_bad_input_after_the_plan_was_built(case, dtype):
    cid, brk, _, exc, words = case
    model, opt = _warm(dtype)
    fix = brk(model)
    snap = bad.snapshot(model, opt)
    for _ in range(2):
        with pytest.raises(exc) as info:
            opt.update()
        msg = str(info.value)
        assert bad.BAD in msg, msg
        for w in words:
            assert w in msg, (w, msg)
        bad.assert_unchanged(model, opt, snap)
    fix()
    opt.update()
    assert opt.t == snap["opt.t"] + 1


@pytest.mark.parametrize("what", ["param", "v"])
def test_made_read_only_in_place_after_steps(what):
    """No counter notices ``flags.writeable = False``: the update must still refuse
    before anything changes, ``opt.t`` and the gradients included."""
    model, opt = _warm(np.float32)
    calls = []
    opt.add_hook(lambda o: calls.append(o.t), name="pre", timing="pre")
    opt.update()  # the plan is built again (a hook was added) and cached
    del calls[:]
    p = bad._param(model, bad.BAD)
    arr = p.array if what == "param" else p.update_rule.state["v"]
    arr.flags.writeable = False
    snap = bad.snapshot(model, opt)
    with pytest.raises(ValueError, match="read-only") as info:
        opt.update()
    assert bad.BAD in str(info.value)
    bad.assert_unchanged(model, opt, snap)
    assert calls == []  # as per parameter: refused before the 'pre' hooks
    arr.flags.writeable = True
    opt.update()
    assert opt.t == snap["opt.t"] + 1


def test_grad_made_read_only_in_place_with_loss_scale():
    model, opt = _warm(np.float32)
    for p in model.params():
        p._loss_scale = 4.0
    opt.update()
    p = bad._param(model, bad.BAD)
    p.grad.flags.writeable = False
    snap = bad.snapshot(model, opt)
    with pytest.raises(ValueError, match="read-only") as info:
        opt.update()
    assert bad.BAD in str(info.value)
    bad.assert_unchanged(model, opt, snap)


def test_grad_of_wrong_shape_after_the_plan_was_built():
    model, opt = _warm(np.float32)
    p = bad._param(model, bad.BAD)
    p.grad = np.zeros(p.shape[::-1], np.float32)
    snap = bad.snapshot(model, opt)
    with pytest.raises(ValueError, match="shape") as info:
        opt.update()
    assert bad.BAD in str(info.value)
    bad.assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("what", ["array", "grad", "v"])
def test_reshaped_in_place_after_the_plan_was_built(what):
    """``a.shape = ...`` changes an array's shape without telling anyone.

    Per parameter, the shape check refuses the step (the arrays no longer
    match); the multi-tensor path must refuse it too, before any change.
    """
    model, opt = _warm(np.float32)
    p = bad._param(model, bad.BAD)
    arr = {"array": p.array, "grad": p.grad, "v": p.update_rule.state["v"]}[what]
    arr.shape = arr.shape[::-1]
    snap = bad.snapshot(model, opt)
    with pytest.raises(ValueError, match="shape") as info:
        opt.update()
    assert bad.BAD in str(info.value)
    bad.assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("multi", [True, False])
@pytest.mark.parametrize("breakage", ["v_wrong_shape", "v_wrong_dtype", "array_read_only"])
def test_param_with_cleared_grad_checked_before_any_change(multi, breakage):
    """A parameter whose gradient is ``None`` (to be reallocated as zeros) is
    checked like the others before the step changes anything: its state and
    array must be usable, or the step is refused with ``opt.t``, the cleared
    gradients and every array as they were."""
    model, opt = _warm(np.float32)
    opt.use_multi_tensor(multi)
    opt.update()
    p = bad._param(model, bad.BAD)
    p.cleargrad()
    rule = p.update_rule
    if breakage == "v_wrong_shape":
        rule.state["v"] = np.zeros((2, 2), np.float32)
    elif breakage == "v_wrong_dtype":
        rule.state["v"] = rule.state["v"].astype(np.float64)
    else:
        frozen = p.array.copy()
        frozen.flags.writeable = False
        p.array = frozen
    snap = bad.snapshot(model, opt)
    with pytest.raises((TypeError, ValueError)) as info:
        opt.update()
    assert bad.BAD in str(info.value)
    bad.assert_unchanged(model, opt, snap)


def test_first_bad_param_is_reported_when_several_were_made_read_only():
    """The error names the first bad parameter in the target's order, as per
    parameter, also when the bad ones are in a group and in the rest."""
    messages = []
    for multi in (True, False):
        link = Link()
        with link.init_scope():
            link.a = Parameter(np.ones(4, np.float32))               # a group
            link.z = Parameter(np.asarray(1.0, np.float32))          # 0-d: the rest
        opt = NesterovAG().setup(link)
        opt.use_multi_tensor(multi)
        for i in range(3):
            link.a.grad = np.full(4, 0.5, np.float32)
            link.z.grad = np.asarray(0.5, np.float32)
            opt.update()
        link.a.array.flags.writeable = False
        link.z.array.flags.writeable = False
        with pytest.raises(ValueError, match="read-only") as info:
            opt.update()
        messages.append(str(info.value))
        assert opt.t == 3
    assert "'/a'" in messages[1]
    assert messages[0] == messages[1]


@pytest.mark.parametrize("multi", [True, False])
def test_empty_param_read_only_grad_with_loss_scale(multi):
    """Dividing a read-only gradient in place fails even when it is empty
    (NumPy refuses the in-place operation, as under Chainer); both paths
    must refuse the step the same way."""
    link = Link()
    with link.init_scope():
        link.e = Parameter(np.zeros((0,), np.float32))
    opt = NesterovAG().setup(link)
    opt.use_multi_tensor(multi)
    link.e.grad = np.zeros((0,), np.float32)
    opt.update()
    link.e._loss_scale = 4.0
    opt.update()
    link.e.grad.flags.writeable = False
    with pytest.raises(ValueError, match="'/e'.*read-only"):
        opt.update()
    assert opt.t == 2


def test_bad_hyperparameter_after_the_plan_was_built():
    model, opt = _warm(np.float32)
    opt.lr = "0.1"
    snap = bad.snapshot(model, opt)
    with pytest.raises(TypeError, match="lr"):
        opt.update()
    bad.assert_unchanged(model, opt, snap)
    opt.lr = 0.1
    opt.update()


# ---------------------------------------------------------------------------
# cynag.functional.nesterov_ag_addresses: the entry of front ends holding no
# NumPy arrays (cynag.torch)
# ---------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 12), dtype=st.sampled_from([F16, F32, F64]), seed=st.integers(0, 999),
       with_ops=st.booleans(), num_threads=st.sampled_from([None, 1, 2]))
def test_nesterov_ag_addresses_matches_per_tensor_kernel(n, dtype, seed, with_ops,
                                                         num_threads):
    from cynag import functional
    from cynag_kernels.hooks import op_row

    rng = np.random.default_rng(seed)
    shapes = [tuple(int(d) for d in rng.integers(0, 5, rng.integers(1, 3))) for _ in range(n)]
    ps = [random_values(rng, s, dtype) for s in shapes]
    gs = [random_values(rng, s, dtype) for s in shapes]
    vs = [random_values(rng, s, dtype) for s in shapes]
    ref = [(p.copy(), g.copy(), v.copy()) for p, g, v in zip(ps, gs, vs)]
    ops = np.array([op_row(dtype, ("weight_decay", 0.01))]) if with_ops else None
    ptrs = np.array([[p.ctypes.data, g.ctypes.data, v.ctypes.data]
                     for p, g, v in zip(ps, gs, vs)], np.int64).reshape(-1, 3)
    sizes = np.array([p.size for p in ps], np.int64)
    assert functional.nesterov_ag_addresses(ptrs, sizes, dtype, lr=0.1, momentum=0.9, ops=ops,
                                            num_threads=num_threads)
    for (p, g, v), a, b, c in zip(ref, ps, gs, vs):
        functional.nesterov_ag([p], [g], [v], lr=0.1, momentum=0.9, ops=ops, impl="multi")
        assert_same_bits(a, p)
        assert_same_bits(b, g)
        assert_same_bits(c, v)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), n_sets=st.integers(1, 4), dtype=st.sampled_from([F32, F64]),
       seed=st.integers(0, 2**16), num_threads=st.sampled_from([None, 1, 2]))
def test_nesterov_ag_addresses_per_tensor_hyperparameters(n, n_sets, dtype, seed,
                                                          num_threads):
    # index: tensor i takes lr[index[i]] and momentum[index[i]] (a front end's
    # param groups in one call); the same bits as one call per tensor.
    from cynag import functional

    rng = np.random.default_rng(seed)
    lrs = [float(x) for x in rng.choice([0.1, 0.01, 0.37, 1e-5], n_sets)]
    moms = [float(x) for x in rng.choice([0.9, 0.0, 0.5, 0.99], n_sets)]
    index = rng.integers(0, n_sets, n)
    shapes = [tuple(int(d) for d in rng.integers(0, 5, rng.integers(1, 3))) for _ in range(n)]
    ps = [random_values(rng, s, dtype) for s in shapes]
    gs = [random_values(rng, s, dtype) for s in shapes]
    vs = [random_values(rng, s, dtype) for s in shapes]
    ref = [(p.copy(), g.copy(), v.copy()) for p, g, v in zip(ps, gs, vs)]
    ptrs = np.array([[p.ctypes.data, g.ctypes.data, v.ctypes.data]
                     for p, g, v in zip(ps, gs, vs)], np.int64).reshape(-1, 3)
    sizes = np.array([p.size for p in ps], np.int64)
    assert functional.nesterov_ag_addresses(ptrs, sizes, dtype, lr=lrs, momentum=moms,
                                            index=index, num_threads=num_threads)
    for k, ((p, g, v), a, c) in enumerate(zip(ref, ps, vs)):
        functional.nesterov_ag([p], [g], [v], lr=lrs[index[k]], momentum=moms[index[k]],
                               impl="single")
        assert_same_bits(a, p)
        assert_same_bits(c, v)


def test_nesterov_ag_addresses_index_refuses_any_set_the_dtype_cannot_hold():
    from cynag import functional

    p, g, v = np.ones(4, F32), np.ones(4, F32), np.zeros(4, F32)
    ptrs = np.array([[p.ctypes.data, g.ctypes.data, v.ctypes.data]], np.int64)
    assert not functional.nesterov_ag_addresses(ptrs, np.array([4]), F32, lr=[0.1, 1e39],
                                                momentum=[0.9, 0.5], index=[0])
    assert (p == 1).all() and (v == 0).all()  # nothing changed
    with pytest.raises(ValueError, match="one entry per tensor"):
        functional.nesterov_ag_addresses(ptrs, np.array([4]), F32, lr=[0.1], momentum=[0.9],
                                         index=[0, 0])


def test_nesterov_ag_addresses_refuses_coefficients_the_dtype_cannot_hold():
    from cynag import functional

    p, g, v = np.ones(4, F32), np.ones(4, F32), np.zeros(4, F32)
    ptrs = np.array([[p.ctypes.data, g.ctypes.data, v.ctypes.data]], np.int64)
    assert not functional.nesterov_ag_addresses(ptrs, np.array([4]), F32, lr=1e39,
                                                momentum=0.5)
    assert (p == 1).all() and (v == 0).all()  # nothing changed
    with pytest.raises(ValueError, match="same length"):
        functional.nesterov_ag_addresses(ptrs, np.array([4, 4]), F32, lr=0.1, momentum=0.9)



def _random_arrays(rng, n, dtype, first=None):
    """``n`` random (param, grad, v) of ``dtype`` (the first of shape ``first`` if
    given) and their address table: ``(ps, gs, vs, ptrs)``."""
    shapes = [tuple(int(d) for d in rng.integers(0, 5, rng.integers(1, 3))) for _ in range(n)]
    if first is not None:
        shapes[0] = first
    ps = [random_values(rng, s, dtype) for s in shapes]
    gs = [random_values(rng, s, dtype) for s in shapes]
    vs = [random_values(rng, s, dtype) for s in shapes]
    ptrs = np.array([[p.ctypes.data, g.ctypes.data, v.ctypes.data]
                     for p, g, v in zip(ps, gs, vs)], np.int64).reshape(-1, 3)
    return ps, gs, vs, ptrs


class _KernelAPI(ctypes.Structure):
    """cynag_kernels._nesterov_cpu's C entry (``cynag_kernel_api``, ``_kernel_api.h``)."""
    _fields_ = [("n_coef", ctypes.c_int),
                ("n_op_words", ctypes.c_int),
                ("coefficients", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_double,
                                                  ctypes.c_double, ctypes.c_int,
                                                  ctypes.c_double,
                                                  ctypes.POINTER(ctypes.c_double))),
                ("weight_decay", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_double,
                                                  ctypes.POINTER(ctypes.c_double))),
                ("run_table", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                               ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int,
                                               ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                               ctypes.c_void_p, ctypes.c_int, ctypes.c_int)),
                ("compact", ctypes.CFUNCTYPE(ctypes.c_ssize_t, *([ctypes.c_void_p] * 4),
                                             ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                             ctypes.c_ssize_t, ctypes.c_ssize_t,
                                             *([ctypes.c_void_p] * 3)))]


def _kernel_api():
    from cynag_kernels import _nesterov_cpu

    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype = ctypes.c_void_p
    get.argtypes = [ctypes.py_object, ctypes.c_char_p]
    ptr = get(_nesterov_cpu.kernel_api(), _nesterov_cpu.CYNAG_KERNEL_API_NAME.encode())
    return ctypes.cast(ptr, ctypes.POINTER(_KernelAPI)).contents


@settings(max_examples=80, deadline=None)
@given(data=st.data(), n=st.integers(0, 14), type_num=st.sampled_from([11, 12, 23]))
def test_kernel_c_entry_compact_is_compact_selected_rows(data, n, type_num):
    # The compaction native callers reach through the capsule (cynag._step's
    # one-call step) selects and merges exactly as compact_selected_rows.
    from cynag_kernels import _nesterov_cpu

    api = _kernel_api()
    itemsize = {11: 4, 12: 8, 23: 2}[type_num]
    sizes = np.array(data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n)), np.int64)
    base = 1 << 20
    ptrs = np.zeros((n, 3), np.int64)
    for i in range(n):  # adjacent runs (mergeable) or gaps, by draw
        gap = data.draw(st.sampled_from([0, 0, itemsize, 64]))
        ptrs[i] = (ptrs[i - 1] + sizes[i - 1] * itemsize + gap) if i else (base, 2 * base,
                                                                         3 * base)
    coef = np.repeat(np.array([[0.1, 0.9, 0.81, 0.19, 0.0, 0.0]]), n, axis=0)
    for i in range(n):
        if data.draw(st.booleans()) and data.draw(st.booleans()):
            coef[i, 0] = 0.2
    mask = np.array(data.draw(st.lists(st.sampled_from([1, 1, 3]), min_size=n, max_size=n)),
                    np.uint8)
    tns = np.array(data.draw(st.lists(st.sampled_from([type_num, type_num, 12 if type_num != 12
                                                       else 11]), min_size=n, max_size=n)),
                   np.int32)
    lo = data.draw(st.integers(0, n))
    hi = data.draw(st.integers(lo, n))
    outs = []
    for via_capsule in (True, False):
        op = np.full((max(n, 1), 3), -1, np.int64)
        oc = np.full(max(n, 1) + 1, -1, np.int64)
        ocoef = np.full((max(n, 1), 6), -1.0)
        if via_capsule:
            m = api.compact(ptrs.ctypes.data, sizes.ctypes.data, coef.ctypes.data,
                            mask.ctypes.data, 1, tns.ctypes.data, type_num, lo, hi,
                            op.ctypes.data, oc.ctypes.data, ocoef.ctypes.data)
        else:
            m = _nesterov_cpu.compact_selected_rows(
                np.ascontiguousarray(ptrs.reshape(-1, 3)), sizes, coef.reshape(-1, 6), mask, 1,
                tns, type_num, lo, hi, op, oc, ocoef)
        outs.append((m, op[:m].tolist(), oc[:m + 1].tolist(), ocoef[:m].tolist()))
    assert outs[0] == outs[1]
    assert api.compact(ptrs.ctypes.data, sizes.ctypes.data, coef.ctypes.data, mask.ctypes.data,
                       1, tns.ctypes.data, 7, 0, n, 0, 0, 0) == -2


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 12), dtype=st.sampled_from([F32, F64]), seed=st.integers(0, 2**16),
       num_threads=st.sampled_from([1, 2, 3]),
       lr=st.sampled_from([0.1, 0.01, 0.37, 1e-5, 1e39]), m=st.sampled_from([0.9, 0.0, 0.5]),
       wd=st.sampled_from([0.0, 5e-4, 0.1, 1e39]), big=st.booleans())
def test_kernel_c_entry_matches_the_chainer_sequence(n, dtype, seed, num_threads, lr, m, wd,
                                                      big):
    # The capsule native front ends call (cynag.torch's reader): the
    # coefficient and weight-decay rules of coefficient_table and op_row (the
    # same refusals) and the table runner of nesterov_ag_addresses; Chainer's
    # bits.  With weight decay the gradients are only read (keep_grad), on
    # tensors small and large.
    from cynag import functional
    from cynag_kernels.hooks import op_row

    api = _kernel_api()
    assert api.n_coef == 6 and api.n_op_words == 4
    rng = np.random.default_rng(seed)
    ps, gs, vs, ptrs = _random_arrays(rng, n, dtype, (5000,) if big else None)
    ref = [(p.copy(), g.copy(), v.copy()) for p, g, v in zip(ps, gs, vs)]
    cum = np.concatenate([[0], np.cumsum([p.size for p in ps])]).astype(np.int64)
    type_num = np.dtype(dtype).num
    row = np.zeros(6)
    ok = api.coefficients(type_num, lr, m, 0, 0.0,
                          row.ctypes.data_as(ctypes.POINTER(ctypes.c_double)))
    table, expected_ok = coefficient_table(dtype, [lr], [m])
    assert bool(ok) == bool(expected_ok[0])
    ops = np.zeros((1, 4))
    decay_ok = api.weight_decay(type_num, wd, ops.ctypes.data_as(ctypes.POINTER(ctypes.c_double)))
    expected_row = op_row(dtype, ("weight_decay", wd))
    assert bool(decay_ok) == (expected_row is not None)
    if not ok or not decay_ok:
        return
    assert_same_bits(table[0], row)
    assert_same_bits(np.array([expected_row]), ops)
    coef = np.ascontiguousarray(np.repeat(row[None, :], n, axis=0))
    assert api.run_table(ptrs.ctypes.data, cum.ctypes.data, coef.ctypes.data, n, type_num,
                         num_threads, 2, ITEM_ALIGN, ops.ctypes.data if wd else None,
                         1 if wd else 0, 1) == 0
    for (p, g, v), a, b, c in zip(ref, ps, gs, vs):
        g_used = g.copy()
        if wd:
            g_used += wd * p  # Chainer's WeightDecay (NumPy 1.x's float32 rounding of wd)
        functional.nesterov_ag([p], [g_used], [v], lr=lr, momentum=m, impl="single")
        assert_same_bits(a, p)
        assert_same_bits(c, v)
        assert_same_bits(b, g)  # only read
    before = [a.copy() for a in ps]
    assert api.run_table(ptrs.ctypes.data, cum.ctypes.data, coef.ctypes.data, n, 99,
                         1, 2, ITEM_ALIGN, None, 0, 0) == -2  # a type it does not take
    for a, b in zip(ps, before):
        assert_same_bits(a, b)  # nothing changed


@settings(max_examples=200, deadline=None)
@given(rate=st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                      st.sampled_from([3.4e38, -3.4e38, 3.3999999999999997e38, 3.4028235e38,
                                       65000.0, 0.0, -0.0, 5e-4, 1e-45])),
       dtype=st.sampled_from([F32, F64]))
def test_weight_decay_row_is_op_row_for_python_floats(rate, dtype):
    # The C rule native front ends use, against the Python one.
    from cynag_kernels import _nesterov_cpu
    from cynag_kernels.hooks import op_row

    got = _nesterov_cpu.weight_decay_row(np.dtype(dtype).num, rate)
    want = op_row(dtype, ("weight_decay", rate))
    if want is None:
        assert got is None
    else:
        assert_same_bits(np.array(got), np.array(want, np.float64))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 8), dtype=st.sampled_from([F16, F32, F64]), seed=st.integers(0, 999),
       program=st.lists(st.sampled_from([("weight_decay", 0.01), ("weight_decay", 0.37),
                                         ("lasso", 0.005), ("clip", -0.5, 0.7),
                                         ("scale", 0.5)]), min_size=1, max_size=3),
       big=st.booleans(), num_threads=st.sampled_from([1, 2]))
def test_keep_grads_gives_the_written_path_values_and_leaves_the_gradients(
        n, dtype, seed, program, big, num_threads):
    # keep_grads: the operations act on copies (one pass per element for a
    # lone weight decay, blocks otherwise); the update is the one of the path
    # that writes the decayed gradients, and the gradients are only read.  A
    # lone weight decay (its own one-pass loop) equals the same decay followed
    # by a scale by 1 (the block loop).
    from cynag import functional
    from cynag_kernels.hooks import op_row

    rng = np.random.default_rng(seed)
    # (a first tensor of more than two blocks of the operations, if big)
    ps, gs, vs, ptrs = _random_arrays(rng, n, dtype, (4100,) if big else None)
    rows = [op_row(dtype, op) for op in program]
    assume(all(r is not None for r in rows))
    ops = np.array(rows)
    written = [(p.copy(), g.copy(), v.copy()) for p, g, v in zip(ps, gs, vs)]
    g_before = [g.copy() for g in gs]
    sizes = np.array([p.size for p in ps], np.int64)
    assert functional.nesterov_ag_addresses(ptrs, sizes, dtype, lr=0.1, momentum=0.9, ops=ops,
                                            num_threads=num_threads, keep_grads=True)
    wp = [w[0] for w in written]
    wg = [w[1] for w in written]
    wv = [w[2] for w in written]
    functional.nesterov_ag(wp, wg, wv, lr=0.1, momentum=0.9, ops=ops, impl="multi")
    for a, b, c, p, g0, v in zip(ps, gs, vs, wp, g_before, wv):
        assert_same_bits(a, p)
        assert_same_bits(c, v)
        assert_same_bits(b, g0)
    if len(program) == 1 and program[0][0] == "weight_decay":
        blocks = [(p.copy(), g.copy(), v.copy()) for p, g, v in written]
        one = np.array([op_row(dtype, program[0])])
        two = np.array([op_row(dtype, program[0]), op_row(dtype, ("scale", 1.0))])
        functional.nesterov_ag(wp, wg, wv, lr=0.1, momentum=0.9, ops=one, impl="multi")
        functional.nesterov_ag([b[0] for b in blocks], [b[1] for b in blocks],
                               [b[2] for b in blocks], lr=0.1, momentum=0.9, ops=two,
                               impl="multi")
        for (p, g, v), q, h, w in zip(blocks, wp, wg, wv):
            assert_same_bits(p, q)
            assert_same_bits(g, h)
            assert_same_bits(v, w)


def test_a_second_update_while_one_runs_is_refused():
    """The step table holds raw addresses while a step runs: another thread's
    update() of the same optimizer (here while the first waits in a hook) is
    refused instead of refilling it, and the first step completes as usual."""
    import threading

    rng = np.random.default_rng(9)
    model = ChainList(*[layer(rng, {"W": (5,), "b": (2,)}) for _ in range(3)])
    opt = NesterovAG(lr=0.1, momentum=0.9).setup(model)
    assign_grads(model, 0)
    opt.update()
    inside, go = threading.Event(), threading.Event()

    def waiting(o):
        inside.set()
        assert go.wait(10)

    opt.add_hook(waiting, name="wait")
    errors = []
    first = threading.Thread(target=opt.update)
    first.start()
    assert inside.wait(10)
    try:
        opt.update()
    except RuntimeError as e:
        errors.append(str(e))
    with pytest.raises(RuntimeError, match="step is in use"):
        opt.multi_tensor_plan()
    go.set()
    first.join(10)
    assert len(errors) == 1 and "step is in use" in errors[0]
    assert opt.t == 2 and all(p.update_rule.t == 2 for p in model.params())
    opt.remove_hook("wait")
    opt.update()  # free again
    assert opt.t == 3


def test_post_hooks_run_after_the_step_is_released():
    """A 'post' hook may describe the plan (the step's table is released by then)."""
    rng = np.random.default_rng(10)
    model = ChainList(*[layer(rng, {"W": (5,)}) for _ in range(2)])
    opt = NesterovAG().setup(model)
    seen = []
    opt.add_hook(lambda o: seen.append(o.multi_tensor_plan()["rest"]), name="look",
                 timing="post")
    for i in range(2):
        assign_grads(model, i)
        opt.update()
    assert len(seen) == 2 and seen[1] == []


@settings(max_examples=300, deadline=None)
@given(dtype=st.sampled_from([np.float16, np.float32, np.float64]),
       lr=st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0.01, 0.1, 1e-30, 3.4e38, 1e39, 65504.0, 65520.0])),
       m=st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.9, 0.99, -0.5, 1e20])))
def test_native_coefficients_equal_the_python_ones(dtype, lr, m):
    # _nag_coef.h (native paths) and nesterov_ag_coefficients (Python paths)
    # prepare the same scalars; the native one refuses what NumPy 1.x would
    # keep in float64, which the Python one returns as numpy.float64.
    from cynag_kernels import nesterov_ag_coefficients

    table, ok = coefficient_table(dtype, [lr], [m])
    py = nesterov_ag_coefficients(lr, m, dtype)
    wide = any(type(k) is np.float64 for k in py) and dtype is not np.float64
    assert bool(ok[0]) == (not wide)
    if ok[0]:
        assert_same_bits(table[0, :4], np.array([float(k) for k in py]))


def test_functional_checks_every_entry_before_any_changes():
    from cynag import functional
    from cynag_kernels.hooks import op_row

    def fresh(n=3, dtype=np.float32):
        return ([np.ones(4, dtype) for _ in range(n)], [np.full(4, 0.5, dtype) for _ in range(n)],
                [np.zeros(4, dtype) for _ in range(n)])

    def unchanged(ps, gs, vs):
        return (all((p == 1).all() for p in ps) and all((g == 0.5).all() for g in gs)
                and all((v == 0).all() for v in vs))

    # single: a bad later entry (or with a loss scale, any entry) changes nothing
    ps, gs, vs = fresh()
    gs[1] = np.full(3, 0.5, np.float32)
    with pytest.raises(ValueError, match="entry 1"):
        functional.nesterov_ag(ps, gs, vs, impl="single")
    assert unchanged(ps, gs[:1] + gs[2:], vs)
    ps, gs, vs = fresh()
    vs[2] = np.zeros(4, np.int32)
    with pytest.raises(TypeError, match="entry 2"):
        functional.nesterov_ag(ps, gs, vs, impl="single", loss_scale=2.0)
    assert unchanged(ps, gs, vs[:2])
    with pytest.raises(TypeError, match="loss_scale"):
        functional.nesterov_ag(*fresh(), impl="single", loss_scale="2")
    # multi: a bad entry of a later dtype group; the caller's index is named
    ps, gs, vs = fresh()
    ps.append(np.ones(4, np.float64)[::-1])
    gs.append(np.full(4, 0.5))
    vs.append(np.zeros(4))
    with pytest.raises(ValueError, match="entry 3"):
        functional.nesterov_ag(ps, gs, vs, impl="multi")
    assert unchanged(ps[:3], gs[:3], vs[:3])
    # ops write the gradients: a read-only one is refused, and so is "add"
    ps, gs, vs = fresh()
    gs[1].flags.writeable = False
    ops = np.array([op_row(F32, ("weight_decay", 0.1))])
    with pytest.raises(ValueError, match="entry 1: the gradient is read-only"):
        functional.nesterov_ag(ps, gs, vs, ops=ops)
    assert unchanged(ps, gs, vs)
    ps, gs, vs = fresh()
    with pytest.raises(ValueError, match="code 5"):
        functional.nesterov_ag(ps, gs, vs, ops=np.array([[5.0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="code 99"):
        functional.nesterov_ag(ps, gs, vs, ops=np.array([[99.0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="one dtype"):
        functional.nesterov_ag(ps + [np.ones(2)], gs + [np.ones(2)], vs + [np.zeros(2)],
                               ops=ops)
    assert unchanged(ps, gs, vs)


def test_functional_grad_or_v_none_changes_nothing():
    from cynag import functional

    p, g, v = np.ones(4, np.float32), np.full(4, 0.5, np.float32), np.ones(4, np.float32)
    with pytest.raises(TypeError, match="grad"):
        nesterov_ag_cpu(p, None, v, 0.1, 0.9)
    with pytest.raises(TypeError, match="no v"):
        functional.nesterov_ag([p, p.copy()], [g, g], [v, None], impl="single")
    assert (p == 1).all() and (v == 1).all()


@pytest.mark.parametrize("scale", [65536.0, 65536, 1e5, 65504.0, 3.0])
def test_functional_float16_loss_scale_divides_as_numpy_1(scale):
    # NumPy 1.x meets a scale too large for float16 in float32 (NumPy 2 would
    # round it to an infinite float16 divisor).
    from cynag import functional

    g = np.array([1.0, 3.0, 1000.0], np.float16)
    expected = (g.astype(np.float32) / np.float32(scale)).astype(np.float16) \
        if scale >= 65520 else g / np.float16(scale)
    p, v = np.ones(3, np.float16), np.zeros(3, np.float16)
    functional.nesterov_ag([p], [g], [v], lr=0.0, momentum=0.0, loss_scale=scale,
                           impl="single")
    assert g.tobytes() == expected.tobytes()


def test_functional_addresses_check_their_arguments():
    from cynag import functional

    p, g, v = np.ones(4, np.float32), np.full(4, 0.5, np.float32), np.zeros(4, np.float32)
    ptrs = np.array([[p.ctypes.data, g.ctypes.data, v.ctypes.data]], np.int64)
    for kwargs, exc, words in [
            (dict(index=[-1]), ValueError, "index"), (dict(index=[2]), ValueError, "index"),
            (dict(sizes=[-4]), ValueError, "negative"), (dict(dtype=np.int32), TypeError,
                                                          "float16")]:
        args = dict(ptrs=ptrs, sizes=[4], dtype=np.float32, lr=[0.1, 0.2],
                    momentum=[0.9, 0.9])
        if "index" not in kwargs:
            args.update(lr=0.1, momentum=0.9)
        args.update(kwargs)
        with pytest.raises(exc, match=words):
            functional.nesterov_ag_addresses(**args)
    assert (p == 1).all() and (v == 0).all()
