/* Constants of the exp(t), t <= 0, approximation shared by every softmax kernel.
 *
 * Method: Cody-Waite range reduction t = n ln2 + r, |r| <= ln2/2, with ln2 split in a part whose
 * product with n is exact (LN2_HI, 9 significant bits) and a correction (LN2_LO); then
 * e^r ~= 1 + r + r^2 P(r) with the degree-5 P whose coefficients are those of the Cephes
 * library's expf (S. L. Moshier, "Methods and Programs for Mathematical Functions", 1989), about
 * 1 ulp on the reduced range; and e^t = 2^n e^r built from the exponent bits. */
#ifndef SELFATTN_EXP_CONSTANTS_H
#define SELFATTN_EXP_CONSTANTS_H

#define SA_EXP_LOG2E 1.44269504088896341f
#define SA_EXP_LN2_HI 0.693359375f
#define SA_EXP_LN2_LO (-2.12194440e-4f)
#define SA_EXP_P0 1.9875691500e-4f
#define SA_EXP_P1 1.3981999507e-3f
#define SA_EXP_P2 8.3334519073e-3f
#define SA_EXP_P3 4.1665795894e-2f
#define SA_EXP_P4 1.6666665459e-1f
#define SA_EXP_P5 5.0000001201e-1f
/* ln(FLT_MIN): below it e^t is not a normal float; arguments are clamped here so that 2^n stays a
   normal power of two (n >= -126). */
#define SA_EXP_MIN_ARG (-87.33654475f)
/* 1.5 * 2^23: adding it rounds a float of magnitude < 2^22 to an integer held in the low
   mantissa bits. */
#define SA_EXP_ROUND_MAGIC 12582912.0f

/* Elements summed into one set of vector accumulators before their sum is folded into the row
   total (a two-level sum keeps the rounding error of long rows near that of short ones). */
#define SA_SUM_CHUNK 1024

#endif
