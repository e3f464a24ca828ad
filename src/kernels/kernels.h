/* What the kernels compute: their function types and every variant's declaration. A kernel file
   includes this header and its exp/ISA helpers only: no layer, pool or workspace in sight. */
#ifndef SELFATTN_KERNELS_H
#define SELFATTN_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#define SA_HIDDEN __attribute__((visibility("hidden")))

/* Scaled-softmax numerator over one row of scores, in place:
     m = max_{i < n_valid} row[i] * scale
     row[i] = exp(row[i] * scale - m)    for i < n_valid
     row[i] = 0                          for n_valid <= i < n_total
   stores m (rounded to float) in *max_out and returns the sum of the row[i]; m + log(sum) is the
   row's log-sum-exp. Needs 1 <= n_valid <= n_total. Finite scores of any magnitude give finite
   results, the largest entry being about 1 (rows whose largest scaled score reaches
   SA_EXP_EXACT_MAX_FROM take an exact-max path); a NaN score makes the sum NaN.
   The caller normalises (divides the P*V product by the sum), so the division is done once per
   output element rather than once per score. Results of exp below FLT_MIN (arguments below
   ln(FLT_MIN)) are exactly 0, an absolute error below FLT_MIN: so a -inf score (a key masked by
   a -inf bias) gets exactly 0.
 */
typedef float (*sa_f32_softmax_exp_fn)(float *row, size_t n_valid, size_t n_total, float scale,
                                       float *max_out);
/* The same with a lower bound on the maximum, for a row taken in chunks (the online softmax of
   long rows): m = max(m_in, max_{i < n_valid} row[i] * scale), the rest as above; m_in may be
   -inf (then exactly sa_f32_softmax_exp_fn). Needs m finite. When m_in wins and |m| reaches
   SA_EXP_EXACT_MAX_FROM the argument is (x - x_max) scale - (m - x_max scale), exact at the
   row's own maximum, so that huge scores stay in range. */
typedef float (*sa_f32_softmax_exp_above_fn)(float *row, size_t n_valid, size_t n_total,
                                             float scale, float m_in, float *max_out);

/* Small-M products for decoding (m <= SA_ROWS_MAX rows, e.g. the query heads of one GQA group
   for one token), streaming each row of K or V once without packing:
     qkt: s[r * lds + j] = sum_c q[r * ldq + c] * k[j * ldk + c]      r < m, j < n, c < d
     pv:  o[r * ldo + c] = sum_j p[r * ldp + j] * v[j * ldv + c]      r < m, c < d, j < n */
#define SA_ROWS_MAX 8
typedef void (*sa_f32_qkt_fn)(size_t m, size_t n, size_t d, const float *q, size_t ldq,
                              const float *k, size_t ldk, float *s, size_t lds);
typedef void (*sa_f32_pv_fn)(size_t m, size_t n, size_t d, const float *p, size_t ldp,
                             const float *v, size_t ldv, float *o, size_t ldo);
SA_HIDDEN void sa_f32_qkt_scalar_g8(size_t m, size_t n, size_t d, const float *q, size_t ldq,
                                    const float *k, size_t ldk, float *s, size_t lds);
SA_HIDDEN void sa_f32_pv_scalar_g8(size_t m, size_t n, size_t d, const float *p, size_t ldp,
                                   const float *v, size_t ldv, float *o, size_t ldo);
#ifdef SELFATTN_HAVE_AVX2_KERNELS
SA_HIDDEN void sa_f32_qkt_avx2_g8(size_t m, size_t n, size_t d, const float *q, size_t ldq,
                                  const float *k, size_t ldk, float *s, size_t lds);
SA_HIDDEN void sa_f32_pv_avx2_g8(size_t m, size_t n, size_t d, const float *p, size_t ldp,
                                 const float *v, size_t ldv, float *o, size_t ldo);
#endif
#ifdef SELFATTN_HAVE_AVX512_KERNELS
SA_HIDDEN void sa_f32_qkt_avx512_g8(size_t m, size_t n, size_t d, const float *q, size_t ldq,
                                    const float *k, size_t ldk, float *s, size_t lds);
SA_HIDDEN void sa_f32_pv_avx512_g8(size_t m, size_t n, size_t d, const float *p, size_t ldp,
                                   const float *v, size_t ldv, float *o, size_t ldo);
#endif

/* Row kernels of the softmax backward (f32-dsoftmax-*.c; the AVX2 ones serve AVX-512 CPUs):
     dot:     sum_j a[j] b[j], j < n, summed in an order that depends on n alone
     dscores: dp[j] = p[j] (dp[j] - d) mul (times dc[j] when dc != NULL), j < n
     expsub:  row[j] = e^(row[j] scale - sub), j < n, for row[j] scale <= sub (up to rounding)
              and |sub| < SA_EXP_EXACT_MAX_FROM; results below FLT_MIN are exactly 0 */
typedef float (*sa_f32_dot_fn)(const float *a, const float *b, size_t n);
typedef void (*sa_f32_dscores_fn)(const float *p, float *dp, const float *dc, size_t n, float d,
                                  float mul);
typedef void (*sa_f32_expsub_fn)(float *row, size_t n, float scale, float sub);
/* softcap: row[j] = cap tanh(row[j] scale / cap), j < n (cap > 0) */
typedef void (*sa_f32_softcap_fn)(float *row, size_t n, float scale, float cap);
SA_HIDDEN float sa_f32_dot_scalar(const float *a, const float *b, size_t n);
SA_HIDDEN void sa_f32_dscores_scalar(const float *p, float *dp, const float *dc, size_t n, float d,
                                     float mul);
SA_HIDDEN void sa_f32_expsub_scalar(float *row, size_t n, float scale, float sub);
SA_HIDDEN void sa_f32_softcap_scalar(float *row, size_t n, float scale, float cap);
#ifdef SELFATTN_HAVE_AVX2_KERNELS
SA_HIDDEN float sa_f32_dot_avx2(const float *a, const float *b, size_t n);
SA_HIDDEN void sa_f32_dscores_avx2(const float *p, float *dp, const float *dc, size_t n, float d,
                                   float mul);
SA_HIDDEN void sa_f32_expsub_avx2(float *row, size_t n, float scale, float sub);
SA_HIDDEN void sa_f32_softcap_avx2(float *row, size_t n, float scale, float cap);
#endif

SA_HIDDEN float sa_f32_softmax_exp_scalar_u1(float *row, size_t n_valid, size_t n_total,
                                             float scale, float *max_out);
SA_HIDDEN float sa_f32_softmax_exp_above_scalar_u1(float *row, size_t n_valid, size_t n_total,
                                                   float scale, float m_in, float *max_out);
#ifdef SELFATTN_HAVE_AVX2_KERNELS
SA_HIDDEN float sa_f32_softmax_exp_avx2_u32(float *row, size_t n_valid, size_t n_total, float scale,
                                            float *max_out);
SA_HIDDEN float sa_f32_softmax_exp_above_avx2_u32(float *row, size_t n_valid, size_t n_total,
                                                  float scale, float m_in, float *max_out);
#endif
#ifdef SELFATTN_HAVE_AVX512_KERNELS
SA_HIDDEN float sa_f32_softmax_exp_avx512_u64(float *row, size_t n_valid, size_t n_total,
                                              float scale, float *max_out);
SA_HIDDEN float sa_f32_softmax_exp_above_avx512_u64(float *row, size_t n_valid, size_t n_total,
                                                    float scale, float m_in, float *max_out);
#endif

/* ---- 16-bit storage (f16: IEEE binary16; bf16: bfloat16) ---- */
/* Array conversions, round to nearest with ties to even (half-scalar.h is the reference, bit for
   bit): to float32 exact; from float32, values past the 16-bit range become +-inf, NaN stays a
   quiet NaN. */
typedef void (*sa_x16_to_f32_fn)(const uint16_t *src, float *dst, size_t n);
typedef void (*sa_f32_to_x16_fn)(const float *src, uint16_t *dst, size_t n);
/* The small-M products with K (qkt) or V (pv) stored in 16 bits, converted as they stream in;
   the contract of sa_f32_qkt_fn / sa_f32_pv_fn otherwise (ldk, ldv in elements). */
typedef void (*sa_x16_qkt_fn)(size_t m, size_t n, size_t d, const float *q, size_t ldq,
                              const uint16_t *k, size_t ldk, float *s, size_t lds);
typedef void (*sa_x16_pv_fn)(size_t m, size_t n, size_t d, const float *p, size_t ldp,
                             const uint16_t *v, size_t ldv, float *o, size_t ldo);
SA_HIDDEN void sa_f16_to_f32_scalar(const uint16_t *src, float *dst, size_t n);
SA_HIDDEN void sa_bf16_to_f32_scalar(const uint16_t *src, float *dst, size_t n);
SA_HIDDEN void sa_f32_to_f16_scalar(const float *src, uint16_t *dst, size_t n);
SA_HIDDEN void sa_f32_to_bf16_scalar(const float *src, uint16_t *dst, size_t n);
SA_HIDDEN void sa_f16_qkt_scalar_g8(size_t m, size_t n, size_t d, const float *q, size_t ldq,
                                    const uint16_t *k, size_t ldk, float *s, size_t lds);
SA_HIDDEN void sa_bf16_qkt_scalar_g8(size_t m, size_t n, size_t d, const float *q, size_t ldq,
                                     const uint16_t *k, size_t ldk, float *s, size_t lds);
SA_HIDDEN void sa_f16_pv_scalar_g8(size_t m, size_t n, size_t d, const float *p, size_t ldp,
                                   const uint16_t *v, size_t ldv, float *o, size_t ldo);
SA_HIDDEN void sa_bf16_pv_scalar_g8(size_t m, size_t n, size_t d, const float *p, size_t ldp,
                                    const uint16_t *v, size_t ldv, float *o, size_t ldo);
#ifdef SELFATTN_HAVE_AVX2_KERNELS
SA_HIDDEN void sa_f16_to_f32_avx2(const uint16_t *src, float *dst, size_t n);
SA_HIDDEN void sa_bf16_to_f32_avx2(const uint16_t *src, float *dst, size_t n);
SA_HIDDEN void sa_f32_to_f16_avx2(const float *src, uint16_t *dst, size_t n);
SA_HIDDEN void sa_f32_to_bf16_avx2(const float *src, uint16_t *dst, size_t n);
SA_HIDDEN void sa_f16_qkt_avx2_g8(size_t m, size_t n, size_t d, const float *q, size_t ldq,
                                  const uint16_t *k, size_t ldk, float *s, size_t lds);
SA_HIDDEN void sa_bf16_qkt_avx2_g8(size_t m, size_t n, size_t d, const float *q, size_t ldq,
                                   const uint16_t *k, size_t ldk, float *s, size_t lds);
SA_HIDDEN void sa_f16_pv_avx2_g8(size_t m, size_t n, size_t d, const float *p, size_t ldp,
                                 const uint16_t *v, size_t ldv, float *o, size_t ldo);
SA_HIDDEN void sa_bf16_pv_avx2_g8(size_t m, size_t n, size_t d, const float *p, size_t ldp,
                                  const uint16_t *v, size_t ldv, float *o, size_t ldo);
#endif
#ifdef SELFATTN_HAVE_AVX512_KERNELS
SA_HIDDEN void sa_f16_qkt_avx512_g8(size_t m, size_t n, size_t d, const float *q, size_t ldq,
                                    const uint16_t *k, size_t ldk, float *s, size_t lds);
SA_HIDDEN void sa_bf16_qkt_avx512_g8(size_t m, size_t n, size_t d, const float *q, size_t ldq,
                                     const uint16_t *k, size_t ldk, float *s, size_t lds);
SA_HIDDEN void sa_f16_pv_avx512_g8(size_t m, size_t n, size_t d, const float *p, size_t ldp,
                                   const uint16_t *v, size_t ldv, float *o, size_t ldo);
SA_HIDDEN void sa_bf16_pv_avx512_g8(size_t m, size_t n, size_t d, const float *p, size_t ldp,
                                    const uint16_t *v, size_t ldv, float *o, size_t ldo);
#endif

#endif /* SELFATTN_KERNELS_H */
