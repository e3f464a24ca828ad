/* Conversions of arrays between float32 and f16 (F16C: vcvtps2ph rounds to nearest even, as the
   scalar reference does) or bf16 (shifts, and the reference's rounding in integer lanes), 8 at
   a time; the tails go through the scalar reference. Compiled with -mavx2 -mfma -mf16c on this
   file only. */
#include <immintrin.h>
#include <stdint.h>

#include "half-scalar.h"
#include "kernels.h"

void sa_f16_to_f32_avx2(const uint16_t *src, float *dst, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++)
        dst[i] = sa_f16_to_f32(src[i]);
}

void sa_bf16_to_f32_avx2(const uint16_t *src, float *dst, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + i)));
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
    for (; i < n; i++)
        dst[i] = sa_bf16_to_f32(src[i]);
}

void sa_f32_to_f16_avx2(const float *src, uint16_t *dst, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; i < n; i++)
        dst[i] = sa_f32_to_f16(src[i]);
}

void sa_f32_to_bf16_avx2(const float *src, uint16_t *dst, size_t n)
{
    size_t i = 0;
    const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF), inf = _mm256_set1_epi32(0x7F800000);
    const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF);
    const __m256i quiet = _mm256_set1_epi32(0x00400000);
    for (; i + 8 <= n; i += 8) {
        const __m256i x = _mm256_castps_si256(_mm256_loadu_ps(src + i));
        const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(x, abs_mask), inf);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), one);
        const __m256i rounded = _mm256_add_epi32(x, _mm256_add_epi32(bias, lsb));
        const __m256i r = _mm256_srli_epi32(
            _mm256_blendv_epi8(rounded, _mm256_or_si256(x, quiet), nan), 16);
        /* 8 lanes of 32 bits, each < 2^16: pack to 16 bits (the lane order of packus is per
           128-bit half, so permute the halves back in order) */
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_castsi256_si128(packed));
    }
    for (; i < n; i++)
        dst[i] = sa_f32_to_bf16(src[i]);
}
