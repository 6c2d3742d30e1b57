"""GPU benchmark: cynag's CUDA update against Chainer's elementwise kernel and a copy probe.

Run on a machine with an NVIDIA GPU and CuPy (``bench/gpu_check.sh`` does
everything).  For each case it times, with CUDA events and interleaved rounds
(medians), one NesterovAG step by

* cynag: ``cynag_kernels.cuda.nesterov_ag_gpu`` (what ``update()`` runs);
* Chainer's formulation: the same ``cupy.ElementwiseKernel`` Chainer 7.8.1
  launches (``v = v * momentum - lr * grad; param += ...``);
* a bandwidth probe: a CuPy elementwise kernel reading 3 arrays and writing
  2 (the same bytes as one step),

and prints time, effective GB/s and ratios.  Exits 0 with a message when no
GPU is usable.
"""
import argparse
import json
import sys

import numpy


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
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
    props = cupy.cuda.runtime.getDeviceProperties(0)
    print("device: %s, %d SMs, CuPy %s, CUDA runtime %d"
          % (props["name"].decode(), props["multiProcessorCount"], cupy.__version__,
             cupy.cuda.runtime.runtimeGetVersion()))
    results = []
    for dtype, n in ((numpy.float32, 1 << 24), (numpy.float16, 1 << 24),
                     (numpy.float64, 1 << 23), (numpy.float32, 1 << 12)):
        rng = cupy.random.default_rng(0)
        p = rng.standard_normal(n, dtype=numpy.float32).astype(dtype)
        g = rng.standard_normal(n, dtype=numpy.float32).astype(dtype)
        v = cupy.zeros(n, dtype)
        lr, m = 0.01, 0.9
        variants = {
            "cynag": lambda: launcher.nesterov_ag_gpu(p, g, v, lr, m),
            "chainer kernel": lambda: chainer_kernel(g, dtype(lr), dtype(m), p, v),
            "probe 3R+2W": lambda: probe(g, p, v, p, v),
        }
        times = {k: [] for k in variants}
        for fn in variants.values():  # warm up (compiles)
            fn()
        cupy.cuda.Device().synchronize()
        for r in range(args.rounds):
            for name, fn in (list(variants.items())[r % 3:] + list(variants.items())[:r % 3]):
                start, stop = cupy.cuda.Event(), cupy.cuda.Event()
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                times[name].append(cupy.cuda.get_elapsed_time(start, stop))
        nbytes = 5 * n * numpy.dtype(dtype).itemsize
        med = {k: float(numpy.median(t)) for k, t in times.items()}
        print("\n%s x %d (%.1f MiB moved per step), medians of %d rounds"
              % (numpy.dtype(dtype).name, n, nbytes / 2 ** 20, args.rounds))
        for name, ms in med.items():
            print("  %-16s %9.4f ms %8.1f GB/s   x cynag %.2f"
                  % (name, ms, nbytes / ms / 1e6, ms / med["cynag"]))
        results.append({"dtype": numpy.dtype(dtype).name, "n": n, "median_ms": med})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
