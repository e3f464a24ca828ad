/* AVX-512F scaled-softmax kernel, 4 x 16 floats per iteration, masked tails. Compiled with
   -mavx512f on this file only; called only when the CPU has AVX-512F (see dispatch.c). */
#include <immintrin.h>
#include <string.h>

#include "../internal.h"
#include "exp-constants.h"

static inline __m512 sa_exp_avx512(__m512 t)
{
    /* vmaxps returns its second operand when one is NaN: this order keeps NaN arguments NaN. */
    t = _mm512_max_ps(_mm512_set1_ps(SA_EXP_MIN_ARG), t);
    const __m512 fn = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(SA_EXP_LOG2E)),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(fn, _mm512_set1_ps(SA_EXP_LN2_HI), t);
    r = _mm512_fnmadd_ps(fn, _mm512_set1_ps(SA_EXP_LN2_LO), r);
    __m512 p = _mm512_set1_ps(SA_EXP_P0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(SA_EXP_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(SA_EXP_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(SA_EXP_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(SA_EXP_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(SA_EXP_P5));
    const __m512 er =
        _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(er, fn); /* er * 2^fn */
}

float sa_f32_softmax_exp_avx512_u64(float *row, size_t n_valid, size_t n_total, float scale)
{
    const __m512 vs = _mm512_set1_ps(scale);
    const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
    __m512 m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
    size_t i = 0;
    for (; i + 64 <= n_valid; i += 64) {
        m0 = _mm512_max_ps(m0, _mm512_mul_ps(_mm512_loadu_ps(row + i), vs));
        m1 = _mm512_max_ps(m1, _mm512_mul_ps(_mm512_loadu_ps(row + i + 16), vs));
        m2 = _mm512_max_ps(m2, _mm512_mul_ps(_mm512_loadu_ps(row + i + 32), vs));
        m3 = _mm512_max_ps(m3, _mm512_mul_ps(_mm512_loadu_ps(row + i + 48), vs));
    }
    for (; i + 16 <= n_valid; i += 16)
        m0 = _mm512_max_ps(m0, _mm512_mul_ps(_mm512_loadu_ps(row + i), vs));
    if (i < n_valid) {
        const __mmask16 k = (__mmask16)((1u << (n_valid - i)) - 1u);
        m1 = _mm512_mask_max_ps(m1, k, m1, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, row + i), vs));
    }
    const float m =
        _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));

    /* Two-level sum: 4 vector accumulators over chunks of SA_SUM_CHUNK elements, chunk sums
       added into `total`, so that long rows do not lose the small terms to rounding. */
    const __m512 vnm = _mm512_set1_ps(-m);
    __m512 total = _mm512_setzero_ps();
    for (i = 0; i + 64 <= n_valid;) {
        const size_t end =
            (n_valid - i) / 64 * 64 > SA_SUM_CHUNK ? i + SA_SUM_CHUNK : i + (n_valid - i) / 64 * 64;
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (; i < end; i += 64) {
            const __m512 e0 = sa_exp_avx512(_mm512_fmadd_ps(_mm512_loadu_ps(row + i), vs, vnm));
            const __m512 e1 =
                sa_exp_avx512(_mm512_fmadd_ps(_mm512_loadu_ps(row + i + 16), vs, vnm));
            const __m512 e2 =
                sa_exp_avx512(_mm512_fmadd_ps(_mm512_loadu_ps(row + i + 32), vs, vnm));
            const __m512 e3 =
                sa_exp_avx512(_mm512_fmadd_ps(_mm512_loadu_ps(row + i + 48), vs, vnm));
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
        const __m512 e = sa_exp_avx512(_mm512_fmadd_ps(_mm512_loadu_ps(row + i), vs, vnm));
        _mm512_storeu_ps(row + i, e);
        total = _mm512_add_ps(total, e);
    }
    if (i < n_valid) {
        const __mmask16 k = (__mmask16)((1u << (n_valid - i)) - 1u);
        const __m512 e = sa_exp_avx512(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, row + i), vs, vnm));
        _mm512_mask_storeu_ps(row + i, k, e);
        total = _mm512_mask_add_ps(total, k, total, e);
    }
    if (n_total > n_valid)
        memset(row + n_valid, 0, (n_total - n_valid) * sizeof *row);
    return _mm512_reduce_add_ps(total);
}
