/* Float64 reference self-attention for the tests and for selfattn-run's self-check.
   Written from the textbook steps (project, score, mask, softmax, weighted sum, project) and
   sharing no code with the library. */
#ifndef SELFATTN_TEST_REFERENCE_H
#define SELFATTN_TEST_REFERENCE_H

#include <stddef.h>
#include <stdint.h>

typedef struct ref_layer {
    int d_model, n_heads, n_kv_heads, head_dim;
    int causal, out_proj;
    double scale;
    /* PyTorch layout [out][in]; biases may be NULL (zero) */
    const float *wq, *wk, *wv, *wo;
    const float *bq, *bk, *bv, *bo;
    /* 1.3: the value heads' width dv (0 = head_dim): wv [n_kv_heads*dv][d_model], wo
       [d_model][n_heads*dv]; honoured by the 1.1 functions (ref_attend_ex, ref_forward_ex and
       the gradients), where v is [..][n_kv_heads*dv] and out [..][n_heads*dv] */
    int v_dim;
} ref_layer;

/* y[r][o] = sum_i x[r][i] * w[o][i] + b[o], in double. */
void ref_linear(const float *x, int rows, int in, const float *w, const float *b, int out,
                double *y);
void ref_linear_d(const double *x, int rows, int in, const float *w, const float *b, int out,
                  double *y);

/* Attention for one sequence: q [q_len][n_heads*head_dim], k, v [kv_len][n_kv_heads*head_dim],
   keys at or past kv_valid masked, causal mask aligned bottom right; out [q_len][n_heads*hd]. */
void ref_attend_seq(const ref_layer *l, int q_len, int kv_len, const double *q, const double *k,
                    const double *v, int kv_valid, double *out);

/* Whole layer over a batch; padding rows (>= lengths[b]) are zeros. y [batch][L][d_model]. */
void ref_forward(const ref_layer *l, int batch, int seq_len, const float *x, const int32_t *lengths,
                 double *y);

/* Same for a single query row i of sequence b only (K and V of the whole sequence are computed). */
void ref_forward_row(const ref_layer *l, int seq_len, const float *x_seq, int length, int i,
                     double *y_row);

/* Attention over a batch of float tensors (converted to double here), as ref_attend_seq per
   sequence; kv_lengths may be NULL. */
void ref_attend(const ref_layer *l, int batch, int q_len, int kv_len, const float *q,
                const float *k, const float *v, const int32_t *kv_lengths, double *out);

/* ---- 1.1: windows, ALiBi, softcap, additive bias, rotary embeddings, weights and lse ---- */
typedef struct ref_opts {
    int window;      /* 0 = none */
    int alibi;       /* 0 or 1 */
    double softcap;  /* 0 = off */
    const float *bias; /* NULL, or element (b, h, i, j) at b*sb + h*sh + i*sr + j */
    int64_t sb, sh, sr;
    int rope;        /* 0, 1 (rotate-half), 2 (adjacent pairs) */
    int rope_dims;   /* 0 = head_dim */
    double rope_theta; /* 0 = 10000 */
} ref_opts;

/* ALiBi slopes of n heads, from the paper's description (Press et al. 2022, "Train Short, Test
   Long", and its reference code's rule for n not a power of two). */
void ref_alibi_slopes(int n, double *slopes);

/* Rotates the leading rope_dims dimensions of every head of one row of width n_heads * head_dim
   for position pos, as the API text defines it. */
void ref_rope_row(const ref_opts *o, int n_heads, int head_dim, double pos, double *row);

/* Attention over a batch with every 1.1 option; q, k, v float tensors as in ref_attend.
   out [batch][q_len][nq]; weights [batch][n_heads][q_len][kv_len] and lse [batch][n_heads][q_len]
   may be NULL. Query i is at position kv_len - q_len + i; rows that see no key give out 0,
   weights 0 and lse -inf. */
void ref_attend_ex(const ref_layer *l, const ref_opts *o, int batch, int q_len, int kv_len,
                   const float *q, const float *k, const float *v, const int32_t *kv_lengths,
                   double *out, double *weights, double *lse);

/* 1.3 causal alignment: in ref_attend_ex, ref_attend_backward and ref_scores, l->causal 2
   puts query i at position i (top-left) and 3 at kv_lengths[b] - q_len + i (bottom-right of the
   sequence's valid keys); 1 (and 0) at kv_len - q_len + i. Positions of ALiBi and the window
   follow. (The whole-layer references are meant with causal 0 or 1.) */

/* 1.3 scores out of one sequence b from double q [q_len][nq] and k [kv_len][nkv]:
   scores [n_heads][q_len][kv_len] at stage 0 ((q . k) scale), 1 (softcapped) or 2 (the final
   score, -inf at masked keys); keys at or past kv_valid -inf at every stage. */
void ref_scores(const ref_layer *l, const ref_opts *o, int b, int q_len, int kv_len,
                const double *q, const double *k, int kv_valid, int stage, double *scores);

/* The whole layer with every 1.1 option (RoPE after the Q/K projections); padding rows give
   y = 0, weights 0, lse -inf. */
void ref_forward_ex(const ref_layer *l, const ref_opts *o, int batch, int seq_len, const float *x,
                    const int32_t *lengths, double *y, double *weights, double *lse);

/* ---- Gradients, derived by hand and computed in double (checked against finite differences of
   ref_forward_ex / ref_attend_ex in test_backward.c). The bias of ref_opts is not supported. ---- */

/* Gradients of ref_attend_ex given dout (as q): dq, dk, dv (each the shape of its input; every
   element written). */
void ref_attend_backward(const ref_layer *l, const ref_opts *o, int batch, int q_len, int kv_len,
                         const float *q, const float *k, const float *v, const int32_t *kv_lengths,
                         const float *dout, double *dq, double *dk, double *dv);

/* Gradients of ref_forward_ex given dy: dx [batch][seq_len][d_model] and the weight gradients
   g[0..7] = W_Q, W_K, W_V, W_O, B_Q, B_K, B_V, B_O in the weights' layouts (g[3], g[7] unused
   without the output projection). Rows of padding: dx 0, dy not read. */
void ref_backward(const ref_layer *l, const ref_opts *o, int batch, int seq_len, const float *x,
                  const int32_t *lengths, const float *dy, double *dx, double *g[8]);

/* *err = max_i |a_i - b_i| (infinite when an a_i is NaN), *ref_max = max_i |b_i|. */
void ref_max_err(const float *a, const double *b, size_t n, double *err, double *ref_max);

#endif
