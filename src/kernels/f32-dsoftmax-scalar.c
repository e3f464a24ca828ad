/* Reference kernels of the softmax backward (backward.c): portable C, always built.
 *   dot:     sum_j a[j] b[j] over one row, in one fixed order (8 interleaved partial sums, then
 *            a fixed tree), so a row's result depends on its data alone, never on the thread
 *            that computes it;
 *   dscores: dp[j] = p[j] (dp[j] - d) mul (times dc[j] when dc is non-NULL): the softmax's
 *            backward dS = P o (dP - D), with the score scale (and the softcap's derivative);
 *   expsub:  row[j] = e^(row[j] scale - sub): a tile's probabilities straight from each row's
 *            log-sum-exp, one exp per score (the caller guarantees row[j] scale <= sub up to
 *            rounding, and |sub| < SA_EXP_EXACT_MAX_FROM so that rounding stays tiny);
 *   softcap: row[j] = cap tanh(row[j] scale / cap) (Gemma 2's softcapping of the scores; here
 *            with libm's tanhf, the reference). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "exp-scalar.h"

float sa_f32_dot_scalar(const float *a, const float *b, size_t n)
{
    float s[8] = {0};
    size_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int k = 0; k < 8; k++)
            s[k] += a[j + k] * b[j + k];
    for (int k = 0; j < n; j++, k++)
        s[k] += a[j] * b[j];
    return ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
}

void sa_f32_dscores_scalar(const float *p, float *dp, const float *dc, size_t n, float d, float mul)
{
    if (dc != NULL)
        for (size_t j = 0; j < n; j++)
            dp[j] = p[j] * (dp[j] - d) * mul * dc[j];
    else
        for (size_t j = 0; j < n; j++)
            dp[j] = p[j] * (dp[j] - d) * mul;
}

void sa_f32_expsub_scalar(float *row, size_t n, float scale, float sub)
{
    /* the argument in double, one rounding, as the scalar softmax kernel */
    const double sd = (double)scale, ud = (double)sub;
    for (size_t j = 0; j < n; j++)
        row[j] = sa_expf_nonpositive((float)((double)row[j] * sd - ud));
}

void sa_f32_softcap_scalar(float *row, size_t n, float scale, float cap)
{
    for (size_t j = 0; j < n; j++)
        row[j] = cap * tanhf(row[j] * scale / cap);
}
