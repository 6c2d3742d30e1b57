/*
 * Software prefetch hints of the multi-tensor kernel.  A model with
 * thousands of small parameters spreads its arrays over memory no hardware
 * prefetcher can follow: one tensor ends before a stream is detected.
 * Asking for the next tensors' first lines while the current one is worked
 * on lets the memory system fetch them in parallel.  A hint never faults
 * and never changes a value; without compiler support it is a no-op.
 */
#ifndef CYNAG_PREFETCH_H
#define CYNAG_PREFETCH_H

#if defined(__GNUC__) || defined(__clang__)
#define CYNAG_PREFETCH_R(addr) __builtin_prefetch((const void *)(addr), 0, 3)
#define CYNAG_PREFETCH_W(addr) __builtin_prefetch((const void *)(addr), 1, 3)
#elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
#include <xmmintrin.h>
#define CYNAG_PREFETCH_R(addr) _mm_prefetch((const char *)(addr), _MM_HINT_T0)
#define CYNAG_PREFETCH_W(addr) _mm_prefetch((const char *)(addr), _MM_HINT_T0)
#else
#define CYNAG_PREFETCH_R(addr) ((void)(addr))
#define CYNAG_PREFETCH_W(addr) ((void)(addr))
#endif

/* The first lines (up to 256 bytes) of a tensor's parameter, gradient and v. */
static inline void cynag_prefetch_tensor(const char *p, const char *g, const char *v,
                                         long long nbytes)
{
    long long off;
    if (nbytes > 256)
        nbytes = 256;
    for (off = 0; off < nbytes; off += 64) {
        CYNAG_PREFETCH_W(p + off);
        CYNAG_PREFETCH_R(g + off);
        CYNAG_PREFETCH_W(v + off);
    }
}

#endif
