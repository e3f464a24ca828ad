/* AVX2+FMA scaled-softmax kernel, 4 x 8 floats per iteration. Compiled with -mavx2 -mfma on this
   file only; called only when the CPU has both (see dispatch.c). */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "../internal.h"
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

/* The largest or (when scale < 0) smallest row[i], i < n: the x whose x * scale is largest. */
static float sa_extreme_avx2(const float *row, size_t n, int want_max)
{
    const __m256 init = _mm256_set1_ps(want_max ? -INFINITY : INFINITY);
    __m256 m0 = init, m1 = init, m2 = init, m3 = init;
    size_t i = 0;
#define SA_EXT(a, b) (want_max ? _mm256_max_ps((a), (b)) : _mm256_min_ps((a), (b)))
    for (; i + 32 <= n; i += 32) {
        m0 = SA_EXT(m0, _mm256_loadu_ps(row + i));
        m1 = SA_EXT(m1, _mm256_loadu_ps(row + i + 8));
        m2 = SA_EXT(m2, _mm256_loadu_ps(row + i + 16));
        m3 = SA_EXT(m3, _mm256_loadu_ps(row + i + 24));
    }
    for (; i + 8 <= n; i += 8)
        m0 = SA_EXT(m0, _mm256_loadu_ps(row + i));
    if (i < n) {
        const __m256i mask = sa_tail_mask_avx2(n - i);
        const __m256 v = _mm256_maskload_ps(row + i, mask);
        m1 = SA_EXT(m1, _mm256_blendv_ps(init, v, _mm256_castsi256_ps(mask)));
    }
    const __m256 m = SA_EXT(SA_EXT(m0, m1), SA_EXT(m2, m3));
    __m128 x = _mm256_castps256_ps128(m), y = _mm256_extractf128_ps(m, 1);
    x = want_max ? _mm_max_ps(x, y) : _mm_min_ps(x, y);
    y = _mm_movehl_ps(x, x);
    x = want_max ? _mm_max_ps(x, y) : _mm_min_ps(x, y);
    y = _mm_movehdup_ps(x);
    x = want_max ? _mm_max_ss(x, y) : _mm_min_ss(x, y);
#undef SA_EXT
    return _mm_cvtss_f32(x);
}

/* The exp argument of x: fma(x, scale, -m), or (x - x_ext) * scale on the exact-max path.
   `exact` is a constant at each call site, so each path compiles to its own loop. */
#define SA_ARG(x) (exact ? _mm256_mul_ps(_mm256_sub_ps((x), vc), vs) : _mm256_fmadd_ps((x), vs, vc))

static inline __attribute__((always_inline)) float
sa_exp_row_avx2(float *row, size_t n_valid, __m256 vs, __m256 vc, const int exact)
{
    /* Two-level sum: 4 vector accumulators over chunks of SA_SUM_CHUNK elements, chunk sums
       added into `total`, so that long rows do not lose the small terms to rounding. */
    __m256 total = _mm256_setzero_ps();
    size_t i = 0;
    while (i + 32 <= n_valid) {
        const size_t full = (n_valid - i) / 32 * 32;
        const size_t end = i + (full > SA_SUM_CHUNK ? SA_SUM_CHUNK : full);
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (; i < end; i += 32) {
            const __m256 e0 = sa_exp_avx2(SA_ARG(_mm256_loadu_ps(row + i)));
            const __m256 e1 = sa_exp_avx2(SA_ARG(_mm256_loadu_ps(row + i + 8)));
            const __m256 e2 = sa_exp_avx2(SA_ARG(_mm256_loadu_ps(row + i + 16)));
            const __m256 e3 = sa_exp_avx2(SA_ARG(_mm256_loadu_ps(row + i + 24)));
            _mm256_storeu_ps(row + i, e0);
            _mm256_storeu_ps(row + i + 8, e1);
            _mm256_storeu_ps(row + i + 16, e2);
            _mm256_storeu_ps(row + i + 24, e3);
            s0 = _mm256_add_ps(s0, e0);
            s1 = _mm256_add_ps(s1, e1);
            s2 = _mm256_add_ps(s2, e2);
            s3 = _mm256_add_ps(s3, e3);
        }
        total = _mm256_add_ps(total, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    }
    for (; i + 8 <= n_valid; i += 8) {
        const __m256 e = sa_exp_avx2(SA_ARG(_mm256_loadu_ps(row + i)));
        _mm256_storeu_ps(row + i, e);
        total = _mm256_add_ps(total, e);
    }
    if (i < n_valid) {
        const __m256i mask = sa_tail_mask_avx2(n_valid - i);
        const __m256 e = sa_exp_avx2(SA_ARG(_mm256_maskload_ps(row + i, mask)));
        _mm256_maskstore_ps(row + i, mask, e);
        total = _mm256_add_ps(total, _mm256_and_ps(e, _mm256_castsi256_ps(mask)));
    }
    return sa_hsum_avx2(total);
}
#undef SA_ARG

float sa_f32_softmax_exp_avx2_u32(float *row, size_t n_valid, size_t n_total, float scale,
                                  float *max_out)
{
    const float ext = sa_extreme_avx2(row, n_valid, scale >= 0.0f);
    const float m = ext * scale;
    *max_out = m;
    const __m256 vs = _mm256_set1_ps(scale);
    const float sum = fabsf(m) < SA_EXP_EXACT_MAX_FROM
                          ? sa_exp_row_avx2(row, n_valid, vs, _mm256_set1_ps(-m), 0)
                          : sa_exp_row_avx2(row, n_valid, vs, _mm256_set1_ps(ext), 1);
    if (n_total > n_valid)
        memset(row + n_valid, 0, (n_total - n_valid) * sizeof *row);
    return sum;
}
