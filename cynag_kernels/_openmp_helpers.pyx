"""What the native build can do: OpenMP on or off, compiler, thread counts."""
from cynag_kernels._openmp cimport (
    CYNAG_OPENMP_ENABLED, CYNAG_COMPILER, CYNAG_OPENMP_FLAGS,
    omp_get_max_threads, omp_get_num_procs,
)


def openmp_enabled():
    """True if the kernels were compiled with OpenMP."""
    return bool(CYNAG_OPENMP_ENABLED)


def omp_max_threads():
    """``omp_get_max_threads()``: reflects OMP_NUM_THREADS and threadpoolctl."""
    return omp_get_max_threads()


def omp_num_procs():
    """``omp_get_num_procs()``: processors available to the OpenMP runtime."""
    return omp_get_num_procs()


def build_info():
    """A dict describing how the extensions were compiled."""
    return {
        "openmp": bool(CYNAG_OPENMP_ENABLED),
        "compiler": CYNAG_COMPILER.decode("utf-8", "replace"),
        "openmp_flags": CYNAG_OPENMP_FLAGS.decode("utf-8", "replace"),
    }
