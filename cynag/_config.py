"""show_config(): what this cynag build can do on this machine."""
import importlib.util
import platform
import sys

import numpy

import cynag_kernels
from cynag_kernels import threads


def _cupy_status():
    if importlib.util.find_spec("cupy") is None:
        return 'not installed (CPU only; pip install "cynag[cuda12]" or "cynag[cuda13]" for GPUs)'
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
        return "cupy %s, CUDA runtime %s, %d device(s)" % (
            cupy.__version__, cupy.cuda.runtime.runtimeGetVersion(), n)
    except Exception as e:  # a CuPy without a usable GPU
        return "cupy installed but no usable GPU (%s: %s)" % (type(e).__name__, e)


def _torch_status():
    """PyTorch for cynag.torch, from the package metadata (torch is not imported)."""
    if importlib.util.find_spec("torch") is None:
        return "not installed (cynag.torch needs it: pip install \"cynag[torch]\")"
    try:
        from importlib.metadata import version

        return "torch %s (cynag.torch.NesterovAG available)" % version("torch")
    except Exception:  # a torch without metadata (e.g. a source tree on sys.path)
        return "torch found (cynag.torch.NesterovAG available)"


def _multi_tensor_status():
    from cynag.optimizer import multi_tensor_default

    try:
        return multi_tensor_default()
    except ValueError as e:
        return str(e)


def config():
    """The information printed by :func:`show_config`, as a dict."""
    from cynag import __version__

    build = cynag_kernels.build_info()
    return {
        "cynag": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": numpy.__version__,
        "build": build,
        "threads": threads.thread_config(),
        "cupy": _cupy_status(),
        "torch": _torch_status(),
        "multi_tensor": _multi_tensor_status(),
    }


def show_config(file=None):
    """Print version, build (OpenMP on/off, compiler), thread settings, CuPy and PyTorch.

    The thread settings include how idle OpenMP threads wait and where that
    came from: cynag's default, the user's ``OMP_WAIT_POLICY`` /
    ``GOMP_SPINCOUNT``, or a libgomp another library loaded first.
    """
    c = config()
    b, t = c["build"], c["threads"]
    w = t["wait_policy"]
    lines = [
        "cynag %s" % c["cynag"],
        "  python:    %s on %s" % (c["python"], c["platform"]),
        "  numpy:     %s" % c["numpy"],
        "  compiler:  %s" % b["compiler"],
        "  OpenMP:    %s" % ("enabled (%s)" % b["openmp_flags"] if b["openmp"]
                             else "DISABLED: kernels run on one thread"),
        "  float16:   %s" % ("F16C conversion instructions" if b["f16c"]
                             else "portable conversions (no F16C on this CPU)"),
        "  threads:   %d (from %s)" % (t["num_threads"], t["source"]),
        "             CYNAG_NUM_THREADS=%s OMP_NUM_THREADS=%s omp_get_max_threads()=%d "
        "usable CPUs=%d" % (t["CYNAG_NUM_THREADS"], t["OMP_NUM_THREADS"],
                            t["omp_get_max_threads"], t["cpu_count"]),
        "  parallel threshold: %d elements (CYNAG_PARALLEL_THRESHOLD, "
        "cynag.set_parallel_threshold)" % t["parallel_threshold"],
        "  idle threads wait: %s (from %s)" % (w["policy"], w["origin"]),
        "  multi-tensor update: %s" % (
            "on (one native call per device/dtype group; CYNAG_MULTI_TENSOR=0 turns it off)"
            if c["multi_tensor"] is True else "off (CYNAG_MULTI_TENSOR=0)"
            if c["multi_tensor"] is False else c["multi_tensor"]),
        "  GPU:       %s" % c["cupy"],
        "  PyTorch:   %s" % c["torch"],
    ]
    print("\n".join(lines), file=file or sys.stdout)
