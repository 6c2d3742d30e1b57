"""Tests of ``cynag_kernels.threads`` and of the kernel under several thread counts.

Every test that changes a process-wide setting restores it (autouse fixture).
Environment variables read at import (``CYNAG_NUM_THREADS``,
``CYNAG_PARALLEL_THRESHOLD``, ``OMP_NUM_THREADS``) are tested in subprocesses.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cynag_kernels
from cynag_kernels import _nesterov_cpu, nesterov_ag_cpu, openmp_enabled, threads
from cynag_kernels.threads import (
    DEFAULT_PARALLEL_THRESHOLD,
    get_num_threads,
    get_parallel_threshold,
    set_num_threads,
    set_parallel_threshold,
    thread_config,
    threads_for,
)

from oracle import assert_same_bits, nesterov_ag_numpy

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
DTYPES = [F16, F32, F64]
OPENMP = openmp_enabled()
ENV_VARS = ("CYNAG_NUM_THREADS", "CYNAG_PARALLEL_THRESHOLD", "OMP_NUM_THREADS")


@pytest.fixture(autouse=True)
def restore_thread_settings():
    """Put back the fixed thread count and the parallel threshold after each test."""
    fixed = threads._fixed_threads
    threshold = get_parallel_threshold()
    yield
    threads._fixed_threads = fixed
    set_parallel_threshold(threshold)


def expected_threads(n):
    return n if OPENMP else 1


def clean_env():
    return not any(k in os.environ for k in ("CYNAG_NUM_THREADS", "OMP_NUM_THREADS"))


# ---------------------------------------------------------------------------
# get/set_num_threads
# ---------------------------------------------------------------------------
def test_default_num_threads():
    set_num_threads(None)
    n = get_num_threads()
    assert isinstance(n, int) and n >= 1
    if not OPENMP:
        assert n == 1
    elif clean_env():
        from cynag_kernels import _openmp_helpers
        assert n == max(1, min(_openmp_helpers.omp_max_threads(), threads.cpu_count()))
        assert n <= threads.cpu_count()


def test_cpu_count():
    n = threads.cpu_count()
    assert isinstance(n, int) and 1 <= n <= (os.cpu_count() or n)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64])
def test_set_num_threads_positive(n):
    set_num_threads(n)
    assert get_num_threads() == expected_threads(n)
    assert thread_config()["source"] == "set_num_threads"
    assert thread_config()["num_threads"] == expected_threads(n)


def test_set_num_threads_none_resets():
    set_num_threads(None)
    default = get_num_threads()
    default_source = thread_config()["source"]
    set_num_threads(5)
    assert get_num_threads() == expected_threads(5)
    set_num_threads(None)
    assert get_num_threads() == default
    assert thread_config()["source"] == default_source
    assert default_source in ("CYNAG_NUM_THREADS", "OpenMP default")


def test_set_num_threads_accepts_numpy_integers():
    set_num_threads(np.int64(3))
    assert get_num_threads() == expected_threads(3)
    assert type(get_num_threads()) is int


@pytest.mark.parametrize("n,expected", [(-1, lambda c: c), (-2, lambda c: max(1, c - 1)),
                                        (-3, lambda c: max(1, c - 2)),
                                        (-1000, lambda c: 1)])
def test_set_num_threads_negative_counts_back_from_cpu_count(n, expected):
    set_num_threads(n)
    assert get_num_threads() == expected_threads(expected(threads.cpu_count()))


def test_set_num_threads_zero_is_an_error():
    set_num_threads(2)
    with pytest.raises(ValueError):
        set_num_threads(0)
    assert get_num_threads() == expected_threads(2)  # unchanged


@pytest.mark.parametrize("bad", [True, False, 2.0, 1.5, "2", [2], np.float64(2.0), object()])
def test_set_num_threads_type_errors(bad):
    set_num_threads(2)
    with pytest.raises(TypeError):
        set_num_threads(bad)
    assert get_num_threads() == expected_threads(2)  # unchanged


# ---------------------------------------------------------------------------
# parallel threshold, threads_for, thread_config
# ---------------------------------------------------------------------------
def test_parallel_threshold_default_and_set():
    assert DEFAULT_PARALLEL_THRESHOLD == 1 << 16
    if "CYNAG_PARALLEL_THRESHOLD" not in os.environ:
        assert get_parallel_threshold() == DEFAULT_PARALLEL_THRESHOLD
    for n in (0, 1, 100, 10 ** 9):
        set_parallel_threshold(n)
        assert get_parallel_threshold() == n
        assert thread_config()["parallel_threshold"] == n
    set_parallel_threshold(None)
    if "CYNAG_PARALLEL_THRESHOLD" not in os.environ:
        assert get_parallel_threshold() == DEFAULT_PARALLEL_THRESHOLD


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (True, TypeError), (1.5, TypeError),
                                        ("10", TypeError), (np.float64(3), TypeError)])
def test_set_parallel_threshold_rejects(bad, error):
    set_parallel_threshold(123)
    with pytest.raises(error):
        set_parallel_threshold(bad)
    assert get_parallel_threshold() == 123


def test_set_parallel_threshold_accepts_numpy_integers():
    set_parallel_threshold(np.int64(77))
    assert get_parallel_threshold() == 77 and type(get_parallel_threshold()) is int


def test_threads_for():
    set_num_threads(3)
    set_parallel_threshold(1000)
    assert threads_for(0) == 1
    assert threads_for(999) == 1
    assert threads_for(1000) == expected_threads(3)
    assert threads_for(10 ** 9) == expected_threads(3)
    set_parallel_threshold(0)
    assert threads_for(0) == expected_threads(3)
    assert threads_for(1) == expected_threads(3)
    set_num_threads(None)
    assert threads_for(10 ** 9) == get_num_threads()


def test_thread_config():
    cfg = thread_config()
    for key in ("openmp", "num_threads", "source", "CYNAG_NUM_THREADS", "OMP_NUM_THREADS",
                "omp_get_max_threads", "cpu_count", "parallel_threshold"):
        assert key in cfg
    assert cfg["openmp"] is OPENMP
    assert cfg["num_threads"] == get_num_threads()
    assert cfg["cpu_count"] == threads.cpu_count()
    assert cfg["parallel_threshold"] == get_parallel_threshold()
    assert cfg["CYNAG_NUM_THREADS"] == os.environ.get("CYNAG_NUM_THREADS")
    assert cfg["OMP_NUM_THREADS"] == os.environ.get("OMP_NUM_THREADS")
    set_num_threads(2)
    assert thread_config()["source"] == "set_num_threads"


def test_package_reexports():
    for name in ("get_num_threads", "set_num_threads", "get_parallel_threshold",
                 "set_parallel_threshold", "DEFAULT_PARALLEL_THRESHOLD"):
        assert getattr(cynag_kernels, name) is getattr(threads, name)
    info = cynag_kernels.build_info()
    assert info["openmp"] is OPENMP
    assert isinstance(info["compiler"], str)


# ---------------------------------------------------------------------------
# threadpoolctl
# ---------------------------------------------------------------------------
def test_threadpoolctl_limit_is_reflected():
    if not OPENMP:
        pytest.skip("built without OpenMP")
    if not clean_env():
        pytest.skip("OMP_NUM_THREADS or CYNAG_NUM_THREADS set in the environment")
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not any(i.get("user_api") == "openmp" for i in threadpoolctl.threadpool_info()):
        pytest.skip("threadpoolctl sees no OpenMP runtime")
    set_num_threads(None)
    before = get_num_threads()
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        assert get_num_threads() == 1
        assert threads_for(10 ** 9) == 1
        assert thread_config()["omp_get_max_threads"] == 1
        # an explicit count still wins over the OpenMP default
        set_num_threads(2)
        assert get_num_threads() == 2
        set_num_threads(None)
        assert get_num_threads() == 1
        # and the kernel still gives the right bits
        rng = np.random.default_rng(0)
        p, g, v = (rng.standard_normal(100_003).astype(np.float32) for _ in range(3))
        p_exp, v_exp = p.copy(), v.copy()
        set_parallel_threshold(0)
        nesterov_ag_cpu(p, g, v, 0.01, 0.9)
        nesterov_ag_cpu(p_exp, g, v_exp, 0.01, 0.9, num_threads=1)
        assert_same_bits(p, p_exp)
        assert_same_bits(v, v_exp)
    assert get_num_threads() == before


# ---------------------------------------------------------------------------
# Environment variables (read once at import): subprocesses
# ---------------------------------------------------------------------------
def run_python(code, **env_vars):
    """Run ``code`` in a fresh interpreter that imports this cynag_kernels."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(env_vars)
    root = os.path.dirname(os.path.dirname(os.path.abspath(cynag_kernels.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120)


SHOW = """
    from cynag_kernels import threads
    c = threads.thread_config()
    print(threads.get_num_threads(), c["source"], threads.get_parallel_threshold(), sep="|")
"""


def _show(**env_vars):
    r = run_python(SHOW, **env_vars)
    assert r.returncode == 0, r.stderr
    n, source, threshold = r.stdout.strip().split("|")
    return int(n), source, int(threshold)


@pytest.mark.parametrize("value,n", [("3", 3), ("1", 1), (" 2 ", 2), ("16", 16)])
def test_env_cynag_num_threads(value, n):
    got, source, _ = _show(CYNAG_NUM_THREADS=value)
    assert got == expected_threads(n)
    assert source == "CYNAG_NUM_THREADS"


def test_env_cynag_num_threads_empty_is_ignored():
    got, source, _ = _show(CYNAG_NUM_THREADS="")
    assert source == "OpenMP default"
    got_default, _, _ = _show()
    assert got == got_default


@pytest.mark.parametrize("what,var,value", [("num_threads", "CYNAG_NUM_THREADS", 3),
                                            ("parallel_threshold", "CYNAG_PARALLEL_THRESHOLD",
                                             1000)])
def test_env_setting_overridden_by_the_setter_and_back_with_none(what, var, value):
    # set_...(n) overrides the variable; None returns to it.
    r = run_python("""
        from cynag_kernels import threads
        threads.set_%s(2)
        a = threads.get_%s()
        threads.set_%s(None)
        print(a, threads.get_%s())
    """ % ((what,) * 4), **{var: str(value)})
    assert r.returncode == 0, r.stderr
    if what == "num_threads":
        assert r.stdout.split() == [str(expected_threads(2)), str(expected_threads(value))]
    else:
        assert r.stdout.split() == ["2", str(value)]


@pytest.mark.parametrize("value", ["0", "-1", "abc", "1.5", "2x", "two"])
def test_env_cynag_num_threads_invalid_raises_at_import(value):
    r = run_python("import cynag_kernels", CYNAG_NUM_THREADS=value)
    assert r.returncode != 0
    assert "ValueError" in r.stderr and "CYNAG_NUM_THREADS" in r.stderr


@pytest.mark.parametrize("value,n", [("0", 0), ("1000", 1000), ("65536", 65536)])
def test_env_parallel_threshold(value, n):
    assert _show(CYNAG_PARALLEL_THRESHOLD=value)[2] == n


@pytest.mark.parametrize("value", ["-1", "x", "1e3"])
def test_env_parallel_threshold_invalid_raises_at_import(value):
    r = run_python("import cynag_kernels", CYNAG_PARALLEL_THRESHOLD=value)
    assert r.returncode != 0
    assert "ValueError" in r.stderr and "CYNAG_PARALLEL_THRESHOLD" in r.stderr


@pytest.mark.skipif(not OPENMP, reason="built without OpenMP")
@pytest.mark.parametrize("value,n", [("1", 1), ("5", 5)])
def test_env_omp_num_threads(value, n):
    """OMP_NUM_THREADS sets the default (not capped by the CPU count when set)."""
    got, source, _ = _show(OMP_NUM_THREADS=value)
    assert (got, source) == (n, "OpenMP default")
    # CYNAG_NUM_THREADS wins over OMP_NUM_THREADS
    got, source, _ = _show(OMP_NUM_THREADS=value, CYNAG_NUM_THREADS="3")
    assert (got, source) == (3, "CYNAG_NUM_THREADS")


def test_env_threads_kernel_runs():
    """A threaded run configured only by the environment matches a serial run."""
    r = run_python("""
        import numpy as np
        from cynag_kernels import nesterov_ag_cpu, threads
        assert threads.threads_for(10) == threads.get_num_threads()
        rng = np.random.default_rng(1)
        p, g, v = (rng.standard_normal(100_001) for _ in range(3))
        p2, v2 = p.copy(), v.copy()
        nesterov_ag_cpu(p, g, v, 0.1, 0.9)
        nesterov_ag_cpu(p2, g, v2, 0.1, 0.9, num_threads=1)
        assert (p.view(np.uint64) == p2.view(np.uint64)).all()
        assert (v.view(np.uint64) == v2.view(np.uint64)).all()
        print("ok")
    """, CYNAG_NUM_THREADS="3", CYNAG_PARALLEL_THRESHOLD="0")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# ---------------------------------------------------------------------------
# The kernel: identical bits whatever the thread count
# ---------------------------------------------------------------------------
T = DEFAULT_PARALLEL_THRESHOLD
SIZES = [1, 2, 31, 32, 33, 63, 64, 65, 127, 129, 1000, 4095, 4097, 10007,
         T - 1, T, T + 1, 3 * T + 17]
THREAD_COUNTS = [1, 2, 3, 4, 7]


def _random(rng, shape, dtype):
    return (rng.standard_normal(shape) * 10.0 ** rng.uniform(-2, 1, shape)).astype(dtype)


def _check_thread_counts(make_arrays, dtype, counts=THREAD_COUNTS, lr=0.01, m=0.9):
    """Run every thread count on fresh copies; all results equal the oracle's bits."""
    param0, grad, v0 = make_arrays()
    p_exp, v_exp = np.array(param0), np.array(v0)
    nesterov_ag_numpy(p_exp, np.array(grad), v_exp, lr, m)
    for nt in counts:
        param, grad, v = make_arrays()
        nesterov_ag_cpu(param, grad, v, lr, m, num_threads=nt)
        assert_same_bits(param, p_exp, "param, num_threads=%r" % (nt,))
        assert_same_bits(v, v_exp, "v, num_threads=%r" % (nt,))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_contiguous_thread_counts_identical(dtype, n):
    def make():
        rng = np.random.default_rng(n)
        return [_random(rng, n, dtype) for _ in range(3)]
    _check_thread_counts(make, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 65, 1001, T - 1, T + 1])
@pytest.mark.parametrize("layout", ["reversed", "step2", "transposed-mix", "fallback-3d",
                                    "broadcast-grad"])
def test_strided_thread_counts_identical(dtype, n, layout):
    def make():
        rng = np.random.default_rng(n)
        if layout == "reversed":
            return [_random(rng, n, dtype)[::-1] for _ in range(3)]
        if layout == "step2":
            return [_random(rng, 2 * n, dtype)[::2] for _ in range(3)]
        if layout == "transposed-mix":
            rows = 7 if n > 7 else 1
            cols = n // rows
            p = _random(rng, (rows, cols), dtype)
            g = _random(rng, (cols, rows), dtype).T
            v = np.asfortranarray(_random(rng, (rows, cols), dtype))
            return [p, g, v]
        if layout == "fallback-3d":
            a = 3 if n > 30 else 1
            b = 5 if n > 30 else 1
            c = max(1, n // 15)
            p = _random(rng, (a, b, c), dtype)
            g = _random(rng, (c, b, a), dtype).T
            v = _random(rng, (b, a, c), dtype).transpose(1, 0, 2)
            return [p, g, v]
        if layout == "broadcast-grad":
            p, v = _random(rng, n, dtype), _random(rng, n, dtype)
            return [p, np.broadcast_to(_random(rng, 1, dtype), (n,)), v]
        raise AssertionError(layout)
    _check_thread_counts(make, dtype, counts=[1, 2, 3])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threshold", [0, 100, T])
def test_default_threads_around_threshold(dtype, threshold):
    """num_threads=None: serial below the threshold, parallel from it; same bits."""
    set_num_threads(3)
    set_parallel_threshold(threshold)
    for n in sorted({max(1, threshold - 1), max(1, threshold), threshold + 1, threshold + 97}):
        rng = np.random.default_rng(n)
        p, g, v = (_random(rng, n, dtype) for _ in range(3))
        p_exp, v_exp = p.copy(), v.copy()
        nesterov_ag_cpu(p, g, v, 0.05, 0.95)
        nesterov_ag_numpy(p_exp, g, v_exp, 0.05, 0.95)
        assert_same_bits(p, p_exp, "param, n=%d" % n)
        assert_same_bits(v, v_exp, "v, n=%d" % n)


def test_launcher_passes_threads_for(monkeypatch):
    """The launcher asks threads_for(n) when num_threads is None, else passes it on.

    Spies on the native entry points (the thread count is their last argument).
    """
    calls = []

    def spy(name):
        real = getattr(_nesterov_cpu, name)

        def wrapper(*args):
            calls.append(args[-1])
            return real(*args)
        monkeypatch.setattr(_nesterov_cpu, name, wrapper)
    names = [n for n in ("try_nesterov_ag_dense", "nesterov_ag_contiguous", "nesterov_ag_strided")
             if hasattr(_nesterov_cpu, n)]
    assert "nesterov_ag_contiguous" in names and "nesterov_ag_strided" in names
    for name in names:
        spy(name)
    set_num_threads(3)
    set_parallel_threshold(1000)
    for n, nt, expected in [(999, None, 1), (1000, None, expected_threads(3)),
                            (5000, None, expected_threads(3)), (10, 2, 2), (5000, 1, 1)]:
        for make in (lambda n: np.zeros(n), lambda n: np.zeros(2 * n)[::2],
                     lambda n: np.zeros(n, np.float32)):
            calls.clear()
            p, g, v = make(n), make(n), make(n)
            nesterov_ag_cpu(p, g, v, 0.1, 0.9, num_threads=nt)
            assert calls and set(calls) == {expected}, (n, nt, calls)


def test_more_threads_than_elements():
    for dtype in DTYPES:
        for n in (1, 2, 3, 5, 17):
            rng = np.random.default_rng(n)
            p, g, v = (_random(rng, n, dtype) for _ in range(3))
            p_exp, v_exp = p.copy(), v.copy()
            nesterov_ag_cpu(p, g, v, 0.1, 0.9, num_threads=64)
            nesterov_ag_numpy(p_exp, g, v_exp, 0.1, 0.9)
            assert_same_bits(p, p_exp)
            assert_same_bits(v, v_exp)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_concurrent_calls_from_python_threads(dtype):
    """Several Python threads, each running threaded updates on its own arrays."""
    import threading

    set_parallel_threshold(0)
    n, steps, n_workers = 20_011, 20, 4
    rng = np.random.default_rng(99)
    work = []
    for i in range(n_workers):
        arrays = [_random(rng, n, dtype) for _ in range(3)]
        if i % 2:
            arrays = [np.repeat(a, 2)[::2] for a in arrays]  # strided path
        expected = [np.array(a) for a in arrays]
        for _ in range(steps):
            nesterov_ag_numpy(expected[0], expected[1], expected[2], 0.02, 0.9)
        work.append((arrays, expected))
    errors = []

    def worker(arrays, nt):
        try:
            for _ in range(steps):
                nesterov_ag_cpu(arrays[0], arrays[1], arrays[2], 0.02, 0.9, num_threads=nt)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(arrays, 1 + i % 3))
          for i, (arrays, _) in enumerate(work)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    for arrays, expected in work:
        assert_same_bits(arrays[0], expected[0], "param")
        assert_same_bits(arrays[2], expected[2], "v")
