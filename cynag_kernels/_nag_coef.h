/*
 * NesterovAG's CPU coefficients for the native paths (the Python ones use
 * cynag_kernels.nesterov_ag_coefficients, which the tests hold equal to this).
 *
 * Chainer's numpy sequence  v *= m; v -= lr * g; p += m * m * v;
 * p -= (1 + m) * lr * g  evaluates  mm = m * m  and  c = (1 + m) * lr  on
 * Python floats (double precision) and NumPy rounds each scalar once to the
 * array's dtype when it meets the array.  float16 arrays compute in float32
 * registers (cynag's float16 rule), so their coefficients are float32 too.
 *
 * NumPy 1.x keeps a finite scalar of magnitude 3.4e38 or more in float64
 * (value-based casting): the kernels cannot reproduce that with one rounding,
 * so such coefficients are refused (the caller takes the general path).  The
 * loss scale divides the gradient in the array's dtype (float16: rounded to
 * float16, then computed in float32); a float16 divisor of magnitude 65000 or
 * more is rounded to float32 by NumPy 1.x, also refused here.
 *
 * Used by cynag_kernels._nesterov_cpu (single-tensor fast path and the
 * multi-tensor coefficient table) and by cynag._step (the optimizer's step
 * table), so that they cannot disagree.
 */
#ifndef CYNAG_NAG_COEF_H
#define CYNAG_NAG_COEF_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#include "_half.h"

/* Columns of one coefficient row. */
#define CYNAG_COEF_LR 0
#define CYNAG_COEF_M 1
#define CYNAG_COEF_MM 2
#define CYNAG_COEF_C 3
#define CYNAG_COEF_LS 4      /* loss scale, rounded to the compute type */
#define CYNAG_COEF_HAS_LS 5  /* nonzero: divide the gradient by the loss scale first */
#define CYNAG_N_COEF 6

/* NumPy type numbers (numpy/ndarraytypes.h). */
#define CYNAG_NPY_FLOAT 11
#define CYNAG_NPY_DOUBLE 12
#define CYNAG_NPY_HALF 23

/*
 * d rounded to float with round-to-odd: rounding that float to float16
 * (to nearest even) then gives d rounded straight to float16, as NumPy
 * rounds a double (float has 13 more significand bits than float16).
 */
static inline float cynag_float_round_to_odd(double d)
{
    float f = (float)d;
    uint32_t u;
    if (d != d || (double)f == d)
        return f;
    if (fabs((double)f) > fabs(d))
        f = nextafterf(f, 0.0f);  /* truncate toward zero */
    memcpy(&u, &f, 4);
    u |= 1u;  /* inexact: make it odd */
    memcpy(&f, &u, 4);
    return f;
}

static inline int cynag_fits_float(double x)
{
    /* False where NumPy 1.x would compute in float64 with a float32 array. */
    return !(x == x && !isinf(x) && (x >= 3.4e38 || x <= -3.4e38));
}

/*
 * Fill out[CYNAG_N_COEF] for an array of NumPy type number type_num.
 * Returns 1 if the kernels can take these values, 0 if not (the caller must
 * use the general path, which follows NumPy's promotion exactly).
 */
static inline int cynag_nag_coefficients(int type_num, double lr, double m, int has_ls,
                                         double ls, double *out)
{
    double mm = m * m;
    double c = (1.0 + m) * lr;
    out[CYNAG_COEF_HAS_LS] = has_ls ? 1.0 : 0.0;
    if (type_num == CYNAG_NPY_DOUBLE) {
        out[CYNAG_COEF_LR] = lr;
        out[CYNAG_COEF_M] = m;
        out[CYNAG_COEF_MM] = mm;
        out[CYNAG_COEF_C] = c;
        out[CYNAG_COEF_LS] = has_ls ? ls : 0.0;
        return 1;
    }
    if (type_num != CYNAG_NPY_FLOAT && type_num != CYNAG_NPY_HALF)
        return 0;
    if (!(cynag_fits_float(lr) && cynag_fits_float(m) && cynag_fits_float(mm)
          && cynag_fits_float(c)))
        return 0;
    out[CYNAG_COEF_LR] = (float)lr;
    out[CYNAG_COEF_M] = (float)m;
    out[CYNAG_COEF_MM] = (float)mm;
    out[CYNAG_COEF_C] = (float)c;
    out[CYNAG_COEF_LS] = 0.0;
    if (has_ls) {
        if (!cynag_fits_float(ls))
            return 0;
        if (type_num == CYNAG_NPY_HALF) {
            if (ls == ls && !isinf(ls) && (ls >= 65000.0 || ls <= -65000.0))
                return 0;
            out[CYNAG_COEF_LS] = cynag_half_to_float(
                cynag_float_to_half(cynag_float_round_to_odd(ls)));
        } else {
            out[CYNAG_COEF_LS] = (float)ls;
        }
    }
    return 1;
}

#endif
