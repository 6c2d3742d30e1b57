# OpenMP in one place.  Every other module cimports OpenMP from here only, so
# that a build without OpenMP compiles the same sources against no-op stand-ins.
cdef extern from *:
    """
    #ifdef _OPENMP
        #include <omp.h>
        #define CYNAG_OPENMP_ENABLED 1
    #else
        #define CYNAG_OPENMP_ENABLED 0
        static int omp_get_max_threads(void) { return 1; }
        static int omp_get_thread_num(void) { return 0; }
        static int omp_get_num_procs(void) { return 1; }
    #endif
    #ifndef CYNAG_COMPILER
        #define CYNAG_COMPILER "unknown"
    #endif
    #ifndef CYNAG_OPENMP_FLAGS
        #define CYNAG_OPENMP_FLAGS ""
    #endif
    """
    bint CYNAG_OPENMP_ENABLED
    const char* CYNAG_COMPILER
    const char* CYNAG_OPENMP_FLAGS
    int omp_get_max_threads() noexcept nogil
    int omp_get_thread_num() noexcept nogil
    int omp_get_num_procs() noexcept nogil
