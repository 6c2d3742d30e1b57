/*
 * Reference loops for the benchmark (cynag.bench), in plain C.
 *
 * Every entry point walks a list of tensors described by tables of addresses
 * (int64, read once outside the timed region) and an offsets table
 * (n_tensors + 1 entries: offsets[0] = 0, offsets[n_tensors] = total
 * elements), and takes a thread count:
 *
 * - num_threads <= 1: the calling thread walks every tensor; no parallel
 *   region is opened;
 * - otherwise ONE parallel region covers all the tensors: the concatenated
 *   elements are split into one balanced range per thread, ranges cross tensor
 *   boundaries, and each split point inside a tensor is moved up to the start
 *   of a 64-byte line of its first written array, so that two threads do not
 *   write the same cache line of it.
 *
 * cynag_probe_run(table, op, coef, num_threads) runs one of
 *
 * CYNAG_PROBE_TRIAD_*  bandwidth probe with NesterovAG's traffic, per element
 *                          a[i] += s * c[i];  b[i] += s * c[i]
 *                      (reads 3 arrays and writes 2 in place: 5 accesses);
 * CYNAG_PROBE_NAG_*    NesterovAG written by hand, in the operation order of
 *                      Chainer's numpy sequence and of cynag's kernel,
 *                          v = v * m - lr * g;  p = (p + mm * v) - c * g
 *                      with coefficients already rounded to the array dtype.
 *                      Bit-identical to cynag when compiled without
 *                      floating-point contraction (-ffp-contract=off).
 */
#ifndef CYNAG_PROBE_H
#define CYNAG_PROBE_H

#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(_MSC_VER)
#define CYNAG_PROBE_RESTRICT __restrict
#else
#define CYNAG_PROBE_RESTRICT __restrict__
#endif

/* Bytes that two threads must never share at a split point. */
#define CYNAG_PROBE_LINE 64

/* ------------------------------------------------------------------ */
/* Splitting the concatenated elements between threads                 */
/* ------------------------------------------------------------------ */

/* Index k of the tensor holding global element pos: offsets[k] <= pos < offsets[k + 1]. */
static int64_t cynag_probe_find(const int64_t *offsets, int64_t n_tensors, int64_t pos)
{
    int64_t lo = 0, hi = n_tensors;   /* invariant: offsets[lo] <= pos < offsets[hi] */
    while (hi - lo > 1) {
        int64_t mid = lo + (hi - lo) / 2;
        if (offsets[mid] <= pos)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

/* ------------------------------------------------------------------ */
/* Per-span loops (one contiguous piece of one tensor)                 */
/* ------------------------------------------------------------------ */
static inline void cynag_probe_triad_span_f32(float *CYNAG_PROBE_RESTRICT a,
                                              float *CYNAG_PROBE_RESTRICT b,
                                              const float *CYNAG_PROBE_RESTRICT c,
                                              int64_t n, float s)
{
    for (int64_t i = 0; i < n; i++) {
        float ci = c[i];
        a[i] = a[i] + s * ci;
        b[i] = b[i] + s * ci;
    }
}

static inline void cynag_probe_triad_span_f64(double *CYNAG_PROBE_RESTRICT a,
                                              double *CYNAG_PROBE_RESTRICT b,
                                              const double *CYNAG_PROBE_RESTRICT c,
                                              int64_t n, double s)
{
    for (int64_t i = 0; i < n; i++) {
        double ci = c[i];
        a[i] = a[i] + s * ci;
        b[i] = b[i] + s * ci;
    }
}

static inline void cynag_probe_nag_span_f32(float *CYNAG_PROBE_RESTRICT p,
                                            const float *CYNAG_PROBE_RESTRICT g,
                                            float *CYNAG_PROBE_RESTRICT v, int64_t n,
                                            float lr, float m, float mm, float c)
{
    for (int64_t i = 0; i < n; i++) {
        float gi = g[i];
        float vi = v[i] * m - lr * gi;
        v[i] = vi;
        p[i] = (p[i] + mm * vi) - c * gi;
    }
}

static inline void cynag_probe_nag_span_f64(double *CYNAG_PROBE_RESTRICT p,
                                            const double *CYNAG_PROBE_RESTRICT g,
                                            double *CYNAG_PROBE_RESTRICT v, int64_t n,
                                            double lr, double m, double mm, double c)
{
    for (int64_t i = 0; i < n; i++) {
        double gi = g[i];
        double vi = v[i] * m - lr * gi;
        v[i] = vi;
        p[i] = (p[i] + mm * vi) - c * gi;
    }
}

/* ------------------------------------------------------------------ */
/* Global element ranges [lo, hi), crossing tensor boundaries          */
/* ------------------------------------------------------------------ */
typedef struct {
    const int64_t *x0, *x1, *x2;   /* addresses of the three arrays of each tensor */
    const int64_t *offsets;        /* n_tensors + 1 entries */
    int64_t n_tensors, total;
} cynag_probe_table;

/* Split point j of `parts` equal parts of the table's elements, moved up to
 * the next element of its tensor's first array (x0) that starts a 64-byte
 * line (or to the tensor's end).  Non-decreasing in j; 0 for j = 0 and
 * total for j = parts. */
static int64_t cynag_probe_split(const cynag_probe_table *t, int64_t j, int64_t parts,
                                 int64_t itemsize)
{
    int64_t pos, k, local, size, mis;
    if (j <= 0)
        return 0;
    if (j >= parts)
        return t->total;
    pos = (int64_t)(((double)t->total * (double)j) / (double)parts);
    if (pos >= t->total)
        return t->total;
    k = cynag_probe_find(t->offsets, t->n_tensors, pos);
    local = pos - t->offsets[k];
    size = t->offsets[k + 1] - t->offsets[k];
    mis = (int64_t)(((uint64_t)t->x0[k] + (uint64_t)(local * itemsize)) % CYNAG_PROBE_LINE);
    if (mis != 0 && (CYNAG_PROBE_LINE - mis) % itemsize == 0)
        local += (CYNAG_PROBE_LINE - mis) / itemsize;
    return t->offsets[k] + (local < size ? local : size);
}

enum {
    CYNAG_PROBE_TRIAD_F32 = 0,     /* x0 = a, x1 = b, x2 = c; coef[0] = s */
    CYNAG_PROBE_TRIAD_F64 = 1,
    CYNAG_PROBE_NAG_F32 = 2,       /* x0 = p, x1 = g, x2 = v; coef = lr, m, mm, c */
    CYNAG_PROBE_NAG_F64 = 3
};

/* Bytes per element of an operation's dtype. */
static int64_t cynag_probe_itemsize(int op)
{
    return (op == CYNAG_PROBE_TRIAD_F64 || op == CYNAG_PROBE_NAG_F64) ? 8 : 4;
}

/* Run operation `op` on global elements [lo, hi).  The coefficients of a
 * float32 operation are float32 values held in doubles (converted exactly). */
static void cynag_probe_range(const cynag_probe_table *t, int op, const double *coef,
                              int64_t lo, int64_t hi)
{
    int64_t k;
    if (lo >= hi)
        return;
    k = cynag_probe_find(t->offsets, t->n_tensors, lo);
    while (lo < hi && k < t->n_tensors) {
        int64_t base = t->offsets[k];
        int64_t end = t->offsets[k + 1] < hi ? t->offsets[k + 1] : hi;
        int64_t s = lo - base, n = end - lo;
        if (n > 0) {
            switch (op) {
            case CYNAG_PROBE_TRIAD_F32:
                cynag_probe_triad_span_f32((float *)(intptr_t)t->x0[k] + s,
                                           (float *)(intptr_t)t->x1[k] + s,
                                           (const float *)(intptr_t)t->x2[k] + s, n,
                                           (float)coef[0]);
                break;
            case CYNAG_PROBE_TRIAD_F64:
                cynag_probe_triad_span_f64((double *)(intptr_t)t->x0[k] + s,
                                           (double *)(intptr_t)t->x1[k] + s,
                                           (const double *)(intptr_t)t->x2[k] + s, n,
                                           coef[0]);
                break;
            case CYNAG_PROBE_NAG_F32:
                cynag_probe_nag_span_f32((float *)(intptr_t)t->x0[k] + s,
                                         (const float *)(intptr_t)t->x1[k] + s,
                                         (float *)(intptr_t)t->x2[k] + s, n,
                                         (float)coef[0], (float)coef[1], (float)coef[2],
                                         (float)coef[3]);
                break;
            case CYNAG_PROBE_NAG_F64:
                cynag_probe_nag_span_f64((double *)(intptr_t)t->x0[k] + s,
                                         (const double *)(intptr_t)t->x1[k] + s,
                                         (double *)(intptr_t)t->x2[k] + s, n,
                                         coef[0], coef[1], coef[2], coef[3]);
                break;
            default:
                return;
            }
        }
        lo = end;
        k++;
    }
}

/* ------------------------------------------------------------------ */
/* Entry point: serial, or one parallel region for all tensors         */
/* ------------------------------------------------------------------ */
static void cynag_probe_run(const cynag_probe_table *t, int op, const double *coef,
                            int num_threads)
{
    if (t->total <= 0)
        return;
    if (num_threads <= 1) {
        cynag_probe_range(t, op, coef, 0, t->total);
        return;
    }
#ifdef _OPENMP
    #pragma omp parallel num_threads(num_threads)
    {
        int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
        int64_t itemsize = cynag_probe_itemsize(op);
        int64_t lo = cynag_probe_split(t, tid, nt, itemsize);
        int64_t hi = cynag_probe_split(t, tid + 1, nt, itemsize);
        cynag_probe_range(t, op, coef, lo, hi);
    }
#else
    cynag_probe_range(t, op, coef, 0, t->total);
#endif
}

/* An empty parallel region: what waking and joining the thread team costs. */
static void cynag_probe_empty_region(int num_threads)
{
#ifdef _OPENMP
    if (num_threads > 1) {
        #pragma omp parallel num_threads(num_threads)
        {
            (void)0;
        }
    }
#else
    (void)num_threads;
#endif
}

static int cynag_probe_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

#endif /* CYNAG_PROBE_H */
