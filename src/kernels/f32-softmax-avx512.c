/* AVX-512F scaled-softmax kernel, 4 x 16 floats per iteration, masked tails. Compiled with
   -mavx512f -mfma on this file only; called only when the CPU has AVX-512F (see dispatch.c). */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "kernels.h"
#include "exp-constants.h"

/* e^t for t <= ~0 (see exp-constants.h): 12 vector operations. */
static inline __m512 sa_exp_avx512(__m512 t)
{
    /* vmaxps returns its second operand when one is NaN: this order keeps NaN arguments NaN. */
    const __mmask16 tiny = _mm512_cmp_ps_mask(t, _mm512_set1_ps(SA_EXP_MIN_ARG), _CMP_LT_OQ);
    t = _mm512_max_ps(_mm512_set1_ps(SA_EXP_MIN_ARG), t);
    const __m512 magic = _mm512_set1_ps(SA_EXP_ROUND_MAGIC);
    const __m512 shifted = _mm512_fmadd_ps(t, _mm512_set1_ps(SA_EXP_LOG2E), magic);
    const __m512 fn = _mm512_sub_ps(shifted, magic);
    const __m512 r = _mm512_fnmadd_ps(fn, _mm512_set1_ps(SA_EXP_LN2), t);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(SA_EXP_C5), r, _mm512_set1_ps(SA_EXP_C4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(SA_EXP_C3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(SA_EXP_C2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(SA_EXP_C1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(SA_EXP_C0));
    const __m512i two_n = _mm512_slli_epi32(_mm512_castps_si512(shifted), 23);
    /* results below FLT_MIN (and e^-inf, a key masked by a -inf bias) are exactly 0 */
    return _mm512_maskz_mul_ps((__mmask16)~tiny, p, _mm512_castsi512_ps(two_n));
}

/* The largest or (when scale < 0) smallest row[i], i < n: the x whose x * scale is largest. */
static float sa_extreme_avx512(const float *row, size_t n, int want_max)
{
    const __m512 init = _mm512_set1_ps(want_max ? -INFINITY : INFINITY);
    __m512 m0 = init, m1 = init, m2 = init, m3 = init;
    size_t i = 0;
#define SA_EXT(a, b) (want_max ? _mm512_max_ps((a), (b)) : _mm512_min_ps((a), (b)))
    for (; i + 64 <= n; i += 64) {
        m0 = SA_EXT(m0, _mm512_loadu_ps(row + i));
        m1 = SA_EXT(m1, _mm512_loadu_ps(row + i + 16));
        m2 = SA_EXT(m2, _mm512_loadu_ps(row + i + 32));
        m3 = SA_EXT(m3, _mm512_loadu_ps(row + i + 48));
    }
    for (; i + 16 <= n; i += 16)
        m0 = SA_EXT(m0, _mm512_loadu_ps(row + i));
    if (i < n) {
        const __mmask16 k = (__mmask16)((1u << (n - i)) - 1u);
        m1 = SA_EXT(m1, _mm512_mask_loadu_ps(init, k, row + i));
    }
    const __m512 m = SA_EXT(SA_EXT(m0, m1), SA_EXT(m2, m3));
#undef SA_EXT
    return want_max ? _mm512_reduce_max_ps(m) : _mm512_reduce_min_ps(m);
}

/* The exp argument of x: fma(x, scale, -m), or (x - x_ext) * scale - d on the exact-max path
   (d = m - x_ext * scale: 0 unless a given bound is the maximum).
   `exact` is a constant at each call site, so each path compiles to its own loop. */
#define SA_ARG(x)                                                                                  \
    (exact ? _mm512_sub_ps(_mm512_mul_ps(_mm512_sub_ps((x), vc), vs), vd)                          \
           : _mm512_fmadd_ps((x), vs, vc))

static inline __attribute__((always_inline)) float
sa_exp_row_avx512(float *row, size_t n_valid, __m512 vs, __m512 vc, __m512 vd, const int exact)
{
    /* Two-level sum: 4 vector accumulators over chunks of SA_SUM_CHUNK elements, chunk sums
       added into `total`, so that long rows do not lose the small terms to rounding. */
    __m512 total = _mm512_setzero_ps();
    size_t i = 0;
    while (i + 64 <= n_valid) {
        const size_t full = (n_valid - i) / 64 * 64;
        const size_t end = i + (full > SA_SUM_CHUNK ? SA_SUM_CHUNK : full);
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (; i < end; i += 64) {
            const __m512 e0 = sa_exp_avx512(SA_ARG(_mm512_loadu_ps(row + i)));
            const __m512 e1 = sa_exp_avx512(SA_ARG(_mm512_loadu_ps(row + i + 16)));
            const __m512 e2 = sa_exp_avx512(SA_ARG(_mm512_loadu_ps(row + i + 32)));
            const __m512 e3 = sa_exp_avx512(SA_ARG(_mm512_loadu_ps(row + i + 48)));
            _mm512_storeu_ps(row + i, e0);
            _mm512_storeu_ps(row + i + 16, e1);
            _mm512_storeu_ps(row + i + 32, e2);
            _mm512_storeu_ps(row + i + 48, e3);
            s0 = _mm512_add_ps(s0, e0);
            s1 = _mm512_add_ps(s1, e1);
            s2 = _mm512_add_ps(s2, e2);
            s3 = _mm512_add_ps(s3, e3);
        }
        total = _mm512_add_ps(total, _mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
    }
    for (; i + 16 <= n_valid; i += 16) {
        const __m512 e = sa_exp_avx512(SA_ARG(_mm512_loadu_ps(row + i)));
        _mm512_storeu_ps(row + i, e);
        total = _mm512_add_ps(total, e);
    }
    if (i < n_valid) {
        const __mmask16 k = (__mmask16)((1u << (n_valid - i)) - 1u);
        const __m512 e = sa_exp_avx512(SA_ARG(_mm512_maskz_loadu_ps(k, row + i)));
        _mm512_mask_storeu_ps(row + i, k, e);
        total = _mm512_mask_add_ps(total, k, total, e);
    }
    return _mm512_reduce_add_ps(total);
}
#undef SA_ARG

float sa_f32_softmax_exp_above_avx512_u64(float *row, size_t n_valid, size_t n_total, float scale,
                                          float m_in, float *max_out)
{
    const float ext = sa_extreme_avx512(row, n_valid, scale >= 0.0f);
    const float own = ext * scale, m = m_in > own ? m_in : own;
    *max_out = m;
    const __m512 vs = _mm512_set1_ps(scale);
    /* the bound's excess over the row's own maximum, for the exact path (0 when the row's own) */
    const __m512 vd =
        _mm512_set1_ps(m_in > own ? (float)((double)m_in - (double)ext * scale) : 0.0f);
    const float sum = fabsf(m) < SA_EXP_EXACT_MAX_FROM
                          ? sa_exp_row_avx512(row, n_valid, vs, _mm512_set1_ps(-m), vd, 0)
                          : sa_exp_row_avx512(row, n_valid, vs, _mm512_set1_ps(ext), vd, 1);
    if (n_total > n_valid)
        memset(row + n_valid, 0, (n_total - n_valid) * sizeof *row);
    return sum;
}

float sa_f32_softmax_exp_avx512_u64(float *row, size_t n_valid, size_t n_total, float scale,
                                    float *max_out)
{
    return sa_f32_softmax_exp_above_avx512_u64(row, n_valid, n_total, scale, -INFINITY, max_out);
}
