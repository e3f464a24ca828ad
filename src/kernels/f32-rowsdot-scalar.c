/* Reference small-M products for decoding, portable C: the kernels the SIMD ones are tested
   against. See internal.h (sa_f32_qkt_fn, sa_f32_pv_fn) for the contract. */
#include "kernels.h"

void sa_f32_qkt_scalar_g8(size_t m, size_t n, size_t d, const float *q, size_t ldq,
                          const float *k, size_t ldk, float *s, size_t lds)
{
    for (size_t j = 0; j < n; j++) {
        const float *kj = k + j * ldk;
        for (size_t r = 0; r < m; r++) {
            const float *qr = q + r * ldq;
            float acc = 0.0f;
            for (size_t c = 0; c < d; c++)
                acc += qr[c] * kj[c];
            s[r * lds + j] = acc;
        }
    }
}

void sa_f32_pv_scalar_g8(size_t m, size_t n, size_t d, const float *p, size_t ldp, const float *v,
                         size_t ldv, float *o, size_t ldo)
{
    for (size_t r = 0; r < m; r++)
        for (size_t c = 0; c < d; c++)
            o[r * ldo + c] = 0.0f;
    for (size_t j = 0; j < n; j++) {
        const float *vj = v + j * ldv;
        for (size_t r = 0; r < m; r++) {
            const float pj = p[r * ldp + j];
            float *or_ = o + r * ldo;
            for (size_t c = 0; c < d; c++)
                or_[c] += pj * vj[c];
        }
    }
}
