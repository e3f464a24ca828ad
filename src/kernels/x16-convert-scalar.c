/* Reference conversions of arrays between float32 and f16/bf16 (see half-scalar.h). */
#include "half-scalar.h"
#include "kernels.h"

void sa_f16_to_f32_scalar(const uint16_t *src, float *dst, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = sa_f16_to_f32(src[i]);
}

void sa_bf16_to_f32_scalar(const uint16_t *src, float *dst, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = sa_bf16_to_f32(src[i]);
}

void sa_f32_to_f16_scalar(const float *src, uint16_t *dst, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = sa_f32_to_f16(src[i]);
}

void sa_f32_to_bf16_scalar(const float *src, uint16_t *dst, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = sa_f32_to_bf16(src[i]);
}

/* The small-M products of f32-rowsdot-scalar.c with K (qkt) or V (pv) stored in 16 bits. */
#define SA_X16_ROWSDOT(NAME_QKT, NAME_PV, TO_F32)                                                  \
    void NAME_QKT(size_t m, size_t n, size_t d, const float *q, size_t ldq, const uint16_t *k,     \
                  size_t ldk, float *s, size_t lds)                                                \
    {                                                                                              \
        for (size_t j = 0; j < n; j++)                                                             \
            for (size_t r = 0; r < m; r++) {                                                       \
                float acc = 0.0f;                                                                  \
                for (size_t c = 0; c < d; c++)                                                     \
                    acc += q[r * ldq + c] * TO_F32(k[j * ldk + c]);                                \
                s[r * lds + j] = acc;                                                              \
            }                                                                                      \
    }                                                                                              \
    void NAME_PV(size_t m, size_t n, size_t d, const float *p, size_t ldp, const uint16_t *v,      \
                 size_t ldv, float *o, size_t ldo)                                                 \
    {                                                                                              \
        for (size_t r = 0; r < m; r++)                                                             \
            for (size_t c = 0; c < d; c++)                                                         \
                o[r * ldo + c] = 0.0f;                                                             \
        for (size_t j = 0; j < n; j++)                                                             \
            for (size_t r = 0; r < m; r++)                                                         \
                for (size_t c = 0; c < d; c++)                                                     \
                    o[r * ldo + c] += p[r * ldp + j] * TO_F32(v[j * ldv + c]);                     \
    }

SA_X16_ROWSDOT(sa_f16_qkt_scalar_g8, sa_f16_pv_scalar_g8, sa_f16_to_f32)
SA_X16_ROWSDOT(sa_bf16_qkt_scalar_g8, sa_bf16_pv_scalar_g8, sa_bf16_to_f32)
