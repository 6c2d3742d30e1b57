"""GPU benchmark: cynag's CUDA update against Chainer's elementwise kernel and a copy probe.

Run on a machine with an NVIDIA GPU and CuPy (``bench/gpu_check.sh`` does
everything).  Two parts, each timed with interleaved rounds (medians):

**One tensor** (float32 2**24, float16 2**24, float64 2**23, float32 2**12):
one NesterovAG step by

* cynag: ``cynag_kernels.cuda.nesterov_ag_gpu`` (the per-parameter launch);
* Chainer's formulation: the same ``cupy.ElementwiseKernel`` Chainer 7.8.1
  launches (``v = v * momentum - lr * grad; param += ...``);
* a bandwidth probe: a CuPy elementwise kernel reading 3 arrays and writing
  2 (the same bytes as one step),

timed with CUDA events.

**Many tensors** (2000 x 64, 1000 x 1000 and ResNet-50's 161 parameter
shapes, 25,557,032 elements, from ``cynag.bench.RESNET50_SHAPES``): one
optimizer step by

* ``cynag update()``: ``NesterovAG.update()`` with the multi-tensor path (one
  launch per device and dtype);
* ``cynag per-parameter``: the same after ``use_multi_tensor(False)`` (one
  launch per parameter, Chainer's loop);
* ``cynag GPUTable.run()``: the multi-tensor launch alone (the floor of
  ``update()``);
* ``chainer kernel xN``: Chainer's elementwise kernel launched once per
  tensor, without Chainer's Python around it;
* ``chainer update()``: Chainer's own optimizer on CuPy parameters, when
  ``import chainer`` works and Chainer can use this CuPy;
* ``probe 3R+2W``: the bandwidth probe over one array of all the elements
  (one launch: what the hardware allows);

each timed as wall-clock time of the call plus a device synchronization
(what a training loop pays) and as GPU time between CUDA events.  The
kernel launches of one ``update()`` are counted (with and without the
multi-tensor path).

Prints time, effective GB/s and ratios, and writes ``--json``.  Exits 0 with
a message when no GPU is usable: a benchmark, not a test.
"""
import argparse
import json
import sys
import time

import numpy

LR, MOMENTUM = 0.01, 0.9
#: Memory accesses per element of one step: read param, grad, v; write param, v.
ACCESSES = 5
SINGLE_CASES = ((numpy.float32, 1 << 24), (numpy.float16, 1 << 24),
                (numpy.float64, 1 << 23), (numpy.float32, 1 << 12))
MULTI_CASE_NAMES = ("2000x64", "1000x1000", "resnet50")


def multi_cases():
    """name -> (description, shapes) of the many-tensor cases."""
    try:
        from cynag.bench import RESNET50_SHAPES
    except ImportError:  # pragma: no cover - an older cynag
        RESNET50_SHAPES = None
    cases = {"2000x64": ("2000 tensors of 64", [(64,)] * 2000),
             "1000x1000": ("1000 tensors of 1000", [(1000,)] * 1000)}
    if RESNET50_SHAPES is not None:
        n = sum(int(numpy.prod(s)) for s in RESNET50_SHAPES)
        cases["resnet50"] = ("ResNet-50's %d parameters (%s elements)"
                             % (len(RESNET50_SHAPES), format(n, ",")), RESNET50_SHAPES)
    return cases


def interleaved(cupy, variants, rounds):
    """{name: (wall ms list, GPU ms list)}: each round runs every variant once, rotated."""
    items = list(variants.items())
    times = {k: ([], []) for k in variants}
    device = cupy.cuda.Device()
    for _, fn in items:  # warm up (compiles, builds plans)
        fn()
    device.synchronize()
    for r in range(rounds):
        k = r % len(items)
        for name, fn in items[k:] + items[:k]:
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            device.synchronize()
            t0 = time.perf_counter()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            t1 = time.perf_counter()
            times[name][0].append((t1 - t0) * 1e3)
            times[name][1].append(cupy.cuda.get_elapsed_time(start, stop))
    return times


def count_launches(launcher, opt):
    """Kernel launches of one ``opt.update()`` (the plan is rebuilt around it)."""
    launches = []
    original = launcher._kernel

    def counting_kernel(cupy, device_id, dtype, names=launcher.KERNEL_NAMES):
        kernel = original(cupy, device_id, dtype, names)

        def launch(*args, **kwargs):
            launches.append(names[dtype])
            return kernel(*args, **kwargs)

        return launch

    flag = getattr(opt, "_use_multi_tensor", True)
    launcher._kernel = counting_kernel
    try:
        opt.use_multi_tensor(flag)  # drop the plan: its tables look the kernel up again
        opt.update()
    finally:
        launcher._kernel = original
        opt.use_multi_tensor(flag)
    return len(launches)


def _chainer_optimizer(cupy, shapes, dtype, seed):
    """(update function, None) with Chainer on CuPy, or (None, why not)."""
    try:
        import chainer
        from chainer.backends import cuda as chainer_cuda

        if not chainer_cuda.available:
            return None, "chainer.backends.cuda is not available with this CuPy"
        link = chainer.Link()
        rng = cupy.random.default_rng(seed)
        with link.init_scope():
            for i, s in enumerate(shapes):
                setattr(link, "p%d" % i, chainer.Parameter(
                    rng.standard_normal(s, dtype=numpy.float32).astype(dtype)))
        for p in link.params():
            p.grad = rng.standard_normal(p.shape, dtype=numpy.float32).astype(dtype)
        opt = chainer.optimizers.NesterovAG(lr=LR, momentum=MOMENTUM)
        opt.setup(link)
        opt.update()
        return opt.update, None
    except Exception as e:  # not importable, or incompatible with this CuPy
        return None, "%s: %s" % (type(e).__name__, str(e).splitlines()[0] if str(e) else "")


def multi_case(cupy, launcher, kernels, name, desc, shapes, dtype, rounds, with_chainer):
    import cynag

    dtype = numpy.dtype(dtype)
    rng = cupy.random.default_rng(0)

    def new_link():
        link = cynag.Link()
        with link.init_scope():
            for i, s in enumerate(shapes):
                setattr(link, "p%d" % i, cynag.Parameter(
                    rng.standard_normal(s, dtype=numpy.float32).astype(dtype)))
        for p in link.params():
            p.grad = rng.standard_normal(p.shape, dtype=numpy.float32).astype(dtype)
        return link

    link_multi, link_single, link_chainer_kernel = new_link(), new_link(), new_link()
    opt_multi = cynag.optimizers.NesterovAG(lr=LR, momentum=MOMENTUM).setup(link_multi)
    opt_single = cynag.optimizers.NesterovAG(lr=LR, momentum=MOMENTUM).setup(link_single)
    opt_single.use_multi_tensor(False)
    opt_multi.update()  # creates the state (per parameter), then the plan
    opt_single.update()
    launches = {"cynag update()": count_launches(launcher, opt_multi),
                "cynag per-parameter": count_launches(launcher, opt_single)}
    params = list(link_multi.params())
    table = launcher.GPUTable([p.array for p in params], [p.grad for p in params],
                              [p.update_rule.state["v"] for p in params], LR, MOMENTUM)
    chainer_kernel, probe = kernels
    ck = [(p.array, p.grad, cupy.zeros_like(p.array)) for p in link_chainer_kernel.params()]
    lr_d, m_d = dtype.type(LR), dtype.type(MOMENTUM)

    def chainer_kernel_loop():
        for p, g, v in ck:
            chainer_kernel(g, lr_d, m_d, p, v)

    total = sum(int(numpy.prod(s)) for s in shapes)
    flat = [cupy.zeros(total, dtype) for _ in range(3)]
    variants = {
        "cynag update()": opt_multi.update,
        "cynag per-parameter": opt_single.update,
        "cynag GPUTable.run()": table.run,
        "chainer kernel xN": chainer_kernel_loop,
        "probe 3R+2W": lambda: probe(flat[0], flat[1], flat[2], flat[1], flat[2]),
    }
    notes = []
    if with_chainer:
        fn, why = _chainer_optimizer(cupy, shapes, dtype, 1)
        if fn is None:
            notes.append("chainer update() skipped: %s" % why)
        else:
            variants["chainer update()"] = fn
    times = interleaved(cupy, variants, rounds)
    nbytes = ACCESSES * total * dtype.itemsize
    wall = {k: float(numpy.median(t[0])) for k, t in times.items()}
    gpu = {k: float(numpy.median(t[1])) for k, t in times.items()}
    print("\n%s, %s: %d tensors, %s elements (%.1f MiB moved per step), medians of %d rounds"
          % (desc, dtype.name, len(shapes), format(total, ","), nbytes / 2 ** 20, rounds))
    print("  %-22s %10s %10s %9s %12s %9s" % ("", "wall ms", "GPU ms", "GB/s", "x cynag", "launches"))
    ref = wall["cynag update()"]
    for k in variants:
        print("  %-22s %10.4f %10.4f %9.1f %12.2f %9s"
              % (k, wall[k], gpu[k], nbytes / wall[k] / 1e6, wall[k] / ref,
                 launches.get(k, "")))
    for note in notes:
        print("  note: %s" % note)
    return {"case": name, "dtype": dtype.name, "n_tensors": len(shapes), "n_elements": total,
            "median_wall_ms": wall, "median_gpu_ms": gpu, "launches_per_update": launches,
            "notes": notes}


def single_case(cupy, launcher, kernels, dtype, n, rounds):
    chainer_kernel, probe = kernels
    rng = cupy.random.default_rng(0)
    p = rng.standard_normal(n, dtype=numpy.float32).astype(dtype)
    g = rng.standard_normal(n, dtype=numpy.float32).astype(dtype)
    v = cupy.zeros(n, dtype)
    variants = {
        "cynag": lambda: launcher.nesterov_ag_gpu(p, g, v, LR, MOMENTUM),
        "chainer kernel": lambda: chainer_kernel(g, dtype(LR), dtype(MOMENTUM), p, v),
        "probe 3R+2W": lambda: probe(g, p, v, p, v),
    }
    times = interleaved(cupy, variants, rounds)
    nbytes = ACCESSES * n * numpy.dtype(dtype).itemsize
    med = {k: float(numpy.median(t[1])) for k, t in times.items()}
    print("\n%s x %d (%.1f MiB moved per step), GPU time, medians of %d rounds"
          % (numpy.dtype(dtype).name, n, nbytes / 2 ** 20, rounds))
    for name, ms in med.items():
        print("  %-16s %9.4f ms %8.1f GB/s   x cynag %.2f"
              % (name, ms, nbytes / ms / 1e6, ms / med["cynag"]))
    return {"dtype": numpy.dtype(dtype).name, "n": n, "median_ms": med}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--cases", default="single," + ",".join(MULTI_CASE_NAMES),
                    help="comma-separated: single, %s (default: all)"
                    % ", ".join(MULTI_CASE_NAMES))
    ap.add_argument("--dtype", default="float32", help="dtype of the many-tensor cases")
    ap.add_argument("--no-chainer", action="store_true", help="skip chainer update()")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(wanted) - {"single"} - set(MULTI_CASE_NAMES)
    if unknown:
        ap.error("unknown cases: %s" % ", ".join(sorted(unknown)))
    try:
        import cupy

        n_dev = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no CuPy, no driver, no device
        print("bench_gpu: no usable GPU (%s: %s); nothing measured" % (type(e).__name__, e))
        return 0
    if n_dev < 1:
        print("bench_gpu: no CUDA device; nothing measured")
        return 0
    from cynag_kernels import cuda as launcher

    chainer_kernel = cupy.ElementwiseKernel(
        "T grad, T lr, T momentum", "T param, T v",
        "v = v * momentum - lr * grad;"
        "param += momentum * momentum * v - (1 + momentum) * lr * grad;",
        "nesterov_ag")
    probe = cupy.ElementwiseKernel(
        "T a, T b, T c", "T x, T y", "x = a + c; y = b + c;", "probe_3r2w")
    kernels = (chainer_kernel, probe)
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"]
    print("device: %s, %d SMs, CuPy %s, CUDA runtime %d"
          % (name.decode() if isinstance(name, bytes) else name, props["multiProcessorCount"],
             cupy.__version__, cupy.cuda.runtime.runtimeGetVersion()))
    results = {"single": [], "multi": []}
    if "single" in wanted:
        for dtype, n in SINGLE_CASES:
            results["single"].append(single_case(cupy, launcher, kernels, dtype, n, args.rounds))
    cases = multi_cases()
    for case in MULTI_CASE_NAMES:
        if case not in wanted:
            continue
        if case not in cases:
            print("\n%s: skipped (cynag.bench has no RESNET50_SHAPES)" % case)
            continue
        desc, shapes = cases[case]
        results["multi"].append(multi_case(cupy, launcher, kernels, case, desc, shapes,
                                           args.dtype, args.rounds, not args.no_chainer))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
