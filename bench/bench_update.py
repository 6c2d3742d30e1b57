#!/usr/bin/env python
"""Benchmark of one NesterovAG step on the CPU (a benchmark, not a test).

Measures, in one run, with interleaved rounds and medians:

* ``cynag update()``   -- ``cynag.optimizers.NesterovAG(...).setup(link)`` then
  ``opt.update()`` on a ``cynag.Link`` holding one ``cynag.Parameter``
  (skipped with a note if ``cynag`` cannot be imported);
* ``cynag kernel``     -- ``cynag_kernels.nesterov_ag_cpu(p, g, v, lr, m)``;
* ``numpy sequence``   -- Chainer's in-place sequence
  ``v *= m; v -= lr*g; p += m*m*v; p -= (1+m)*lr*g``;
* ``chainer update()`` -- Chainer's own ``NesterovAG.update()`` when
  ``import chainer`` works in this interpreter;
* ``C loop``           -- the same arithmetic hand-written in C with OpenMP
  (``bench/native_probe.c``, compiled now with the system compiler);
* ``probe 3R+2W``      -- a C bandwidth probe that reads three arrays and
  writes two (20 bytes per float32 element, NesterovAG's traffic), run on
  float32 arrays of the same byte size as the case's arrays.

Run from the repository root after an in-place build::

    python setup.py build_ext --inplace
    PYTHONPATH=$PWD python bench/bench_update.py [--quick] [--json FILE]

or with cynag installed (``pip install .``): ``python bench/bench_update.py``.
See bench/README.md for the meaning of the columns.
"""
import argparse
import atexit
import ctypes
import datetime
import functools
import gc
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import numpy

LR = 0.01
MOMENTUM = 0.9
ACCESSES = 5                      # read p, g, v; write p, v
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PROBE_SRC = os.path.join(HERE, "native_probe.c")

# (name, dtype, number of elements, headline?)
CASES = [
    ("float32 2**24", numpy.float32, 2 ** 24, True),
    ("float64 2**23", numpy.float64, 2 ** 23, False),
    ("float16 2**22", numpy.float16, 2 ** 22, False),
    ("float32 2**12 (small)", numpy.float32, 2 ** 12, False),
]
HEADLINE_TARGET = 1.15
NOISY_IQR_PCT = 25.0
OTHER_LOAD_WARN = 0.25    # CPUs used by other processes during a case
NOISE_NOTE = ("This machine is shared and noisy: absolute times vary from run to run; "
              "only ratios between variants measured in the same run are meaningful.")

_progress_tty = sys.stderr.isatty()


def progress(msg, final=False):
    """Progress on stderr (overwritten in place on a terminal)."""
    if _progress_tty:
        sys.stderr.write("\r\033[K" + msg + ("\n" if final else ""))
    else:
        sys.stderr.write(msg + "\n")
    sys.stderr.flush()


# ---------------------------------------------------------------------------
# Imports of the things being measured
# ---------------------------------------------------------------------------
def import_kernels():
    try:
        import cynag_kernels
        import cynag_kernels.threads  # noqa: F401
    except ImportError as e:
        sys.exit(
            "bench_update.py: cannot import cynag_kernels (%s).\n"
            "Build in place and put the repository on the path:\n"
            "    cd %s && python setup.py build_ext --inplace\n"
            "    PYTHONPATH=%s python bench/bench_update.py\n"
            "or install cynag (pip install %s)." % (e, REPO, REPO, REPO))
    return cynag_kernels


def import_cynag():
    """(cynag module, None) or (None, reason)."""
    try:
        import cynag
        import cynag.optimizers
        for attr in ("Link", "Parameter"):
            getattr(cynag, attr)
        cynag.optimizers.NesterovAG
    except Exception as e:  # ImportError, or a package that is half written
        return None, "%s: %s" % (type(e).__name__, e)
    return cynag, None


def import_chainer():
    """(chainer module, None) or (None, reason)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import chainer
            import chainer.optimizers
    except Exception as e:
        return None, ("%s: %s (not installed in %s; try .chainer-venv/bin/python, built by the test suite)"
                      % (type(e).__name__, e, sys.executable))
    return chainer, None


# ---------------------------------------------------------------------------
# Native probe (bench/native_probe.c), compiled now and loaded with ctypes
# ---------------------------------------------------------------------------
class NativeProbe:
    def __init__(self, lib, command, compiler_version):
        self.lib = lib
        self.command = command
        self.compiler_version = compiler_version
        vp, i64, ci = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        f32, f64 = ctypes.c_float, ctypes.c_double
        lib.probe_openmp.restype = ci
        lib.probe_max_threads.restype = ci
        lib.probe_has_f16.restype = ci
        lib.probe_triad_f32.argtypes = [vp, vp, vp, i64, f32, ci]
        lib.probe_triad_f32.restype = None
        lib.probe_copy_f32.argtypes = [vp, vp, i64, ci]
        lib.probe_copy_f32.restype = None
        lib.nag_f32.argtypes = [vp, vp, vp, i64, f32, f32, f32, f32, ci]
        lib.nag_f32.restype = None
        lib.nag_f64.argtypes = [vp, vp, vp, i64, f64, f64, f64, f64, ci]
        lib.nag_f64.restype = None
        lib.probe_noop.argtypes = [vp, vp, vp, i64, f32, f32, f32, f32, ci]
        lib.probe_noop.restype = None
        lib.probe_has_f16c.restype = ci
        lib.probe_compute.argtypes = [i64, f64, ci]
        lib.probe_compute.restype = ctypes.c_double
        self.openmp = bool(lib.probe_openmp())
        # dtype -> [(key, label, function)]
        self.nag = {numpy.dtype(numpy.float32): [("c_loop", "C loop", lib.nag_f32)],
                    numpy.dtype(numpy.float64): [("c_loop", "C loop", lib.nag_f64)]}
        if lib.probe_has_f16():
            f16 = self.nag[numpy.dtype(numpy.float16)] = []
            lib.nag_f16.argtypes = [vp, vp, vp, i64, f32, f32, f32, f32, ci]
            lib.nag_f16.restype = None
            f16.append(("c_loop", "C loop (_Float16)", lib.nag_f16))
            if lib.probe_has_f16c():
                lib.nag_f16_f16c.argtypes = [vp, vp, vp, i64, f32, f32, f32, f32, ci]
                lib.nag_f16_f16c.restype = None
                f16.append(("c_loop_f16c", "C loop (F16C)", lib.nag_f16_f16c))

    def parallel_speedup(self, threads, iters=2_000_000, reps=7):
        """{threads: time(1 thread) / time(threads)} for a compute-bound loop."""
        times = {}
        for t in sorted(set((1,) + tuple(threads))):
            fn = functools.partial(self.lib.probe_compute, iters, 0.9999999, t)
            fn()
            times[t] = statistics.median(timed(fn, 1) for _ in range(reps))
        return {t: times[1] / times[t] for t in threads if t > 1}

    def fork_join_us(self, threads, calls=300):
        """{threads: median us of one empty parallel region, ctypes call included}."""
        out = {}
        for t in threads:
            fn = functools.partial(self.lib.probe_compute, 0, 0.5, t)
            fn()
            out[t] = 1e6 * statistics.median(timed(fn, 1) for _ in range(calls))
        return out

    def call_overhead_us(self, reps=20000):
        """Median time of one ctypes call to a no-op with nag_f32's signature."""
        fn = functools.partial(self.lib.probe_noop, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 1)
        return 1e6 * statistics.median(timed(fn, reps) for _ in range(7))


def build_probe():
    """(NativeProbe, None) or (None, reason)."""
    if not os.path.exists(PROBE_SRC):
        return None, "%s not found" % PROBE_SRC
    cc = shlex.split(os.environ.get("CC", "cc"))
    try:
        version = subprocess.run(cc + ["--version"], capture_output=True, text=True,
                                 timeout=30).stdout.splitlines()[0].strip()
    except Exception as e:
        return None, "no C compiler (%s: %s)" % (cc[0], e)
    tmp = tempfile.mkdtemp(prefix="cynag-bench-")
    atexit.register(shutil.rmtree, tmp, True)
    errors = []
    for i, flags in enumerate((["-O3", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC"],
                               ["-O3", "-ffp-contract=off", "-shared", "-fPIC"])):
        out = os.path.join(tmp, "native_probe%d.so" % i)
        cmd = cc + flags + [PROBE_SRC, "-o", out]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["exit status %d" % r.returncode])[-1]
            errors.append("%s: %s" % (" ".join(flags), last))
            continue
        try:
            lib = ctypes.CDLL(out)
        except OSError as e:
            errors.append("%s: load failed: %s" % (" ".join(flags), e))
            continue
        shown = " ".join(cc + flags + ["bench/native_probe.c"])
        return NativeProbe(lib, shown, version), None
    return None, "could not build %s: %s" % (PROBE_SRC, "; ".join(errors))


# ---------------------------------------------------------------------------
# Implementations: each builds a step function over its own arrays
# ---------------------------------------------------------------------------
def coefficients(dtype):
    """(lr, m, mm, c) rounded to the compute dtype, as Chainer's sequence rounds them."""
    t = numpy.float32 if numpy.dtype(dtype) == numpy.float16 else numpy.dtype(dtype).type
    return tuple(float(t(x)) for x in (LR, MOMENTUM, MOMENTUM * MOMENTUM, (1 + MOMENTUM) * LR))


def numpy_sequence(p, g, v, lr=LR, momentum=MOMENTUM):
    """Chainer 7.8.1's NesterovAGRule.update_core_cpu, on bare arrays."""
    v *= momentum
    v -= lr * g
    p += momentum * momentum * v
    p -= (1 + momentum) * lr * g


class Impl:
    """One implementation: ``make(p, g, v)`` -> Instance (owns the arrays).

    ``threaded``: measured at each thread count (cynag through
    ``set_num_threads``, C through its argument); otherwise once.
    """

    def __init__(self, key, label, make, threaded):
        self.key, self.label, self.make, self.threaded = key, label, make, threaded


class Instance:
    def __init__(self, step_for_threads, state, keep):
        self.step_for_threads = step_for_threads   # threads -> (prepare, step)
        self.state = state                         # () -> (p, v or None)
        self.keep = keep                           # keeps arrays alive


def _noop():
    pass


def kernel_impl(K):
    def make(p, g, v):
        step = functools.partial(K.nesterov_ag_cpu, p, g, v, LR, MOMENTUM)

        def for_threads(t):
            return functools.partial(K.set_num_threads, t), step
        return Instance(for_threads, lambda: (p, v), (p, g, v))
    return Impl("cynag_kernel", "cynag kernel", make, True)


def optimizer_impl(mod, K, key, label):
    """cynag or chainer: Link + Parameter + NesterovAG.setup(link); step = opt.update."""
    def make(p, g, v):  # v unused: the optimizer creates its zero state itself
        link = mod.Link()
        with link.init_scope():
            link.W = mod.Parameter(p)
        link.W.grad = g
        opt = mod.optimizers.NesterovAG(lr=LR, momentum=MOMENTUM)
        opt.setup(link)

        def state():
            W = link.W
            arr = W.array if hasattr(W, "array") else W.data
            try:
                vv = W.update_rule.state["v"]
            except Exception:
                vv = None
            return arr, vv

        def for_threads(t):
            prepare = functools.partial(K.set_num_threads, t) if K is not None else _noop
            return prepare, opt.update
        return Instance(for_threads, state, (link, opt, p, g))
    return Impl(key, label, make, K is not None)


def numpy_impl():
    def make(p, g, v):
        step = functools.partial(numpy_sequence, p, g, v)
        return Instance(lambda t: (_noop, step), lambda: (p, v), (p, g, v))
    return Impl("numpy", "numpy sequence", make, False)


def c_loop_impl(key, label, fn, dtype):
    coeffs = coefficients(dtype)

    def make(p, g, v):
        ptrs = (p.ctypes.data, g.ctypes.data, v.ctypes.data, p.size)

        def for_threads(t):
            return _noop, functools.partial(fn, *ptrs, *coeffs, t)
        return Instance(for_threads, lambda: (p, v), (p, g, v))
    return Impl(key, label, make, True)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------
def make_inputs(dtype, n, seed):
    """param ~ U(-1, 1); grad of magnitude in [0.005, 0.01] with a random sign.

    The gradient is kept small and away from zero so that thousands of steps
    neither overflow float16 nor produce subnormals (which would time the FPU's
    slow path rather than the update)."""
    rng = numpy.random.default_rng(seed)
    p = rng.uniform(-1.0, 1.0, n).astype(dtype)
    g = (rng.choice([-1.0, 1.0], n) * rng.uniform(0.005, 0.01, n)).astype(dtype)
    return p, g


def zeros_touched(like):
    """Zeros whose pages are really mapped (numpy.zeros maps the shared zero page)."""
    a = numpy.empty_like(like)
    a.fill(0)
    return a


def bits(a):
    return a.view({2: numpy.uint16, 4: numpy.uint32, 8: numpy.uint64}[a.dtype.itemsize])


def compare(a, ref):
    """'bit-identical' or a description of the difference."""
    a = numpy.asarray(a)
    if a.shape != ref.shape or a.dtype != ref.dtype:
        return "shape/dtype %s %s vs %s %s" % (a.shape, a.dtype, ref.shape, ref.dtype)
    if numpy.array_equal(bits(a), bits(ref)):
        return "bit-identical"
    diff = numpy.abs(a.astype(numpy.float64) - ref.astype(numpy.float64))
    return "%d/%d elements differ, max |d| %.3g" % (
        int(numpy.count_nonzero(bits(a) != bits(ref))), a.size, float(numpy.nanmax(diff)))


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------
class Variant:
    def __init__(self, key, label, threads, prepare, step, nbytes, keep, note=""):
        self.key, self.label, self.threads = key, label, threads
        self.prepare, self.step = prepare, step
        self.nbytes = nbytes
        self.keep = keep
        self.note = note
        self.reps = 1
        self.samples = []

    @property
    def id(self):
        return "%s/%s" % (self.key, self.threads)


class OtherLoad:
    """CPU time used by *other* processes while a block runs (Linux /proc/stat).

    ``result()`` is the average number of CPUs they kept busy: all busy CPU
    time of the machine minus this process's own CPU time, over the wall time.
    None where /proc/stat is not available."""

    def __init__(self):
        self.start = self._snapshot()

    @staticmethod
    def _snapshot():
        try:
            with open("/proc/stat") as f:
                fields = f.readline().split()
            assert fields[0] == "cpu"
            v = [int(x) for x in fields[1:]]
            busy = v[0] + v[1] + v[2] + sum(v[5:8])   # user nice system irq softirq steal
            t = os.times()
            return (busy / os.sysconf("SC_CLK_TCK"), t.user + t.system, time.perf_counter())
        except Exception:
            return None

    def result(self):
        end = self._snapshot()
        if self.start is None or end is None:
            return None
        wall = end[2] - self.start[2]
        other = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return max(0.0, other / wall) if wall > 0 else None


def timed(step, reps):
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    return (time.perf_counter() - t0) / reps


def calibrate(var, warmup, min_sample_s):
    var.prepare()
    for _ in range(warmup):
        var.step()
    t1 = min(timed(var.step, 1) for _ in range(3))
    var.reps = int(max(1, min(100000, math.ceil(min_sample_s / max(t1, 1e-9)))))


def paired_ratio(a, b):
    """Median over rounds of a[r] / b[r] (variants timed in the same round)."""
    return statistics.median(x / y for x, y in zip(a.samples, b.samples))


# ---------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------
def run_check(ctx, impls, dtype, n):
    """Two steps from v = 0 on identical inputs; each implementation vs numpy."""
    n_check = min(n, 2 ** 17)
    p0, g0 = make_inputs(dtype, n_check, seed=1)
    ref = None
    lines = []
    results = {}
    states = {}
    for impl in impls:
        for t in (ctx.threads if impl.threaded else (1,)):
            inst = impl.make(p0.copy(), g0.copy(), zeros_touched(p0))
            prepare, step = inst.step_for_threads(t)
            prepare()
            step()
            step()
            states[(impl.key, t)] = inst.state()
            if impl.key == "numpy":
                ref = states[(impl.key, t)]
    ctx.K.set_num_threads(None)
    for (key, t), (p, v) in states.items():
        if key == "numpy":
            continue
        r = "p " + compare(p, ref[0])
        r += "; v " + (compare(v, ref[1]) if v is not None else "not readable")
        if (numpy.dtype(dtype) == numpy.float16 and key != "c_loop"
                and ("c_loop", t) in states):
            r += "; vs C loop (_Float16): p %s" % compare(p, states[("c_loop", t)][0])
        results["%s/%d" % (key, t)] = r
    label = {impl.key: impl.label for impl in impls}
    grouped = {}
    for k, r in results.items():
        key, t = k.split("/")
        grouped.setdefault((key, r), []).append(t)
    for (key, r), ts in grouped.items():
        lines.append("  %-18s thr %-4s %s" % (label[key], ",".join(ts), r))
    header = ("check: 2 steps from v=0 on %d elements, each against the numpy sequence"
              % n_check)
    return [header] + lines, results


def build_variants(ctx, impls, dtype, n):
    itemsize = numpy.dtype(dtype).itemsize
    nbytes = ACCESSES * itemsize * n
    p0, g0 = make_inputs(dtype, n, seed=0)
    variants = []
    below = n < ctx.K.get_parallel_threshold()
    for impl in impls:
        inst = impl.make(p0.copy(), g0.copy(), zeros_touched(p0))
        for t in (ctx.threads if impl.threaded else (1,)):
            prepare, step = inst.step_for_threads(t)
            note = ""
            if impl.key in ("cynag_kernel", "cynag_update") and t > 1 and below:
                note = "ran on 1 thread: n < parallel threshold %d" % ctx.K.get_parallel_threshold()
            if not impl.threaded:
                note = "single-threaded"
            variants.append(Variant(impl.key, impl.label, t, prepare, step, nbytes, inst, note))
    del p0, g0
    if ctx.probe is not None:
        m = -(-n * itemsize // 4)           # float32 elements with the same bytes per array
        a, b, c = (numpy.empty(m, numpy.float32) for _ in range(3))
        a.fill(1.0)
        b.fill(-1.0)
        c.fill(0.5)
        ptrs = (a.ctypes.data, b.ctypes.data, c.ctypes.data, m, 2.0 ** -20)
        variants[:0] = [
            Variant("probe", "probe 3R+2W (C)", t, _noop,
                    functools.partial(ctx.probe.lib.probe_triad_f32, *ptrs, t),
                    ACCESSES * 4 * m, (a, b, c))
            for t in ctx.threads]
    return variants


def run_case(ctx, case_index, case):
    name, dtype, n, headline = case
    dtype = numpy.dtype(dtype)
    tag = "[%d/%d %s]" % (case_index + 1, len(ctx.cases), name)
    impls = []
    if ctx.probe is not None:
        for key, label, fn in ctx.probe.nag.get(dtype, ()):
            impls.append(c_loop_impl(key, label, fn, dtype))
    if ctx.cynag is not None:
        impls.append(optimizer_impl(ctx.cynag, ctx.K, "cynag_update", "cynag update()"))
    impls.append(kernel_impl(ctx.K))
    impls.append(numpy_impl())
    if ctx.chainer is not None:
        impls.append(optimizer_impl(ctx.chainer, None, "chainer_update", "chainer update()"))

    progress("%s correctness check" % tag)
    check_lines, check = run_check(ctx, impls, dtype, n)

    progress("%s allocating %.0f MiB per array" % (tag, n * dtype.itemsize / 2 ** 20))
    variants = build_variants(ctx, impls, dtype, n)

    for i, var in enumerate(variants):
        progress("%s warm-up %d/%d: %s, %d thr" % (tag, i + 1, len(variants), var.label,
                                                   var.threads))
        calibrate(var, ctx.warmup, ctx.min_sample_s)

    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    load = OtherLoad()
    try:
        for r in range(ctx.rounds):
            progress("%s round %d/%d" % (tag, r + 1, ctx.rounds))
            k = r % len(variants)
            for var in variants[k:] + variants[:k]:   # rotate the order every round
                var.prepare()
                var.samples.append(timed(var.step, var.reps))
    finally:
        if gc_was_enabled:
            gc.enable()
        ctx.K.set_num_threads(None)
    progress("%s done" % tag, final=True)

    result = analyse(ctx, name, dtype, n, headline, variants, check, check_lines)
    result["other_load_cpus"] = load.result()
    for var in variants:
        var.keep = None
    gc.collect()
    return result


def analyse(ctx, name, dtype, n, headline, variants, check, check_lines):
    by_id = {v.id: v for v in variants}

    def find(key, t):
        return by_id.get("%s/%d" % (key, t)) or by_id.get("%s/1" % key)

    rows = []
    for var in variants:
        s = sorted(var.samples)
        med = statistics.median(s)
        q1, q3 = numpy.percentile(s, [25, 75])
        probe = find("probe", var.threads)
        cloop = by_id.get("c_loop/%d" % var.threads)
        nump = find("numpy", 1)
        chain = find("chainer_update", 1)
        rows.append({
            "variant": var.label, "key": var.key, "threads": var.threads,
            "median_ms": med * 1e3, "iqr_pct": 100.0 * (q3 - q1) / med,
            "gbps": var.nbytes / med / 1e9,
            "frac_probe": paired_ratio(probe, var) if probe else None,
            "x_c_loop": paired_ratio(var, cloop) if cloop else None,
            "speedup_numpy": paired_ratio(nump, var) if nump else None,
            "speedup_chainer": paired_ratio(chain, var) if chain else None,
            "x_c_loops": {c.key: paired_ratio(var, c) for c in variants
                          if c.key.startswith("c_loop") and c.threads == var.threads},
            "reps_per_sample": var.reps, "note": var.note,
            "samples_s": var.samples,
        })
    res = {"name": name, "dtype": dtype.name, "n": n, "headline": headline,
           "bytes_per_array": n * dtype.itemsize,
           "bytes_per_step": ACCESSES * n * dtype.itemsize,
           "rounds": ctx.rounds, "rows": rows, "check": check, "check_lines": check_lines}
    return res


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------
def sig(x, none="-", suffix=""):
    """About 3 significant digits, whatever the magnitude."""
    if x is None:
        return none
    if x >= 100:
        return "%.0f%s" % (x, suffix)
    if x >= 10:
        return "%.1f%s" % (x, suffix)
    if x >= 0.01:
        return "%.3f%s" % (x, suffix)
    return "%.1e%s" % (x, suffix)


def print_case(res):
    mib = res["bytes_per_array"] / 2 ** 20
    print()
    print("== %s: 1 tensor of %d elements (%s MiB per array, %.1f MiB moved per step, "
          "%d rounds) ==" % (res["name"], res["n"], format(mib, ".4g"),
                             res["bytes_per_step"] / 2 ** 20, res["rounds"]))
    hdr = ("%-20s %3s %11s %6s %8s %7s %8s %9s %10s  %s"
           % ("variant", "thr", "median ms", "IQR%", "GB/s", "%probe", "x C loop",
              "vs numpy", "vs chainer", "note"))
    print(hdr)
    print("-" * len(hdr))
    for r in res["rows"]:
        notes = [r["note"]] if r["note"] else []
        if r["reps_per_sample"] > 1:
            notes.append("%d calls/sample" % r["reps_per_sample"])
        if r["iqr_pct"] > NOISY_IQR_PCT:
            notes.append("NOISY")
        ms = r["median_ms"]
        print("%-20s %3d %11s %6.1f %8s %7s %8s %9s %10s  %s" % (
            r["variant"], r["threads"],
            "%.3f" % ms if ms >= 1 else "%.4f" % ms if ms >= 0.01 else "%.2e" % ms,
            r["iqr_pct"], sig(r["gbps"]),
            sig(None if r["frac_probe"] is None else 100 * r["frac_probe"]),
            sig(r["x_c_loop"]), sig(r["speedup_numpy"], "-", "x"),
            sig(r["speedup_chainer"], "n/a", "x"), "; ".join(notes)))
    load = res.get("other_load_cpus")
    if load is not None:
        print("other processes kept %.2f CPUs busy on average during the rounds%s" % (
            load, "  <-- contended: the multi-thread rows (and some 1-thread ones) are unreliable"
            if load > OTHER_LOAD_WARN else ""))
    for line in res["check_lines"]:
        print(line)


def headline_summary(res, ctx):
    rows = {(r["key"], r["threads"]): r for r in res["rows"]}
    key = "cynag_update" if ctx.cynag is not None else "cynag_kernel"
    what = "cynag update()" if ctx.cynag is not None else "cynag kernel nesterov_ag_cpu()"
    out = {"what": what, "target": HEADLINE_TARGET, "per_threads": {}}
    lines = ["HEADLINE (%s): %s time / C loop time, target <= %.2f"
             % (res["name"], what, HEADLINE_TARGET)]
    if ctx.cynag is None:
        lines.append("  (cynag.optimizers not importable: %s; using the kernel call)"
                     % ctx.cynag_note)
    met_all = True
    for t in ctx.threads:
        r = rows.get((key, t))
        k = rows.get(("cynag_kernel", t))
        if r is None:
            continue
        ratio = r["x_c_loop"]
        met = ratio is not None and ratio <= HEADLINE_TARGET
        met_all = met_all and met
        out["per_threads"][t] = {"ratio_c_loop": ratio, "kernel_ratio_c_loop": k and k["x_c_loop"],
                                 "speedup_numpy": r["speedup_numpy"],
                                 "speedup_chainer": r["speedup_chainer"],
                                 "median_ms": r["median_ms"], "met": met}
        lines.append(
            "  %d thread%s: %s / C loop = %s  [%s]; kernel alone / C loop = %s; "
            "speedup vs numpy %s, vs Chainer %s"
            % (t, "s" if t > 1 else " ", what, sig(ratio),
               "OK" if met else ("NOT MET" if ratio is not None else "no C loop"),
               sig(k and k["x_c_loop"]), sig(r["speedup_numpy"], "-", "x"),
               sig(r["speedup_chainer"], "n/a", "x")))
    out["met"] = met_all
    load = res.get("other_load_cpus")
    if load is not None and load > OTHER_LOAD_WARN:
        lines.append("  WARNING: other processes kept %.2f CPUs busy during this case; rerun on a "
                     "quiet machine before trusting the multi-thread ratios" % load)
    return lines, out


def cpu_info():
    info = {"model": platform.processor() or platform.machine(), "flags": []}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and info.get("_m") is None:
                    info["model"] = info["_m"] = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not info["flags"]:
                    info["flags"] = line.split(":", 1)[1].split()
    except OSError:
        pass
    info.pop("_m", None)
    caches = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in sorted(os.listdir(base)):
            d = os.path.join(base, idx)
            try:
                level = open(os.path.join(d, "level")).read().strip()
                typ = open(os.path.join(d, "type")).read().strip()
                size = open(os.path.join(d, "size")).read().strip()
            except OSError:
                continue
            if typ != "Instruction":
                caches.append("L%s%s %s" % (level, "d" if typ == "Data" else "", size))
    except OSError:
        pass
    info["caches"] = caches
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    info["mem_gib"] = int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    simd = [f for f in ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f") if f in info["flags"]]
    info["simd"] = simd
    info["hypervisor"] = "hypervisor" in info["flags"]
    del info["flags"]
    return info


def measure_copy_bandwidth(probe, threads, reps=7):
    """Plain copy, 64 MiB arrays: GB/s (2 accesses per element) per thread count."""
    m = 2 ** 24
    a = numpy.empty(m, numpy.float32)
    b = numpy.empty(m, numpy.float32)
    a.fill(1.0)
    b.fill(0.0)
    out = {}
    for t in threads:
        fn = functools.partial(probe.lib.probe_copy_f32, a.ctypes.data, b.ctypes.data, m, t)
        fn()
        out[t] = 2 * 4 * m / statistics.median(timed(fn, 1) for _ in range(reps)) / 1e9
    return out


def machine_header(ctx):
    K = ctx.K
    cpu = cpu_info()
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    tc = getattr(K.threads, "thread_config", lambda: {})()
    lines = [
        "NesterovAG update benchmark (bench/bench_update.py)  %s"
        % datetime.datetime.now().isoformat(timespec="seconds"),
        "NOTE: " + NOISE_NOTE,
        "machine : %s; %s logical CPUs (%s usable by this process)%s; %s; RAM %.1f GiB"
        % (cpu["model"], os.cpu_count(), affinity,
           ", under a hypervisor" if cpu["hypervisor"] else "",
           ", ".join(cpu["caches"]) or "caches unknown", cpu.get("mem_gib", float("nan"))),
        "          SIMD: %s" % (" ".join(cpu["simd"]) or "?"),
        "python  : %s %s (%s)" % (platform.python_implementation(), platform.python_version(),
                                  sys.executable),
        "numpy   : %s" % numpy.__version__,
        "cynag_kernels: %s" % os.path.dirname(K.__file__),
        "          build_info %s" % (K.build_info(),),
        "          threads %s" % (tc,),
        "cynag   : %s" % ("%s %s" % (getattr(ctx.cynag, "__version__", "?"),
                                      os.path.dirname(ctx.cynag.__file__))
                          if ctx.cynag is not None
                          else "NOT importable (%s): cynag update() rows skipped" % ctx.cynag_note),
        "chainer : %s" % ("%s (%s)" % (ctx.chainer.__version__,
                                       os.path.dirname(ctx.chainer.__file__))
                          if ctx.chainer is not None
                          else "skipped -- %s" % ctx.chainer_note),
    ]
    if ctx.probe is not None:
        lines.append("C probe : %s  [%s; OpenMP %s]" % (
            ctx.probe.command, ctx.probe.compiler_version,
            "on" if ctx.probe.openmp else "OFF: the C rows are single-threaded"))
        if ctx.copy_bw:
            lines.append("          plain copy bandwidth (64 MiB, 1R+1W): %s" % ", ".join(
                "%.1f GB/s at %d thr" % (bw, t) for t, bw in ctx.copy_bw.items()))
        lines.append("          one ctypes call (no-op, 9 arguments) costs %.2f us; "
                     "the C rows include it" % ctx.ctypes_us)
        if ctx.fork_join:
            lines.append("          empty parallel region (fork/join + ctypes call), median: %s"
                         % ", ".join("%.1f us at %d thr" % (us, t)
                                     for t, us in ctx.fork_join.items()))
        for t, sp in ctx.par_speedup.items():
            lines.append("          parallelism check: a compute-bound C loop runs %.2fx faster "
                         "on %d threads than on 1%s" % (
                             sp, t, "" if sp >= 0.75 * min(t, affinity or t) else
                             "  <-- threads do NOT run in parallel here: treat the "
                             "%d-thread rows with caution" % t))
    else:
        lines.append("C probe : unavailable (%s): no C loop / probe rows" % ctx.probe_note)
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "CYNAG_NUM_THREADS",
                                          "CYNAG_PARALLEL_THRESHOLD", "OMP_PROC_BIND",
                                          "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    lines.append("settings: threads %s (cynag via cynag_kernels.set_num_threads, C via "
                 "num_threads); lr=%g momentum=%g; %d rounds, %d warm-up calls, samples of "
                 ">= %.0f ms; env %s"
                 % (",".join(map(str, ctx.threads)), LR, MOMENTUM, ctx.rounds, ctx.warmup,
                    ctx.min_sample_s * 1e3,
                    {k: v for k, v in env.items() if v is not None} or "{}"))
    if affinity is not None and max(ctx.threads) > affinity:
        lines.append("WARNING: more threads than usable CPUs (%d): oversubscribed" % affinity)
    if cpu["hypervisor"] and max(ctx.threads) > 1:
        lines.append("hint    : on a virtual machine multi-thread timings depend on OMP_WAIT_POLICY "
                     "(now %s): spinning threads\n          can be descheduled by the host "
                     "(erratic times), sleeping ones may be woken on the busy CPU (no\n"
                     "          parallelism); see the parallelism check and "
                     "--omp-wait-policy" % (env["OMP_WAIT_POLICY"] or "unset = spin a while"))
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "usable_cpus": affinity,
            "python": sys.version, "executable": sys.executable, "numpy": numpy.__version__,
            "cynag_kernels_path": os.path.dirname(K.__file__), "build_info": K.build_info(),
            "thread_config": tc,
            "cynag": None if ctx.cynag is None else getattr(ctx.cynag, "__version__", "?"),
            "cynag_note": ctx.cynag_note,
            "chainer": None if ctx.chainer is None else ctx.chainer.__version__,
            "chainer_note": ctx.chainer_note,
            "c_probe": None if ctx.probe is None else {
                "command": ctx.probe.command, "compiler": ctx.probe.compiler_version,
                "openmp": ctx.probe.openmp},
            "c_probe_note": ctx.probe_note,
            "copy_gbps": ctx.copy_bw, "ctypes_call_us": ctx.ctypes_us,
            "parallel_speedup": ctx.par_speedup, "fork_join_us": ctx.fork_join, "env": env}
    return lines, info


LEGEND = """\
columns: median ms = median over rounds of the time of one call; IQR% = interquartile
  range / median; GB/s = 5 accesses x itemsize x n / median; %probe = probe time / this
  time (share of the 3R+2W bandwidth probe at the same bytes and thread count);
  x C loop = this time / C loop time at the same thread count (lower is better, 1 = as
  fast as hand-written C); vs numpy, vs chainer = their time / this time (speedups; numpy
  and Chainer are single-threaded, so the 2-thread rows compare with the same 1-thread
  baseline).  Ratios are medians of per-round ratios (variants interleaved in each round)."""


class Ctx:
    pass


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds and shorter samples")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds per case (default 15, --quick 5)")
    ap.add_argument("--json", metavar="FILE", help="also write all results and raw samples here")
    ap.add_argument("--threads", default="1,2", help="thread counts (default 1,2)")
    ap.add_argument("--cases", default=None,
                    help="comma-separated case numbers to run, 1-%d (default all)" % len(CASES))
    ap.add_argument("--omp-wait-policy", choices=("passive", "active"), default=None,
                    help="set OMP_WAIT_POLICY before the OpenMP runtime loads (default: "
                         "leave the environment alone); 'passive' steadies 2-thread timings "
                         "on virtual machines where spinning threads get descheduled")
    args = ap.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        ap.error("--rounds must be >= 1")
    try:
        args.threads = tuple(int(t) for t in args.threads.split(","))
        assert all(t >= 1 for t in args.threads)
    except (ValueError, AssertionError):
        ap.error("--threads must be a comma-separated list of positive integers")
    try:
        args.cases = (list(range(len(CASES))) if args.cases is None
                      else [int(c) - 1 for c in args.cases.split(",")])
        assert all(0 <= c < len(CASES) for c in args.cases)
    except (ValueError, AssertionError):
        ap.error("--cases must list numbers from 1 to %d" % len(CASES))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.omp_wait_policy:
        # libgomp reads it once, when it is loaded (by the cynag_kernels import below).
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    ctx = Ctx()
    ctx.K = import_kernels()
    ctx.cynag, ctx.cynag_note = import_cynag()
    ctx.chainer, ctx.chainer_note = import_chainer()
    progress("compiling bench/native_probe.c")
    ctx.probe, ctx.probe_note = build_probe()
    ctx.threads = args.threads
    ctx.rounds = args.rounds or (5 if args.quick else 15)
    ctx.warmup = 2 if args.quick else 3
    ctx.min_sample_s = 0.005 if args.quick else 0.02
    ctx.cases = [CASES[i] for i in args.cases]
    ctx.copy_bw = {}
    ctx.ctypes_us = None
    ctx.par_speedup = {}
    ctx.fork_join = {}
    if ctx.probe is not None:
        progress("measuring plain copy bandwidth")
        ctx.copy_bw = measure_copy_bandwidth(ctx.probe, ctx.threads)
        ctx.ctypes_us = ctx.probe.call_overhead_us()
        ctx.par_speedup = ctx.probe.parallel_speedup(ctx.threads) if ctx.probe.openmp else {}
        ctx.fork_join = ctx.probe.fork_join_us(ctx.threads) if ctx.probe.openmp else {}

    header, machine = machine_header(ctx)
    print("\n".join(header))
    print(LEGEND)
    sys.stdout.flush()

    results = []
    headline = None
    for i, case in enumerate(ctx.cases):
        res = run_case(ctx, i, case)
        results.append(res)
        print_case(res)
        if res["headline"]:
            lines, headline = headline_summary(res, ctx)
            headline["lines"] = lines
        sys.stdout.flush()

    print()
    if headline is not None:
        print("\n".join(headline["lines"]))
    slow = []
    for res in results:
        labels = {r["key"]: r["variant"] for r in res["rows"]}
        slow += [(res["name"], r["variant"], r["threads"], labels[ck], x)
                 for r in res["rows"] if r["key"] in ("cynag_update", "cynag_kernel")
                 for ck, x in sorted(r["x_c_loops"].items()) if x > HEADLINE_TARGET]
    if slow:
        print("cynag rows more than %d%% slower than a C loop (same thread count):"
              % round(100 * (HEADLINE_TARGET - 1)))
        for name, label, t, clabel, x in slow:
            print("  %-22s %-15s %d thr: x%s the %s time" % (name, label, t, sig(x), clabel))
    print("NOTE: " + NOISE_NOTE)

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "header": header, "cases": results,
                       "headline": headline, "argv": sys.argv}, f, indent=1,
                      default=lambda o: o.item() if hasattr(o, "item") else str(o))
        progress("wrote %s" % args.json, final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
