/* Helpers shared by the tests: a seeded generator, random layers built both as a library handle
   and as a float64 reference description, and error measures. */
#ifndef SELFATTN_TESTUTIL_H
#define SELFATTN_TESTUTIL_H

#include <stddef.h>
#include <stdint.h>

#include "reference.h"
#include "selfattn/selfattn.h"

typedef struct tu_rng {
    uint64_t s;
} tu_rng;

double tu_uniform(tu_rng *r); /* [0, 1) */
void tu_fill(tu_rng *r, float *p, size_t n, float lo, float hi);
float *tu_random(tu_rng *r, size_t n, float lo, float hi); /* malloc'd */

/* f rounded to IEEE binary16 / bfloat16, ties to even, as a float (+-inf past the range, NaN
   kept): computed in double from the formats' significand widths, independently of the
   library's bit-level conversions. */
float tu_round_f16(float f);
float tu_round_bf16(float f);
/* The same for a dtype (0 F32: f itself, 1 F16, 2 BF16), and every element of an array. */
float tu_round(int dtype, float f);
void tu_round_all(int dtype, float *p, size_t n);

/* What a test layer looks like. head_dim 0 = default. */
typedef struct tu_spec {
    int d_model, n_heads, n_kv_heads, head_dim;
    int causal, out_proj, packed, biases, threads;
    float scale; /* 0 = default */
} tu_spec;

typedef struct tu_layer {
    selfattn_layer *layer;
    ref_layer ref;
    float *w[8]; /* wq wk wv wo bq bk bv bo (NULL when unused) */
    float *wqkv, *bqkv;
} tu_layer;

/* Builds both views of one random layer; returns the status of the first failing library call. */
selfattn_status tu_layer_make(const tu_spec *s, uint64_t seed, tu_layer *out);
/* The same with SELFATTN_OPT_WEIGHT_DTYPE set to weight_dtype (1.3; 0 F32) before the weights:
   the reference's weights are rounded to it by the test's own rounding (biases stay float32). */
selfattn_status tu_layer_make_typed(const tu_spec *s, uint64_t seed, int weight_dtype,
                                    tu_layer *out);
/* The same with SELFATTN_OPT_V_HEAD_DIM set to v_head_dim (1.3; 0: the default, head_dim) after
   HEAD_DIM; the reference's v_dim is the effective dv. */
selfattn_status tu_layer_make_v(const tu_spec *s, int v_head_dim, uint64_t seed, int weight_dtype,
                                tu_layer *out);
void tu_layer_free(tu_layer *t);
/* Sets the layer's score options from o (WINDOW, ALIBI, ROPE, ROPE_DIMS, SOFTCAP, ROPE_THETA; the
   0s of ref_opts are the library's defaults too); returns the status of the first failing call. */
selfattn_status tu_layer_set_opts(selfattn_layer *l, const ref_opts *o);

/* p[0..n) = v; whether every p[i] has v's bits (memcmp, so -0.0 and NaN payloads count). */
void tu_set(float *p, size_t n, float v);
int tu_all_equal(const float *p, size_t n, float v);
/* A multiple of 2^-bits in [-amp, amp): exact in float32 and in the products of a few. */
float tu_dyadic(tu_rng *r, int bits, double amp);

/* ---- Finite differences of the float64 reference ---- */

/* loss = sum dy . y over ref_forward_ex(l, o, batch, seq, x, lens) (y: its scratch output). */
typedef struct tu_fd_forward {
    const ref_layer *l;
    const ref_opts *o;
    int batch, seq;
    const float *x;
    const int32_t *lens;
    const float *dy;
    double *y;
} tu_fd_forward;
double tu_fd_forward_loss(const void *ctx);

/* loss = sum go . out over ref_attend_ex(l, o, batch, ql, kl, q, k, v, lens) (out: its scratch
   output, batch * ql * n_heads * dv). */
typedef struct tu_fd_attend {
    const ref_layer *l;
    const ref_opts *o;
    int batch, ql, kl;
    const float *q, *k, *v;
    const int32_t *lens;
    const float *go;
    double *out;
} tu_fd_attend;
double tu_fd_attend_loss(const void *ctx);

/* d loss / d p[i] for every i by central differences (p[i] +- 1e-3, restored after), against the
   analytic g: returns the largest |difference| and puts the largest |g[i]| in *scale. loss reads
   p through ctx. */
double tu_fd_error(float *p, size_t n, const double *g, double (*loss)(const void *ctx),
                   const void *ctx, double *scale);

/* The next forward_cached call of a decode of n_seq sequences x[s] [total][width]: sets n_new[s]
   (prompt[s] positions first, then one at a time, never past total; done[s] already fed), packs
   those rows into xin [n_seq][max_new][width] and returns max_new. */
int32_t tu_decode_step(int n_seq, const float *const *x, int width, int32_t total,
                       const int32_t *prompt, const int32_t *done, int32_t *n_new, float *xin);

/* Key lengths of the attend tests when lengths is set: kv_len, kv_len / 2, then 0 for
   sequences b = 0, 1, 2.. of batch; returns lens, or NULL (all kv_len) when lengths is 0. */
const int32_t *tu_key_lengths(int lengths, int batch, int kv_len, int32_t *lens);

#endif
