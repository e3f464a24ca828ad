/* AVX2+FMA scaled-softmax kernel, 4 x 8 floats per iteration. Compiled with -mavx2 -mfma on this
   file only; called only when the CPU has both (see dispatch.c). */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "kernels.h"
#include "exp-avx2.h"

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

/* The exp argument of x: fma(x, scale, -m), or (x - x_ext) * scale - d on the exact-max path
   (d = m - x_ext * scale: 0 unless a given bound is the maximum).
   `exact` is a constant at each call site, so each path compiles to its own loop. */
#define SA_ARG(x)                                                                                  \
    (exact ? _mm256_sub_ps(_mm256_mul_ps(_mm256_sub_ps((x), vc), vs), vd)                          \
           : _mm256_fmadd_ps((x), vs, vc))

static inline __attribute__((always_inline)) float
sa_exp_row_avx2(float *row, size_t n_valid, __m256 vs, __m256 vc, __m256 vd, const int exact)
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

float sa_f32_softmax_exp_above_avx2_u32(float *row, size_t n_valid, size_t n_total, float scale,
                                        float m_in, float *max_out)
{
    const float ext = sa_extreme_avx2(row, n_valid, scale >= 0.0f);
    const float own = ext * scale, m = m_in > own ? m_in : own;
    *max_out = m;
    const __m256 vs = _mm256_set1_ps(scale);
    /* the bound's excess over the row's own maximum, for the exact path (0 when the row's own) */
    const __m256 vd =
        _mm256_set1_ps(m_in > own ? (float)((double)m_in - (double)ext * scale) : 0.0f);
    const float sum = fabsf(m) < SA_EXP_EXACT_MAX_FROM
                          ? sa_exp_row_avx2(row, n_valid, vs, _mm256_set1_ps(-m), vd, 0)
                          : sa_exp_row_avx2(row, n_valid, vs, _mm256_set1_ps(ext), vd, 1);
    if (n_total > n_valid)
        memset(row + n_valid, 0, (n_total - n_valid) * sizeof *row);
    return sum;
}

float sa_f32_softmax_exp_avx2_u32(float *row, size_t n_valid, size_t n_total, float scale,
                                  float *max_out)
{
    return sa_f32_softmax_exp_above_avx2_u32(row, n_valid, n_total, scale, -INFINITY, max_out);
}
