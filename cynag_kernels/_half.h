/*
 * IEEE 754 binary16 <-> binary32 conversion in portable C.
 *
 * cynag computes float16 updates in float32 registers and stores float16, as
 * numpy's ``astype`` would: float32 -> float16 rounds to nearest, ties to
 * even, with gradual underflow and overflow to infinity.  Both directions are
 * exact where the value is representable; the tests compare them against
 * numpy over every float16 bit pattern and over random float32 bit patterns.
 *
 * The bit manipulation follows the well-known branch-light formulation
 * (F. Giesen, "half <-> float conversions", public domain).  It relies on
 * IEEE arithmetic in the default rounding mode without flush-to-zero, which
 * the build guarantees by never enabling fast-math.
 */
#ifndef CYNAG_HALF_H
#define CYNAG_HALF_H

#include <stdint.h>
#include <string.h>

static inline uint32_t cynag_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float cynag_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline float cynag_half_to_float(uint16_t h)
{
    const uint32_t shifted_exp = 0x7c00u << 13;
    uint32_t o = ((uint32_t)h & 0x7fffu) << 13;
    uint32_t exp = shifted_exp & o;
    o += (uint32_t)(127 - 15) << 23;
    if (exp == shifted_exp) {            /* Inf / NaN */
        o += (uint32_t)(128 - 16) << 23;
    } else if (exp == 0) {               /* zero / subnormal: renormalise */
        o += 1u << 23;
        o = cynag_f32_bits(cynag_bits_f32(o) - cynag_bits_f32(113u << 23));
    }
    o |= ((uint32_t)h & 0x8000u) << 16;
    return cynag_bits_f32(o);
}

static inline uint16_t cynag_float_to_half(float value)
{
    const uint32_t f32infty = 255u << 23;
    const uint32_t f16max = (127u + 16u) << 23;
    const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    uint32_t u = cynag_f32_bits(value);
    uint32_t sign = u & 0x80000000u;
    uint16_t o;
    u ^= sign;
    if (u >= f16max) {                   /* overflow -> Inf, NaN stays NaN */
        if (u > f32infty) {
            uint32_t payload = (u >> 13) & 0x3ffu;
            o = (uint16_t)(0x7c00u | 0x200u | payload);   /* quiet NaN */
        } else {
            o = 0x7c00u;
        }
    } else if (u < (113u << 23)) {       /* subnormal or zero result */
        float f = cynag_bits_f32(u) + cynag_bits_f32(denorm_magic);
        o = (uint16_t)(cynag_f32_bits(f) - denorm_magic);
    } else {                             /* normal: round to nearest even */
        uint32_t mant_odd = (u >> 13) & 1u;
        u += ((uint32_t)(15 - 127) << 23) + 0xfffu;
        u += mant_odd;
        o = (uint16_t)(u >> 13);
    }
    return (uint16_t)(o | (sign >> 16));
}

/*
 * float16 NesterovAG span with the x86 F16C conversion instructions.
 *
 * The portable conversions above keep the compiler from vectorising the
 * float16 loop.  On x86 CPUs with AVX and F16C (checked at run time, so the
 * extension itself stays portable) this span converts eight elements per
 * instruction.  It computes exactly what the portable span computes: float32
 * arithmetic in the same order without contraction (the target adds no FMA),
 * round-to-nearest-even conversions, and ``v`` rounded to float16 before it
 * enters the parameter update.
 */
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#include <stddef.h>
#define CYNAG_HAVE_F16C_SPAN 1

__attribute__((target("avx,f16c")))
static void cynag_nag_span_f16c(uint16_t *p, const uint16_t *g, uint16_t *v, ptrdiff_t n,
                                float lr, float m, float mm, float c)
{
    const __m256 vlr = _mm256_set1_ps(lr), vm = _mm256_set1_ps(m);
    const __m256 vmm = _mm256_set1_ps(mm), vc = _mm256_set1_ps(c);
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 gf = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(g + i)));
        __m256 vf = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + i)));
        __m256 pf = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + i)));
        __m128i vh;
        vf = _mm256_sub_ps(_mm256_mul_ps(vf, vm), _mm256_mul_ps(vlr, gf));
        vh = _mm256_cvtps_ph(vf, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)(v + i), vh);
        vf = _mm256_cvtph_ps(vh);
        pf = _mm256_sub_ps(_mm256_add_ps(pf, _mm256_mul_ps(vmm, vf)), _mm256_mul_ps(vc, gf));
        _mm_storeu_si128((__m128i *)(p + i),
                         _mm256_cvtps_ph(pf, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    for (; i < n; ++i) {
        float gi = cynag_half_to_float(g[i]);
        float vi;
        v[i] = cynag_float_to_half(cynag_half_to_float(v[i]) * m - lr * gi);
        vi = cynag_half_to_float(v[i]);
        p[i] = cynag_float_to_half((cynag_half_to_float(p[i]) + mm * vi) - c * gi);
    }
}

static int cynag_cpu_has_f16c(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
}
#else
#define CYNAG_HAVE_F16C_SPAN 0
static void cynag_nag_span_f16c(uint16_t *p, const uint16_t *g, uint16_t *v, ptrdiff_t n,
                                float lr, float m, float mm, float c)
{
    (void)p; (void)g; (void)v; (void)n; (void)lr; (void)m; (void)mm; (void)c;
}
static int cynag_cpu_has_f16c(void) { return 0; }
#endif

#endif /* CYNAG_HALF_H */
