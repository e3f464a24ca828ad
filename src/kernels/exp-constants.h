/* Constants of the exp(t), t <= 0, approximation shared by every softmax kernel.
 *
 * Method: range reduction t = n ln2 + r with n = round(t log2(e)) and |r| <= ln2/2; then
 * e^r ~= C0 + C1 r + ... + C5 r^5, the minimax polynomial for relative error on that interval,
 * derived here by exp_minimax.py beside this file (Remez exchange; 1.3e-7 maximum relative
 * error with the coefficients rounded to float); and e^t = 2^n e^r with 2^n built from
 * exponent bits.
 * The SIMD kernels reduce with one FMA and ln2 rounded to float (SA_EXP_LN2): the rounding of
 * ln2 (1.9e-9) times |n| <= 126 moves r by at most 2.4e-7, a relative error of that size in the
 * smallest results only. The scalar kernel, without FMA, splits ln2 into a part whose product
 * with n is exact (SA_EXP_LN2_HI, 9 significant bits; the Cody-Waite constants as in Cephes'
 * expf) and a correction (SA_EXP_LN2_LO). */
#ifndef SELFATTN_EXP_CONSTANTS_H
#define SELFATTN_EXP_CONSTANTS_H

#define SA_EXP_LOG2E 1.44269504088896341f
#define SA_EXP_LN2 0.693147180559945309f
#define SA_EXP_LN2_HI 0.693359375f
#define SA_EXP_LN2_LO (-2.12194440e-4f)
#define SA_EXP_C0 1.000000119e+00f
#define SA_EXP_C1 9.999997020e-01f
#define SA_EXP_C2 4.999889433e-01f
#define SA_EXP_C3 1.666757464e-01f
#define SA_EXP_C4 4.191538319e-02f
#define SA_EXP_C5 8.297654800e-03f
/* ln(FLT_MIN): below it e^t is not a normal float; arguments are clamped here so that 2^n stays a
   normal power of two (n >= -126). */
#define SA_EXP_MIN_ARG (-87.33654475f)
/* Rows whose largest scaled score m is at least this large in magnitude take the exact-max
   path: t = (x - x_max) * scale, where the maximum element's t is exactly 0. The faster path
   t = fma(x, scale, -m) shifts every t by the rounding error of m, which cancels in the
   normalisation while it is small (below 2^-4 here) but grows to about 5e21 for scores near
   1e29, where it would push the maximum out of exp's range. */
#define SA_EXP_EXACT_MAX_FROM 1048576.0f
/* 1.5 * 2^23 + 127: t log2(e) + this rounds t log2(e) to an integer n held in the low mantissa
   bits, already biased by 127, so that the float's bits shifted left by 23 are those of 2^n. */
#define SA_EXP_ROUND_MAGIC 12583039.0f

/* Elements summed into one set of vector accumulators before their sum is folded into the row
   total (a two-level sum keeps the rounding error of long rows near that of short ones). */
#define SA_SUM_CHUNK 1024

#endif
