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
        return 0.0f; /* below FLT_MIN (and e^-inf, a key masked by a -inf bias): exactly 0 */
    const float shifted = t * SA_EXP_LOG2E + SA_EXP_ROUND_MAGIC;
    const float fn = shifted - SA_EXP_ROUND_MAGIC;
    float r = t - fn * SA_EXP_LN2_HI;
    r = r - fn * SA_EXP_LN2_LO;
    float p = SA_EXP_C5;
    p = p * r + SA_EXP_C4;
    p = p * r + SA_EXP_C3;
    p = p * r + SA_EXP_C2;
    p = p * r + SA_EXP_C1;
    p = p * r + SA_EXP_C0;
    uint32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    bits <<= 23; /* (n + 127) << 23: 2^n, n in [-126, 0] after the clamp */
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

float sa_f32_softmax_exp_scalar_u1(float *row, size_t n_valid, size_t n_total, float scale,
                                   float *max_out)
{
    /* The x whose x * scale is largest: the max of row[i], or the min when scale < 0. */
    float ext = row[0];
    if (scale >= 0.0f) {
        for (size_t i = 1; i < n_valid; i++)
            ext = row[i] > ext ? row[i] : ext;
    } else {
        for (size_t i = 1; i < n_valid; i++)
            ext = row[i] < ext ? row[i] : ext;
    }
    /* The argument in double: (x - ext) * scale with one rounding, exactly 0 at the maximum,
       for scores of any magnitude. */
    const double sd = (double)scale, md = (double)ext * sd;
    *max_out = (float)md;
    double sum = 0.0; /* the reference kernel sums exactly enough for any row length */
    for (size_t i = 0; i < n_valid; i++) {
        const float e = sa_expf_nonpositive((float)((double)row[i] * sd - md));
        row[i] = e;
        sum += e;
    }
    if (n_total > n_valid)
        memset(row + n_valid, 0, (n_total - n_valid) * sizeof *row);
    return (float)sum;
}
