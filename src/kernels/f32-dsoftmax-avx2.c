/* AVX2+FMA kernels of the softmax backward (see f32-dsoftmax-scalar.c for what each computes).
   Compiled with -mavx2 -mfma on this file only; called only when the CPU has both. Loads are
   unaligned and no loop peels to an alignment boundary, so the order of every sum depends on n
   alone: results are the same whichever worker computes a row. */
#include <immintrin.h>
#include <string.h>

#include "kernels.h"
#include "exp-avx2.h"

float sa_f32_dot_avx2(const float *a, const float *b, size_t n)
{
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    size_t j = 0;
    for (; j + 32 <= n; j += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 16), _mm256_loadu_ps(b + j + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 24), _mm256_loadu_ps(b + j + 24), s3);
    }
    for (; j + 8 <= n; j += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
    if (j < n) { /* masked loads read nothing past the row: a NaN there cannot leak in */
        const __m256i m = sa_tail_mask_avx2(n - j);
        s1 = _mm256_fmadd_ps(_mm256_maskload_ps(a + j, m), _mm256_maskload_ps(b + j, m), s1);
    }
    const __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

void sa_f32_dscores_avx2(const float *p, float *dp, const float *dc, size_t n, float d, float mul)
{
    const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(mul);
    size_t j = 0;
    /* the scalar kernel's order of operations: ((p (dp - d)) mul) dc */
#define SA_DS(i, m)                                                                                \
    _mm256_mul_ps(_mm256_mul_ps(_mm256_maskload_ps(p + (i), m),                                    \
                                _mm256_sub_ps(_mm256_maskload_ps(dp + (i), m), vd)),               \
                  vm)
    const __m256i all = _mm256_set1_epi32(-1);
    for (; j + 8 <= n; j += 8) {
        __m256 v = SA_DS(j, all);
        if (dc != NULL)
            v = _mm256_mul_ps(v, _mm256_loadu_ps(dc + j));
        _mm256_storeu_ps(dp + j, v);
    }
    if (j < n) {
        const __m256i m = sa_tail_mask_avx2(n - j);
        __m256 v = SA_DS(j, m);
        if (dc != NULL)
            v = _mm256_mul_ps(v, _mm256_maskload_ps(dc + j, m));
        _mm256_maskstore_ps(dp + j, m, v);
    }
#undef SA_DS
}

void sa_f32_expsub_avx2(float *row, size_t n, float scale, float sub)
{
    const __m256 vs = _mm256_set1_ps(scale), vc = _mm256_set1_ps(-sub);
    size_t j = 0;
    for (; j + 16 <= n; j += 16) {
        const __m256 e0 = sa_exp_avx2(_mm256_fmadd_ps(_mm256_loadu_ps(row + j), vs, vc));
        const __m256 e1 = sa_exp_avx2(_mm256_fmadd_ps(_mm256_loadu_ps(row + j + 8), vs, vc));
        _mm256_storeu_ps(row + j, e0);
        _mm256_storeu_ps(row + j + 8, e1);
    }
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(row + j, sa_exp_avx2(_mm256_fmadd_ps(_mm256_loadu_ps(row + j), vs, vc)));
    if (j < n) {
        const __m256i m = sa_tail_mask_avx2(n - j);
        const __m256 e = sa_exp_avx2(_mm256_fmadd_ps(_mm256_maskload_ps(row + j, m), vs, vc));
        _mm256_maskstore_ps(row + j, m, e);
    }
}

/* cap tanh(x), x = row[j] scale / cap: for |x| < 1/4 the odd Taylor series of tanh to x^11 (the
   next term, 21844 x^13 / 6081075, is below 1e-10 of tanh x there); above, (1 - e) / (1 + e) with
   e = e^(-2|x|) from the softmax's exp, whose relative error d becomes 2e d / (1 - e^2) <= 1.9 d
   (at |x| = 1/4), and the sign of x put back. NaN stays NaN; +-inf gives +-cap. */
static inline __m256 sa_softcap8(__m256 v, __m256 mul, __m256 cap)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 x = _mm256_mul_ps(v, mul), ax = _mm256_andnot_ps(sign, x);
    const __m256 x2 = _mm256_mul_ps(x, x);
    __m256 p = _mm256_fmadd_ps(x2, _mm256_set1_ps(-1382.0f / 155925.0f),
                               _mm256_set1_ps(62.0f / 2835.0f));
    p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-17.0f / 315.0f));
    p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(2.0f / 15.0f));
    p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-1.0f / 3.0f));
    p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(1.0f));
    const __m256 small = _mm256_mul_ps(p, x);
    const __m256 e = sa_exp_avx2(_mm256_mul_ps(ax, _mm256_set1_ps(-2.0f)));
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 big = _mm256_or_ps(_mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e)),
                                    _mm256_and_ps(sign, x));
    const __m256 is_small = _mm256_cmp_ps(ax, _mm256_set1_ps(0.25f), _CMP_LT_OQ);
    return _mm256_mul_ps(cap, _mm256_blendv_ps(big, small, is_small));
}

void sa_f32_softcap_avx2(float *row, size_t n, float scale, float cap)
{
    const __m256 mul = _mm256_set1_ps(scale / cap), vc = _mm256_set1_ps(cap);
    size_t j = 0;
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(row + j, sa_softcap8(_mm256_loadu_ps(row + j), mul, vc));
    if (j < n) {
        const __m256i m = sa_tail_mask_avx2(n - j);
        _mm256_maskstore_ps(row + j, m, sa_softcap8(_mm256_maskload_ps(row + j, m), mul, vc));
    }
}
