/*
 * Native reference points for bench/bench_update.py (not part of cynag).
 *
 * Compiled at benchmark time with the system C compiler, e.g.
 *
 *     cc -O3 -fopenmp -ffp-contract=off -shared -fPIC native_probe.c -o probe.so
 *
 * (without -fopenmp when the compiler cannot do OpenMP: the pragmas are then
 * ignored and every function runs on the calling thread), and loaded with
 * ctypes.  Every function takes raw pointers, an element count and a thread
 * count; with num_threads <= 1 the loop runs on the calling thread without
 * opening a parallel region, as cynag does.
 *
 * probe_triad_f32  memory-bandwidth probe with NesterovAG's traffic pattern:
 *                  reads three arrays and writes two of them in place
 *                      a[i] = a[i] + s * c[i];   b[i] = b[i] + s * c[i]
 *                  i.e. 5 accesses (20 bytes) per float32 element, the same
 *                  as one float32 NesterovAG step (read p, g, v; write p, v).
 *                  The benchmark runs it on float32 arrays of the same byte
 *                  size as the case's arrays.
 * probe_copy_f32   plain copy b[i] = a[i] (2 accesses), for the header only.
 * nag_f32/nag_f64  the NesterovAG step written by hand, same operation order
 *                  as Chainer's numpy sequence and cynag's kernel:
 *                      v = v * m - lr * g;   p = (p + mm * v) - c * g
 *                  (build with -ffp-contract=off so that no FMA is formed).
 * nag_f16          the same on _Float16 storage computed in float32, where
 *                  the compiler supports _Float16 (see probe_has_f16); the
 *                  conversions are whatever the compiler emits for the flags
 *                  above (no -mf16c: the compiler's portable conversions).
 * nag_f16_f16c     nag_f16 compiled for AVX2 + F16C (x86 GCC/Clang only; call
 *                  it only if probe_has_f16c() says the CPU has them).
 * probe_noop       nag_f32's signature, no work: the cost of one ctypes call.
 * probe_compute    compute-bound loop split over the threads: do the threads
 *                  really run at the same time on this machine?
 */
#include <stdint.h>
#include <stddef.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(_MSC_VER)
#define PROBE_EXPORT __declspec(dllexport)
#define RESTRICT __restrict
#define NOINLINE __declspec(noinline)
#else
#define PROBE_EXPORT __attribute__((visibility("default")))
#define RESTRICT __restrict__
#define NOINLINE __attribute__((noinline))
#endif

PROBE_EXPORT int probe_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

PROBE_EXPORT int probe_max_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* ------------------------------------------------------------------ */
/* Bandwidth probes                                                    */
/* ------------------------------------------------------------------ */
static inline void triad_span(float *RESTRICT a, float *RESTRICT b,
                              const float *RESTRICT c, int64_t lo, int64_t hi,
                              float s)
{
    for (int64_t i = lo; i < hi; i++) {
        float ci = c[i];
        a[i] = a[i] + s * ci;
        b[i] = b[i] + s * ci;
    }
}

PROBE_EXPORT void probe_triad_f32(float *RESTRICT a, float *RESTRICT b,
                                  const float *RESTRICT c, int64_t n, float s,
                                  int num_threads)
{
    if (num_threads <= 1) {
        triad_span(a, b, c, 0, n, s);
        return;
    }
    int64_t i;
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (i = 0; i < n; i++) {
        float ci = c[i];
        a[i] = a[i] + s * ci;
        b[i] = b[i] + s * ci;
    }
}

PROBE_EXPORT void probe_copy_f32(const float *RESTRICT a, float *RESTRICT b,
                                 int64_t n, int num_threads)
{
    int64_t i;
    if (num_threads <= 1) {
        for (i = 0; i < n; i++)
            b[i] = a[i];
        return;
    }
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (i = 0; i < n; i++)
        b[i] = a[i];
}

/* ------------------------------------------------------------------ */
/* NesterovAG, written by hand                                         */
/* ------------------------------------------------------------------ */
PROBE_EXPORT void nag_f32(float *RESTRICT p, const float *RESTRICT g,
                          float *RESTRICT v, int64_t n, float lr, float m,
                          float mm, float c, int num_threads)
{
    int64_t i;
    if (num_threads <= 1) {
        for (i = 0; i < n; i++) {
            float gi = g[i];
            float vi = v[i] * m - lr * gi;
            v[i] = vi;
            p[i] = (p[i] + mm * vi) - c * gi;
        }
        return;
    }
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (i = 0; i < n; i++) {
        float gi = g[i];
        float vi = v[i] * m - lr * gi;
        v[i] = vi;
        p[i] = (p[i] + mm * vi) - c * gi;
    }
}

PROBE_EXPORT void nag_f64(double *RESTRICT p, const double *RESTRICT g,
                          double *RESTRICT v, int64_t n, double lr, double m,
                          double mm, double c, int num_threads)
{
    int64_t i;
    if (num_threads <= 1) {
        for (i = 0; i < n; i++) {
            double gi = g[i];
            double vi = v[i] * m - lr * gi;
            v[i] = vi;
            p[i] = (p[i] + mm * vi) - c * gi;
        }
        return;
    }
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (i = 0; i < n; i++) {
        double gi = g[i];
        double vi = v[i] * m - lr * gi;
        v[i] = vi;
        p[i] = (p[i] + mm * vi) - c * gi;
    }
}

#if defined(__FLT16_MANT_DIG__) && !defined(_MSC_VER)
#define PROBE_HAS_F16 1
#define NAG16_BODY(i)                                          \
    do {                                                       \
        float gi = (float)g[i];                                \
        v[i] = (_Float16)((float)v[i] * m - lr * gi);          \
        float vi = (float)v[i];                                \
        p[i] = (_Float16)(((float)p[i] + mm * vi) - c * gi);   \
    } while (0)

PROBE_EXPORT void nag_f16(_Float16 *RESTRICT p, const _Float16 *RESTRICT g,
                          _Float16 *RESTRICT v, int64_t n, float lr, float m,
                          float mm, float c, int num_threads)
{
    int64_t i;
    if (num_threads <= 1) {
        for (i = 0; i < n; i++)
            NAG16_BODY(i);
        return;
    }
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (i = 0; i < n; i++)
        NAG16_BODY(i);
}

/* The same loop compiled for AVX2 + F16C (hardware float16 conversions), used
 * only when the CPU has them (probe_has_f16c): the best a hand-written C loop
 * does on this machine (cynag's kernel uses F16C at run time too). */
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define PROBE_HAS_F16C_BUILD 1
__attribute__((target("avx2,f16c")))
PROBE_EXPORT void nag_f16_f16c(_Float16 *RESTRICT p, const _Float16 *RESTRICT g,
                               _Float16 *RESTRICT v, int64_t n, float lr, float m,
                               float mm, float c, int num_threads)
{
    int64_t i;
    if (num_threads <= 1) {
        for (i = 0; i < n; i++)
            NAG16_BODY(i);
        return;
    }
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (i = 0; i < n; i++)
        NAG16_BODY(i);
}
#endif
#else
#define PROBE_HAS_F16 0
#endif

#ifndef PROBE_HAS_F16C_BUILD
#define PROBE_HAS_F16C_BUILD 0
#endif

PROBE_EXPORT int probe_has_f16c(void)
{
#if PROBE_HAS_F16C_BUILD
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

/* ------------------------------------------------------------------ */
/* Parallelism check: a compute-bound dependent chain, split over the  */
/* threads.  With num_threads = 2 it should take half the time of one  */
/* thread if both threads really run at once.                          */
/* ------------------------------------------------------------------ */
static NOINLINE double compute_chain(int64_t iters, double x, double a)
{
    for (int64_t i = 0; i < iters; i++)
        x = x * a + 1e-7;
    return x;
}

/* a: a multiplier known only at run time (pass e.g. 0.9999999). */
PROBE_EXPORT double probe_compute(int64_t iters, double a, int num_threads)
{
    double total = 0.0;
    if (num_threads <= 1)
        return compute_chain(iters, 1.5, a);
#ifdef _OPENMP
    #pragma omp parallel num_threads(num_threads) reduction(+:total)
    {
        int nt = omp_get_num_threads();
        total += compute_chain(iters / nt, 1.5 + omp_get_thread_num(), a);
    }
#else
    total = compute_chain(iters, 1.5, a);
#endif
    return total;
}

/* Same signature as nag_f32, does nothing: the cost of a ctypes call. */
PROBE_EXPORT void probe_noop(float *p, const float *g, float *v, int64_t n,
                             float lr, float m, float mm, float c, int num_threads)
{
    (void)p; (void)g; (void)v; (void)n; (void)lr; (void)m; (void)mm; (void)c;
    (void)num_threads;
}

PROBE_EXPORT int probe_has_f16(void)
{
    return PROBE_HAS_F16;
}
