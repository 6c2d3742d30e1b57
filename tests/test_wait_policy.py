"""How idle OpenMP threads wait (``cynag_kernels._wait_policy``).

libgomp reads ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` once, when it is
loaded: every case runs in a fresh interpreter with a controlled environment.
What libgomp actually uses is read back from ``omp_display_env(1)``.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import cynag_kernels
from cynag_kernels import _wait_policy

ENV_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "CYNAG_NUM_THREADS", "OMP_NUM_THREADS",
            "CYNAG_PARALLEL_THRESHOLD")
USES_LIBGOMP = bool(_wait_policy.mapped_libgomp())
needs_libgomp = pytest.mark.skipif(not USES_LIBGOMP, reason="extensions not linked to libgomp")


def run_python(code, **env_vars):
    """Run ``code`` in a fresh interpreter that imports this cynag; its stdout as JSON."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(env_vars)
    root = os.path.dirname(os.path.dirname(os.path.abspath(cynag_kernels.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


# Prints the wait policy, the environment after import, show_config and
# (on stderr) what libgomp itself uses.
REPORT = """
    import ctypes, io, json, os, sys
    PRELOAD = %r
    if PRELOAD:
        ctypes.CDLL("libgomp.so.1")
    import cynag
    from cynag_kernels import threads
    buf = io.StringIO()
    cynag.show_config(file=buf)
    t = threads.thread_config()
    w = t["wait_policy"]
    assert w == cynag.config()["threads"]["wait_policy"]
    sys.stderr.flush()
    if w["libgomp"]:
        ctypes.CDLL(w["libgomp"][0]).omp_display_env(1)
    print(json.dumps({"wait": w, "show": buf.getvalue(), "threads": t["num_threads"],
                      "threads_source": t["source"],
                      "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}}))
"""


def report(preload=False, **env_vars):
    out, stderr = run_python(REPORT % preload, **env_vars)
    out["libgomp_env"] = stderr
    return out


def show_line(out):
    return next(l for l in out["show"].splitlines() if "idle threads wait" in l)


@needs_libgomp
def test_default_is_passive():
    out = report()
    w = out["wait"]
    assert w["source"] == "cynag default"
    assert w["policy"] == "OMP_WAIT_POLICY=passive" == "%s=%s" % _wait_policy.DEFAULT_ENV
    assert not w["spin_unbounded"]
    # libgomp took the value; the environment is given back as it was
    assert "GOMP_SPINCOUNT = '0'" in out["libgomp_env"]
    assert out["env"] == {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}
    assert "cynag default" in show_line(out)


@needs_libgomp
@pytest.mark.parametrize("var,value,shown", [
    ("OMP_WAIT_POLICY", "active", "OMP_WAIT_POLICY = 'ACTIVE'"),
    ("OMP_WAIT_POLICY", "PASSIVE", "GOMP_SPINCOUNT = '0'"),
    ("GOMP_SPINCOUNT", "300000", "GOMP_SPINCOUNT = '300000'"),
    ("GOMP_SPINCOUNT", " 5000 ", "GOMP_SPINCOUNT = '5000'"),
])
def test_user_environment_wins(var, value, shown):
    out = report(**{var: value})
    w = out["wait"]
    assert w["source"] == "user environment"
    assert w[var] == value and out["env"][var] == value  # unchanged
    other = "GOMP_SPINCOUNT" if var == "OMP_WAIT_POLICY" else "OMP_WAIT_POLICY"
    assert out["env"][other] is None  # nothing added next to it
    assert shown in out["libgomp_env"]
    line = show_line(out)
    assert "%s=%s" % (var, value) in line and "your environment" in line


@needs_libgomp
def test_libgomp_loaded_before_cynag():
    out = report(preload=True)
    w = out["wait"]
    assert w["source"] == "preloaded" and w["spin_unbounded"]
    # cynag's default came too late: libgomp keeps its own
    assert "GOMP_SPINCOUNT = '300000'" in out["libgomp_env"]
    assert out["env"] == {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}
    # so no team of cynag's by default
    assert out["threads"] == 1 and "loaded before cynag" in out["threads_source"]
    line = show_line(out)
    assert "another library loaded" in line and "one thread" in line


@needs_libgomp
@pytest.mark.skipif(not cynag_kernels.openmp_enabled(), reason="no OpenMP")
def test_libgomp_loaded_before_cynag_explicit_threads():
    # OMP_NUM_THREADS / CYNAG_NUM_THREADS are requests for threads: kept
    assert report(preload=True, OMP_NUM_THREADS="2")["threads"] == 2
    out = report(preload=True, CYNAG_NUM_THREADS="2")
    assert out["threads"] == 2 and out["threads_source"] == "CYNAG_NUM_THREADS"


@needs_libgomp
def test_libgomp_loaded_before_cynag_with_user_env():
    out = report(preload=True, GOMP_SPINCOUNT="2000")
    w = out["wait"]
    assert w["source"] == "user environment" and not w["spin_unbounded"]
    assert "GOMP_SPINCOUNT = '2000'" in out["libgomp_env"]
    assert out["threads"] == report()["threads"]


# ---------------------------------------------------------------------------
# Behaviour: after a parallel update, do the worker threads keep a CPU busy?
# ---------------------------------------------------------------------------
IDLE_CPU = """
    import ctypes, json, time
    import numpy as np
    if %r:
        ctypes.CDLL("libgomp.so.1")
    import cynag, cynag_kernels
    if %r:
        cynag.set_num_threads(2)
    n = 1 << 22
    assert n >= cynag.get_parallel_threshold()
    p = np.ones(n, np.float32); g = np.full(n, 1e-3, np.float32); v = np.zeros(n, np.float32)
    expected = None
    cpu = []
    for _ in range(3):
        cynag_kernels.nesterov_ag_cpu(p, g, v, 0.01, 0.9)
        c0 = time.process_time()
        time.sleep(0.08)
        cpu.append((time.process_time() - c0) * 1e3)
    # the kernel's numbers do not depend on the thread count
    p1 = np.ones(n, np.float32); v1 = np.zeros(n, np.float32)
    for _ in range(3):
        cynag_kernels.nesterov_ag_cpu(p1, g, v1, 0.01, 0.9, num_threads=1)
    same = bool((p1 == p).all() and (v1 == v).all())
    print(json.dumps({"cpu_ms": sorted(cpu)[1], "same": same}))
"""


def idle_cpu_ms(preload=False, set_threads=True, **env_vars):
    out, _ = run_python(IDLE_CPU % (preload, set_threads), **env_vars)
    assert out["same"]
    return out["cpu_ms"]


needs_two_cpus = pytest.mark.skipif(
    cynag_kernels.threads.cpu_count() < 2 or not cynag_kernels.openmp_enabled(),
    reason="needs OpenMP and 2 CPUs")


@needs_libgomp
@needs_two_cpus
def test_idle_threads_do_not_spin():
    # 80 ms of sleep after a 2-thread update: the sleeping worker costs
    # nothing (libgomp's own default spin, several ms of CPU); a spinning
    # worker would take most of the 80 ms
    assert idle_cpu_ms() < 3.0


@needs_libgomp
@needs_two_cpus
def test_idle_threads_do_not_spin_libgomp_loaded_first():
    # the default thread count (one thread) leaves no team to spin
    assert idle_cpu_ms(preload=True, set_threads=False) < 3.0


@needs_libgomp
@needs_two_cpus
def test_active_policy_spins():
    # the control: the measure does see a spinning worker (loosely: the
    # machine may be shared, the spinner preempted)
    assert idle_cpu_ms(OMP_WAIT_POLICY="active") > 10.0


def test_mapped_libgomp_names():
    paths = _wait_policy.mapped_libgomp()
    if paths is None:
        pytest.skip("no /proc/self/maps")
    for p in paths:
        base = os.path.basename(p)
        assert base.startswith("libgomp.so.1")
    assert _wait_policy._LIBGOMP.fullmatch("libgomp.so.1.0.0")
    # PyTorch's renamed copy is a separate runtime
    assert not _wait_policy._LIBGOMP.fullmatch("libgomp-a34b3233.so.1")


def test_a_repaired_wheel_runtime_is_its_own_copy(tmp_path):
    """With cynag.libs/ beside the packages (auditwheel's copy), that file alone is
    cynag's runtime: the system's libgomp.so.1 and PyTorch's copy are others."""
    assert _wait_policy._own_runtime(str(tmp_path)) is _wait_policy._LIBGOMP
    (tmp_path / "cynag.libs").mkdir()
    (tmp_path / "cynag.libs" / "libgomp-f9a9ad78.so.1.0.0").write_bytes(b"")
    own = _wait_policy._own_runtime(str(tmp_path))
    assert own.fullmatch("libgomp-f9a9ad78.so.1.0.0")
    for other in ("libgomp.so.1", "libgomp.so.1.0.0", "libgomp-a34b3233.so.1",
                  "libgomp-f9a9ad78.so.1.0.0.bak"):
        assert not own.fullmatch(other), other
