/* e^t for t <= ~0 in portable C with the method of exp-constants.h, one element at a time: shared
   by the scalar kernels. Results below FLT_MIN are exactly 0; NaN stays NaN. */
#ifndef SELFATTN_EXP_SCALAR_H
#define SELFATTN_EXP_SCALAR_H

#include <stdint.h>
#include <string.h>

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

#endif
