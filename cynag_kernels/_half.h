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

#endif /* CYNAG_HALF_H */
