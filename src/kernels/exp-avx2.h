/* AVX2+FMA helpers shared by the AVX2 kernel files (included only by files compiled with -mavx2
   -mfma): e^t for t <= ~0 with the method of exp-constants.h, a tail mask, a horizontal sum. */
#ifndef SELFATTN_EXP_AVX2_H
#define SELFATTN_EXP_AVX2_H

#include <immintrin.h>

#include "exp-constants.h"

/* e^t for t <= ~0 (see exp-constants.h): 13 vector operations. */
static inline __m256 sa_exp_avx2(__m256 t)
{
    /* max(min, t) rather than max(t, min): maxps returns its second operand when one is NaN,
       so this order keeps a NaN argument NaN. */
    const __m256 tiny = _mm256_cmp_ps(t, _mm256_set1_ps(SA_EXP_MIN_ARG), _CMP_LT_OQ);
    t = _mm256_max_ps(_mm256_set1_ps(SA_EXP_MIN_ARG), t);
    const __m256 magic = _mm256_set1_ps(SA_EXP_ROUND_MAGIC);
    const __m256 shifted = _mm256_fmadd_ps(t, _mm256_set1_ps(SA_EXP_LOG2E), magic);
    const __m256 fn = _mm256_sub_ps(shifted, magic);
    const __m256 r = _mm256_fnmadd_ps(fn, _mm256_set1_ps(SA_EXP_LN2), t);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(SA_EXP_C5), r, _mm256_set1_ps(SA_EXP_C4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(SA_EXP_C3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(SA_EXP_C2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(SA_EXP_C1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(SA_EXP_C0));
    const __m256i two_n = _mm256_slli_epi32(_mm256_castps_si256(shifted), 23);
    /* results below FLT_MIN (and e^-inf, a key masked by a -inf bias) are exactly 0 */
    return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(two_n)));
}

static inline __m256i sa_tail_mask_avx2(size_t rem)
{
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)rem), idx);
}

static inline float sa_hsum_avx2(__m256 v)
{
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

#endif
