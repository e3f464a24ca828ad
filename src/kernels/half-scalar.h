/* Scalar conversions between float32 and the 16-bit storage types (IEEE binary16 "f16", and
   bfloat16, the upper half of a binary32), round to nearest with ties to even. They are the
   reference the SIMD conversions are tested against, bit for bit (NaN included: a NaN keeps its
   sign and leading payload bits and comes out quiet, as F16C's vcvtps2ph does). */
#ifndef SELFATTN_HALF_SCALAR_H
#define SELFATTN_HALF_SCALAR_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline uint32_t sa_f32_bits(float f)
{
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    return x;
}

static inline float sa_bits_f32(uint32_t x)
{
    float f;
    memcpy(&f, &x, sizeof f);
    return f;
}

static inline float sa_f16_to_f32(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0x1F) /* inf, NaN */
        return sa_bits_f32(sign | 0x7F800000u | (m << 13));
    if (e != 0) /* normal: rebias the exponent from 15 to 127 */
        return sa_bits_f32(sign | ((e + 112u) << 23) | (m << 13));
    const float f = (float)m * 5.9604644775390625e-08f; /* subnormal or zero: m * 2^-24, exact */
    return sign ? -f : f;
}

static inline uint16_t sa_f32_to_f16(float f)
{
    const uint32_t x = sa_f32_bits(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7FFFFFFFu;
    if (ax > 0x7F800000u) /* NaN: quiet, leading payload bits kept */
        return (uint16_t)(sign | 0x7E00u | ((ax >> 13) & 0x3FFu));
    if (ax >= 0x477FF000u) /* >= 65520 (inf included): rounds to infinity */
        return (uint16_t)(sign | 0x7C00u);
    if (ax >= 0x38800000u) { /* normal binary16 (>= 2^-14): rebias, round the 13 dropped bits */
        const uint32_t r = ax - 0x38000000u;
        return (uint16_t)(sign | ((r + 0xFFFu + ((r >> 13) & 1u)) >> 13));
    }
    /* subnormal binary16 or zero: a multiple of 2^-24; scaling by 2^24 is exact, and nearbyintf
       rounds ties to even in the default rounding mode (1024 becomes the smallest normal) */
    const float a = sa_bits_f32(ax) * 16777216.0f;
    return (uint16_t)(sign | (uint32_t)nearbyintf(a));
}

static inline float sa_bf16_to_f32(uint16_t h)
{
    return sa_bits_f32((uint32_t)h << 16);
}

static inline uint16_t sa_f32_to_bf16(float f)
{
    const uint32_t x = sa_f32_bits(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) /* NaN: quiet */
        return (uint16_t)((x >> 16) | 0x0040u);
    return (uint16_t)((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

#endif /* SELFATTN_HALF_SCALAR_H */
