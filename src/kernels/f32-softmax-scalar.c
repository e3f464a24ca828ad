/* Reference scaled-softmax kernel: portable C, always built, the one the SIMD kernels are tested
   against. Same exp method as the SIMD kernels (see exp-constants.h), one element at a time. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "exp-scalar.h"

float sa_f32_softmax_exp_above_scalar_u1(float *row, size_t n_valid, size_t n_total, float scale,
                                         float m_in, float *max_out)
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
    const double sd = (double)scale;
    double md = (double)ext * sd;
    if ((double)m_in > md) /* the given bound: every argument below 0 */
        md = (double)m_in;
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

float sa_f32_softmax_exp_scalar_u1(float *row, size_t n_valid, size_t n_total, float scale,
                                   float *max_out)
{
    return sa_f32_softmax_exp_above_scalar_u1(row, n_valid, n_total, scale, -INFINITY, max_out);
}
