"""Native kernels of cynag: arrays and scalars in, nothing else.

This package never imports :mod:`cynag`; it can be used, tested and
benchmarked on its own.

* :func:`nesterov_ag_cpu` -- fused NesterovAG step on NumPy arrays
  (Cython, typed memoryviews, OpenMP ``prange``).
* :func:`nesterov_ag_coefficients` -- the scalar coefficients, rounded as
  Chainer rounds them; shared by the kernels and the tests.
* :mod:`cynag_kernels.threads` -- thread count and parallel threshold.
"""
# Before any extension loads libgomp: the wait of idle OpenMP threads is read
# once, at load (see cynag_kernels/_wait_policy.py).
from cynag_kernels import _wait_policy

_wait_policy.before_load()
try:
    from cynag_kernels import _nesterov_cpu
    from cynag_kernels._openmp_helpers import build_info as _build_info
    from cynag_kernels._openmp_helpers import openmp_enabled
    from cynag_kernels._openmp_helpers import omp_max_threads as _omp_max_threads

    _omp_max_threads()  # initializes a runtime that reads its settings lazily (LLVM's)
finally:
    _wait_policy.after_load()
from cynag_kernels.nesterov import (
    REAL_SCALAR_TYPES,
    SUPPORTED_DTYPES,
    check_nesterov_ag_arrays,
    check_real_scalar,
    compute_dtype,
    nesterov_ag_coefficients,
    nesterov_ag_cpu,
    nesterov_ag_dense_ok,
    nesterov_ag_mixed,
)
from cynag_kernels.threads import (
    DEFAULT_PARALLEL_THRESHOLD,
    get_num_threads,
    get_parallel_threshold,
    set_num_threads,
    set_parallel_threshold,
)

def build_info():
    """How the extensions were built and what this CPU lets them use."""
    info = _build_info()
    info["f16c"] = _nesterov_cpu.f16c_enabled()
    return info


__all__ = [
    "REAL_SCALAR_TYPES", "SUPPORTED_DTYPES", "DEFAULT_PARALLEL_THRESHOLD", "build_info", "openmp_enabled",
    "check_nesterov_ag_arrays", "check_real_scalar", "compute_dtype", "nesterov_ag_coefficients",
    "nesterov_ag_cpu", "nesterov_ag_mixed",
    "nesterov_ag_dense_ok", "get_num_threads", "set_num_threads", "get_parallel_threshold", "set_parallel_threshold",
]
