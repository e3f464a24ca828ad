/* Reference scaled-softmax kernel: portable C, always built, the one the SIMD kernels are tested
   against. Same exp method as the SIMD kernels (see exp-constants.h), one element at a time. */
#include <stdint.h>
#include <string.h>

#include "../internal.h"
#include "exp-constants.h"

static inline float sa_expf_nonpositive(float t)
{
    if (t != t)
        return t;
    if (t < SA_EXP_MIN_ARG)
        t = SA_EXP_MIN_ARG;
    const float fn = (t * SA_EXP_LOG2E + SA_EXP_ROUND_MAGIC) - SA_EXP_ROUND_MAGIC;
    float r = t - fn * SA_EXP_LN2_HI;
    r = r - fn * SA_EXP_LN2_LO;
    float p = SA_EXP_P0;
    p = p * r + SA_EXP_P1;
    p = p * r + SA_EXP_P2;
    p = p * r + SA_EXP_P3;
    p = p * r + SA_EXP_P4;
    p = p * r + SA_EXP_P5;
    const float er = (p * r) * r + r + 1.0f;
    const int32_t n = (int32_t)fn; /* in [-126, 0] after the clamp */
    const uint32_t bits = (uint32_t)(n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return er * two_n;
}

float sa_f32_softmax_exp_scalar_u1(float *row, size_t n_valid, size_t n_total, float scale)
{
    float m = row[0] * scale;
    for (size_t i = 1; i < n_valid; i++) {
        const float v = row[i] * scale;
        m = (v > m) ? v : m;
    }
    double sum = 0.0; /* the reference kernel sums exactly enough for any row length */
    for (size_t i = 0; i < n_valid; i++) {
        const float e = sa_expf_nonpositive(row[i] * scale - m);
        row[i] = e;
        sum += e;
    }
    if (n_total > n_valid)
        memset(row + n_valid, 0, (n_total - n_valid) * sizeof *row);
    return (float)sum;
}
