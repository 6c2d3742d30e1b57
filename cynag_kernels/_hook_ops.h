/*
 * Per-element gradient operations of cynag's optimizer hooks, in plain C.
 *
 * Each operation is the one Chainer's hook runs with NumPy on an array of
 * at least one dimension, in the same order and with the same rounding: the
 * coefficient arrives already rounded to the array dtype (NumPy rounds a
 * Python scalar to the array's dtype), every product and sum is rounded to
 * the dtype, and the build disables contraction (-ffp-contract=off), so the
 * float32 and float64 results are bit-identical to NumPy's.  float16 values
 * are computed in float32 and rounded to float16 after every operation, as
 * NumPy's float16 loops do (float32 carries more than twice float16's
 * precision, so this equals correctly rounded float16 arithmetic).
 *
 * An operation program is an array of CYNAG_OP_WORDS doubles per operation:
 *     {kind, a, b, flags}
 *   CYNAG_OP_WEIGHT_DECAY  g = g + a * p                 (WeightDecay)
 *   CYNAG_OP_LASSO         g = g + a * sign(p)           (Lasso)
 *   CYNAG_OP_CLIP          g = min(max(g, a), b)         (GradientHardClipping;
 *                          flags bit 0: a lower bound, bit 1: an upper bound;
 *                          NumPy's clip: max(x, y) = isnan(x) ? x : (x > y ? x : y),
 *                          min(x, y) = isnan(x) ? x : (x < y ? x : y); for float16
 *                          NumPy keeps x on a tie: max = (isnan(x) || x >= y) ? x : y,
 *                          min = (isnan(x) || x <= y) ? x : y)
 *   CYNAG_OP_SCALE         g = g * a                     (GradientClipping, LARS)
 *   CYNAG_OP_ADD           g = g + p                     (GradientNoise: p is the noise)
 * sign(p) is NumPy's: 1, -1, +0 for either zero, NaN for NaN.
 *
 * The operations run block by block (CYNAG_OP_BLOCK elements), every
 * operation of the program over one block before the next block, so that a
 * program of several operations reads and writes memory once.
 */
#ifndef CYNAG_HOOK_OPS_H
#define CYNAG_HOOK_OPS_H

#include <stddef.h>
#include <stdint.h>
#include "_half.h"
#include "_nag_coef.h"

#define CYNAG_OP_WORDS 4
#define CYNAG_OP_WEIGHT_DECAY 1
#define CYNAG_OP_LASSO 2
#define CYNAG_OP_CLIP 3
#define CYNAG_OP_SCALE 4
#define CYNAG_OP_ADD 5
#define CYNAG_OP_BLOCK 2048

/*
 * The row of weight decay (g += rate * p) for a Python float rate and arrays
 * of NumPy type number type_num (float32 or float64): the C form of
 * cynag_kernels.hooks.op_row for a Python float, for native front ends.
 * Returns 0 where NumPy 1.x would compute in float64 (a finite rate of
 * magnitude 3.4e38 or more against float32) or for another type.
 */
static inline int cynag_weight_decay_row(int type_num, double rate, double *out)
{
    out[0] = CYNAG_OP_WEIGHT_DECAY;
    out[2] = 0.0;
    out[3] = 0.0;
    if (type_num == CYNAG_NPY_DOUBLE) {
        out[1] = rate;
        return 1;
    }
    if (type_num != CYNAG_NPY_FLOAT || !cynag_fits_float(rate))
        return 0;
    out[1] = (float)rate;
    return 1;
}

static inline float cynag_sign_f32(float x)
{
    return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : (x == x ? 0.0f : x));
}

static inline double cynag_sign_f64(double x)
{
    return x > 0.0 ? 1.0 : (x < 0.0 ? -1.0 : (x == x ? 0.0 : x));
}

#define CYNAG_NP_MAX(x, y) ((x) != (x) ? (x) : ((x) > (y) ? (x) : (y)))
#define CYNAG_NP_MIN(x, y) ((x) != (x) ? (x) : ((x) < (y) ? (x) : (y)))
/* NumPy's float16 clip keeps x on a tie (x == bound, e.g. -0.0 against +0.0). */
#define CYNAG_NP_MAX_H(x, y) (((x) != (x) || (x) >= (y)) ? (x) : (y))
#define CYNAG_NP_MIN_H(x, y) (((x) != (x) || (x) <= (y)) ? (x) : (y))

/* One operation over n elements of float32 or float64 (T); P may be NULL
   for CYNAG_OP_CLIP and CYNAG_OP_SCALE. */
#define CYNAG_DEFINE_OP(NAME, T, SIGN)                                              \
static inline void NAME(T* g, const T* p, ptrdiff_t n, const double* op)            \
{                                                                                   \
    ptrdiff_t i;                                                                    \
    const int kind = (int)op[0];                                                    \
    const T a = (T)op[1];                                                           \
    const T b = (T)op[2];                                                           \
    const int flags = (int)op[3];                                                   \
    if (kind == CYNAG_OP_WEIGHT_DECAY) {                                            \
        for (i = 0; i < n; ++i) { const T t = a * p[i]; g[i] = g[i] + t; }          \
    } else if (kind == CYNAG_OP_LASSO) {                                            \
        for (i = 0; i < n; ++i) { const T t = a * SIGN(p[i]); g[i] = g[i] + t; }    \
    } else if (kind == CYNAG_OP_CLIP) {                                             \
        if (flags & 1) { for (i = 0; i < n; ++i) g[i] = CYNAG_NP_MAX(g[i], a); }    \
        if (flags & 2) { for (i = 0; i < n; ++i) g[i] = CYNAG_NP_MIN(g[i], b); }    \
    } else if (kind == CYNAG_OP_SCALE) {                                            \
        for (i = 0; i < n; ++i) g[i] = g[i] * a;                                    \
    } else if (kind == CYNAG_OP_ADD) {                                              \
        for (i = 0; i < n; ++i) g[i] = g[i] + p[i];                                 \
    }                                                                               \
}

CYNAG_DEFINE_OP(cynag_op_f32, float, cynag_sign_f32)
CYNAG_DEFINE_OP(cynag_op_f64, double, cynag_sign_f64)

static inline float cynag_h(float x) { return cynag_half_to_float(cynag_float_to_half(x)); }

static inline void cynag_op_f16(uint16_t* g, const uint16_t* p, ptrdiff_t n, const double* op)
{
    ptrdiff_t i;
    const int kind = (int)op[0];
    const float a = (float)op[1];   /* already a float16 value (or float32: see hooks.py) */
    const float b = (float)op[2];
    const int flags = (int)op[3];
    for (i = 0; i < n; ++i) {
        float x = cynag_half_to_float(g[i]);
        if (kind == CYNAG_OP_WEIGHT_DECAY) {
            x = cynag_h(x + cynag_h(a * cynag_half_to_float(p[i])));
        } else if (kind == CYNAG_OP_LASSO) {
            x = cynag_h(x + cynag_h(a * cynag_sign_f32(cynag_half_to_float(p[i]))));
        } else if (kind == CYNAG_OP_CLIP) {
            if (flags & 1) x = CYNAG_NP_MAX_H(x, a);
            if (flags & 2) x = CYNAG_NP_MIN_H(x, b);
            x = cynag_h(x);
        } else if (kind == CYNAG_OP_SCALE) {
            x = cynag_h(x * a);
        } else if (kind == CYNAG_OP_ADD) {
            x = cynag_h(x + cynag_half_to_float(p[i]));
        }
        g[i] = cynag_float_to_half(x);
    }
}

/* A program of n_ops operations over n elements, block by block.
   type_num: 11 float32, 12 float64, 23 float16 (NumPy's numbers). */
static inline void cynag_ops_run(int type_num, void* g, const void* p, ptrdiff_t n,
                                 const double* ops, int n_ops)
{
    ptrdiff_t b0, m;
    int k;
    for (b0 = 0; b0 < n; b0 += CYNAG_OP_BLOCK) {
        m = n - b0 < CYNAG_OP_BLOCK ? n - b0 : CYNAG_OP_BLOCK;
        for (k = 0; k < n_ops; ++k) {
            const double* op = ops + CYNAG_OP_WORDS * k;
            if (type_num == 11) {
                cynag_op_f32((float*)g + b0, p ? (const float*)p + b0 : NULL, m, op);
            } else if (type_num == 12) {
                cynag_op_f64((double*)g + b0, p ? (const double*)p + b0 : NULL, m, op);
            } else {
                cynag_op_f16((uint16_t*)g + b0, p ? (const uint16_t*)p + b0 : NULL, m, op);
            }
        }
    }
}

#endif
