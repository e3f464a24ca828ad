/* The 1.1 score options and extras (window, ALiBi, softcap, additive bias with every broadcast
 * pattern, attention weights, log-sum-exp) through selfattn_attend_ex and selfattn_forward_ex,
 * against the float64 reference in reference.c, alone and combined with causal, GQA and lengths.
 *
 * Tolerances: outputs max|y - y_ref| <= 1e-4 max|y_ref| (the argument of test_numerics.c);
 * weights are probabilities in [0, 1] with float32 rounding of the scores and the kernel's 2e-6
 * relative exp error: |w - w_ref| <= 1e-5; lse is a log of a sum of float32 exps of float32 scores
 * of size up to ~10 (softcap, bias): |lse - lse_ref| <= 1e-4 (1 + |lse_ref|). Masked weights are
 * checked to be exactly 0. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "testutil.h"

#define TOL 1e-4
#define W_TOL 1e-5

enum { BIAS_NONE, BIAS_FULL, BIAS_QK, BIAS_HEADS, BIAS_KEYS, BIAS_KINDS };
static const char *bias_names[] = {"none", "[B][H][Q][K]", "[Q][K]", "[H][Q][K]", "[B][K]"};

typedef struct mcase {
    int heads, kv_heads, causal, window, alibi, lengths, bias;
    double softcap;
} mcase;

/* A bias of the given broadcast pattern over [batch][heads][q][k]: random values, some -inf. */
static float *make_bias(tu_rng *r, int kind, int batch, int heads, int q, int k, int64_t *sb,
                        int64_t *sh, int64_t *sr)
{
    int nb = batch, nh = heads, nq = q;
    *sb = (int64_t)heads * q * k;
    *sh = (int64_t)q * k;
    *sr = k;
    if (kind == BIAS_QK) {
        nb = nh = 1;
        *sb = *sh = 0;
    } else if (kind == BIAS_HEADS) {
        nb = 1;
        *sb = 0;
    } else if (kind == BIAS_KEYS) { /* a key-padding-style bias per sequence */
        nh = nq = 1;
        *sb = k;
        *sh = *sr = 0;
    }
    const size_t n = (size_t)nb * nh * nq * k;
    float *bias = tu_random(r, n, -2.0f, 2.0f);
    for (size_t i = 0; i < n; i++)
        if (tu_uniform(r) < 0.1)
            bias[i] = -INFINITY;
    return bias;
}

/* Extras asking for everything: the case's bias pattern drawn from r (none for BIAS_NONE), and
   room for the weights and lse of batch x heads x q rows over k keys. */
static void extras_make(selfattn_extras *e, tu_rng *r, int kind, int batch, int heads, int q, int k)
{
    memset(e, 0, sizeof *e);
    e->struct_size = sizeof *e;
    if (kind != BIAS_NONE)
        e->attn_bias = make_bias(r, kind, batch, heads, q, k, &e->bias_stride_batch,
                                 &e->bias_stride_head, &e->bias_stride_row);
    e->weights = malloc(sizeof(float) * (size_t)batch * heads * q * k);
    e->lse = malloc(sizeof(float) * (size_t)batch * heads * q);
}

static void extras_free(selfattn_extras *e)
{
    free((void *)e->attn_bias);
    free(e->weights);
    free(e->lse);
}

static int visible(const mcase *c, int len, int q_len, int kv_len, int i, int j)
{
    const long p = (long)kv_len - q_len + i;
    if (j >= len || (c->causal && j > p))
        return 0;
    if (c->window > 0 && (c->causal ? j <= p - c->window : labs(p - j) >= c->window))
        return 0;
    return 1;
}

static void set_options(selfattn_layer *l, const mcase *c)
{
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_WINDOW, c->window), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_ALIBI, c->alibi), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_float(l, SELFATTN_FOPT_SOFTCAP, c->softcap), SELFATTN_OK);
}

/* Compares out/weights/lse; returns the worst relative output error. */
static double compare(const mcase *c, int batch, int heads, int q_len, int kv_len,
                      const int32_t *lens, const float *y, const double *yr, size_t ny,
                      const float *w, const double *wr, const float *lse, const double *lr)
{
    double err, mx;
    ref_max_err(y, yr, ny, &err, &mx);
    assert_true(mx == 0.0 ? err == 0.0 : err <= TOL * mx);
    for (int b = 0; b < batch; b++)
        for (int h = 0; h < heads; h++)
            for (int i = 0; i < q_len; i++) {
                const size_t row = ((size_t)b * heads + h) * q_len + i;
                double sum = 0.0;
                for (int j = 0; j < kv_len; j++) {
                    const float wv = w[row * kv_len + j];
                    assert_true(fabs((double)wv - wr[row * kv_len + j]) <= W_TOL);
                    if (!visible(c, lens ? lens[b] : kv_len, q_len, kv_len, i, j))
                        assert_true(wv == 0.0f);
                    sum += wv;
                }
                if (isinf(lr[row])) {
                    assert_true(isinf(lse[row]) && lse[row] < 0);
                    assert_true(sum == 0.0);
                } else {
                    assert_true(fabs((double)lse[row] - lr[row]) <= TOL * (1.0 + fabs(lr[row])));
                    assert_true(fabs(sum - 1.0) <= 1e-5);
                }
            }
    return mx > 0 ? err / mx : err;
}

static void run_attend_case(const mcase *c, uint64_t seed, int Q)
{
    enum { B = 2, D = 8 };
    const int K = 13, H = c->heads;
    const tu_spec spec = {H * D, H, c->kv_heads, D, c->causal, 1, 0, 1, 2, 0};
    tu_layer t;
    assert_int_equal(tu_layer_make(&spec, seed, &t), SELFATTN_OK);
    set_options(t.layer, c);
    tu_rng r = {seed};
    const size_t nq = (size_t)H * D, nkv = (size_t)c->kv_heads * D;
    float *q = tu_random(&r, B * Q * nq, -1.5f, 1.5f), *k = tu_random(&r, B * K * nkv, -1.5f, 1.5f);
    float *v = tu_random(&r, B * K * nkv, -1, 1);
    const int32_t lens[B] = {K, 6};
    selfattn_extras e;
    extras_make(&e, &r, c->bias, B, H, Q, K);
    float *out = malloc(sizeof(float) * B * Q * nq);
    double *yr = malloc(sizeof(double) * B * Q * nq), *wr = malloc(sizeof(double) * B * H * Q * K);
    double *lr = malloc(sizeof(double) * B * H * Q);
    const int32_t *lp = c->lengths ? lens : NULL;
    assert_int_equal(selfattn_attend_ex(t.layer, B, Q, K, q, k, v, lp, &e, out), SELFATTN_OK);
    ref_opts o = {
        c->window,          c->alibi,          c->softcap, e.attn_bias, e.bias_stride_batch,
        e.bias_stride_head, e.bias_stride_row, 0,          0,           0};
    ref_attend_ex(&t.ref, &o, B, Q, K, q, k, v, lp, yr, wr, lr);
    compare(c, B, H, Q, K, lp, out, yr, B * Q * nq, e.weights, wr, e.lse, lr);
    free(q);
    free(k);
    free(v);
    free(out);
    extras_free(&e);
    free(yr);
    free(wr);
    free(lr);
    tu_layer_free(&t);
}

static void run_forward_case(const mcase *c, uint64_t seed, int rope, int rope_dims)
{
    enum { B = 2, D = 8 };
    const int L = 11, H = c->heads, dm = H * D;
    const tu_spec spec = {dm, H, c->kv_heads, D, c->causal, 1, 0, 1, 2, 0};
    tu_layer t;
    assert_int_equal(tu_layer_make(&spec, seed, &t), SELFATTN_OK);
    set_options(t.layer, c);
    assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_ROPE, rope), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_ROPE_DIMS, rope_dims), SELFATTN_OK);
    tu_rng r = {seed + 5};
    float *x = tu_random(&r, (size_t)B * L * dm, -1.5f, 1.5f);
    const int32_t lens[B] = {L, 4};
    selfattn_extras e;
    extras_make(&e, &r, c->bias, B, H, L, L);
    float *y = malloc(sizeof(float) * B * L * dm);
    double *yr = malloc(sizeof(double) * B * L * dm), *wr = malloc(sizeof(double) * B * H * L * L);
    double *lr = malloc(sizeof(double) * B * H * L);
    const int32_t *lp = c->lengths ? lens : NULL;
    assert_int_equal(selfattn_forward_ex(t.layer, B, L, x, lp, &e, y), SELFATTN_OK);
    ref_opts o = {
        c->window,          c->alibi,          c->softcap, e.attn_bias, e.bias_stride_batch,
        e.bias_stride_head, e.bias_stride_row, rope,       rope_dims,   0};
    ref_forward_ex(&t.ref, &o, B, L, x, lp, yr, wr, lr);
    compare(c, B, H, L, L, lp, y, yr, (size_t)B * L * dm, e.weights, wr, e.lse, lr);
    free(x);
    free(y);
    extras_free(&e);
    free(yr);
    free(wr);
    free(lr);
    tu_layer_free(&t);
}

/* Every option alone and in combination: window x causal x GQA x lengths x ALiBi x softcap x each
   bias pattern, through attend_ex and forward_ex. */
static void test_combinations(void **state)
{
    (void)state;
    int n = 0;
    for (int causal = 0; causal <= 1; causal++)
        for (int window = 0; window <= 4; window += 4)
            for (int gqa = 0; gqa <= 1; gqa++)
                for (int lengths = 0; lengths <= 1; lengths++)
                    for (int alibi = 0; alibi <= 1; alibi++)
                        for (int cap = 0; cap <= 1; cap++)
                            for (int bias = 0; bias < BIAS_KINDS; bias++) {
                                const mcase c = {4, gqa ? 2 : 4, causal, window, alibi, lengths,
                                                 bias, cap ? 1.5 : 0.0};
                                run_attend_case(&c, 100 + (uint64_t)n, 9);
                                /* one query: a task takes a whole GQA group (stacked heads) */
                                run_attend_case(&c, 200 + (uint64_t)n, 1);
                                run_forward_case(&c, 300 + (uint64_t)n, n % 3, n % 5 == 0 ? 4 : 0);
                                n++;
                            }
    printf("  %d combinations (bias patterns: %s, %s, %s, %s, %s), attend_ex (9 queries and 1) and "
           "forward_ex\n",
           n,
           bias_names[0], bias_names[1], bias_names[2], bias_names[3], bias_names[4]);
}

/* ALiBi slopes for 8 and 12 heads, read back from the weights: with q = 0 every raw score is 0,
   so for the last query over two keys w0 / w1 = exp(-slope). 8 heads must give 1/2 ... 1/256
   (the paper's example); 12 heads the 8-head slopes then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5. */
static void test_alibi_slopes(void **state)
{
    (void)state;
    for (int n = 8; n <= 12; n += 4) {
        selfattn_layer *l;
        assert_int_equal(selfattn_layer_create(n * 4, n, &l), SELFATTN_OK);
        assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_ALIBI, 1), SELFATTN_OK);
        assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_CAUSAL, 1), SELFATTN_OK);
        float q[48] = {0}, k[2 * 48] = {0}, v[2 * 48] = {0}, out[48], w[12 * 2];
        selfattn_extras e;
        memset(&e, 0, sizeof e);
        e.struct_size = sizeof e;
        e.weights = w;
        assert_int_equal(selfattn_attend_ex(l, 1, 1, 2, q, k, v, NULL, &e, out), SELFATTN_OK);
        double ref[12];
        ref_alibi_slopes(n, ref);
        for (int h = 0; h < n; h++) {
            const double got = -log((double)w[2 * h] / (double)w[2 * h + 1]);
            const double want = h < 8 ? pow(2.0, -(h + 1)) : pow(2.0, -0.5 - (h - 8));
            assert_true(fabs(got - want) <= 1e-5);
            assert_true(fabs(ref[h] - want) <= 1e-12); /* the reference agrees with the paper */
        }
        selfattn_layer_destroy(l);
    }
}

/* A bias row that is all -inf: that row's output 0, weights 0, lse -inf, never NaN; in the
   forward its y row is b_O. */
static void test_all_masked_rows(void **state)
{
    (void)state;
    enum { H = 2, D = 4, L = 5 };
    const tu_spec spec = {H * D, H, 0, 0, 0, 1, 0, 1, 1, 0};
    tu_layer t;
    assert_int_equal(tu_layer_make(&spec, 21, &t), SELFATTN_OK);
    tu_rng r = {22};
    float *x = tu_random(&r, L * H * D, -1, 1), y[L * H * D], w[H * L * L], lse[H * L];
    float bias[L * L] = {0};
    for (int j = 0; j < L; j++)
        bias[2 * L + j] = -INFINITY; /* row 2 sees nothing */
    bias[4 * L + 1] = -INFINITY;     /* row 4 does not see key 1: its weight is exactly 0 */
    selfattn_extras e = {sizeof e, bias, 0, 0, L, w, lse, NULL, 0};
    assert_int_equal(selfattn_forward_ex(t.layer, 1, L, x, NULL, &e, y), SELFATTN_OK);
    for (int c = 0; c < H * D; c++)
        assert_true(y[2 * H * D + c] == t.w[7][c]); /* b_O */
    for (int h = 0; h < H; h++) {
        assert_true(isinf(lse[h * L + 2]) && lse[h * L + 2] < 0);
        for (int j = 0; j < L; j++)
            assert_true(w[(h * L + 2) * L + j] == 0.0f);
    }
    for (int i = 0; i < L * H * D; i++)
        assert_false(isnan(y[i]));
    for (int h = 0; h < H; h++)
        assert_true(w[(h * L + 4) * L + 1] == 0.0f && w[(h * L + 4) * L + 0] > 0.0f);
    free(x);
    tu_layer_free(&t);
}

/* Attend over two disjoint key halves, merge with their lse, compare with attend over all keys. */
static void test_lse_merge(void **state)
{
    (void)state;
    enum { B = 2, H = 4, KV = 2, D = 16, Q = 7, K = 40 };
    for (int keyed = 0; keyed <= 1; keyed++) {
        selfattn_layer *l;
        assert_int_equal(selfattn_layer_create(H * D, H, &l), SELFATTN_OK);
        assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_N_KV_HEADS, KV), SELFATTN_OK);
        tu_rng r = {31};
        const int nq = H * D, nkv = KV * D, half = K / 2;
        float *q = tu_random(&r, B * Q * nq, -1, 1), *k = tu_random(&r, B * K * nkv, -1, 1);
        float *v = tu_random(&r, B * K * nkv, -1, 1);
        float *k1 = malloc(sizeof(float) * B * half * nkv), *v1 = malloc(sizeof(float) * B * half * nkv);
        float *k2 = malloc(sizeof(float) * B * half * nkv), *v2 = malloc(sizeof(float) * B * half * nkv);
        for (int b = 0; b < B; b++) {
            memcpy(k1 + b * half * nkv, k + b * K * nkv, sizeof(float) * half * nkv);
            memcpy(v1 + b * half * nkv, v + b * K * nkv, sizeof(float) * half * nkv);
            memcpy(k2 + b * half * nkv, k + (b * K + half) * nkv, sizeof(float) * half * nkv);
            memcpy(v2 + b * half * nkv, v + (b * K + half) * nkv, sizeof(float) * half * nkv);
        }
        /* a bias view standing in for what the split changes (ALiBi would see other positions):
           an additive bias per key, indexed by the chunk's own key numbering */
        float *bias = tu_random(&r, K, -1, 1);
        float *o_all = malloc(sizeof(float) * B * Q * nq), *o1 = malloc(sizeof(float) * B * Q * nq);
        float *o2 = malloc(sizeof(float) * B * Q * nq);
        float l1[B * H * Q], l2[B * H * Q];
        selfattn_extras e_all = {sizeof e_all, keyed ? bias : NULL, 0, 0, 0, NULL, NULL, NULL, 0};
        selfattn_extras e1 = {sizeof e1, keyed ? bias : NULL, 0, 0, 0, NULL, l1, NULL, 0};
        selfattn_extras e2 = {sizeof e2, keyed ? bias + half : NULL, 0, 0, 0, NULL, l2, NULL, 0};
        assert_int_equal(selfattn_attend_ex(l, B, Q, K, q, k, v, NULL, &e_all, o_all), SELFATTN_OK);
        assert_int_equal(selfattn_attend_ex(l, B, Q, half, q, k1, v1, NULL, &e1, o1), SELFATTN_OK);
        assert_int_equal(selfattn_attend_ex(l, B, Q, half, q, k2, v2, NULL, &e2, o2), SELFATTN_OK);
        double err = 0, mx = 0;
        for (int b = 0; b < B; b++)
            for (int i = 0; i < Q; i++)
                for (int h = 0; h < H; h++) {
                    const double a = l1[(b * H + h) * Q + i], c = l2[(b * H + h) * Q + i];
                    const double m = fmax(a, c), lse = m + log(exp(a - m) + exp(c - m));
                    for (int d = 0; d < D; d++) {
                        const size_t at = ((size_t)b * Q + i) * nq + h * D + d;
                        const double merged = exp(a - lse) * o1[at] + exp(c - lse) * o2[at];
                        err = fmax(err, fabs(merged - o_all[at]));
                        mx = fmax(mx, fabs(o_all[at]));
                    }
                }
        printf("  lse merge of two key halves%s: max err %.2e of max %.2e\n",
               keyed ? " (with a key bias)" : "", err, mx);
        assert_true(err <= 1e-5 * mx);
        free(q);
        free(k);
        free(v);
        free(k1);
        free(v1);
        free(k2);
        free(v2);
        free(bias);
        free(o_all);
        free(o1);
        free(o2);
        selfattn_layer_destroy(l);
    }
}

/* A NaN in one bias entry reaches only the rows that read it; at a masked key it has no effect. */
static void test_nan_bias_is_local(void **state)
{
    (void)state;
    enum { H = 2, D = 4, L = 8 };
    const tu_spec spec = {H * D, H, 0, 0, 1, 1, 0, 1, 1, 0};
    tu_layer t;
    assert_int_equal(tu_layer_make(&spec, 41, &t), SELFATTN_OK);
    tu_rng r = {42};
    float *x = tu_random(&r, 2 * L * H * D, -1, 1), y[2 * L * H * D], y0[2 * L * H * D];
    float bias[L * L] = {0};
    selfattn_extras e = {sizeof e, bias, 0, 0, L, NULL, NULL, NULL, 0};
    assert_int_equal(selfattn_forward_ex(t.layer, 2, L, x, NULL, &e, y0), SELFATTN_OK);
    bias[3 * L + 6] = NAN; /* key 6 of row 3: causal future, masked */
    assert_int_equal(selfattn_forward_ex(t.layer, 2, L, x, NULL, &e, y), SELFATTN_OK);
    assert_memory_equal(y, y0, sizeof y);
    bias[5 * L + 2] = NAN; /* key 2 of row 5: visible */
    assert_int_equal(selfattn_forward_ex(t.layer, 2, L, x, NULL, &e, y), SELFATTN_OK);
    for (int b = 0; b < 2; b++)
        for (int i = 0; i < L; i++)
            for (int c = 0; c < H * D; c++) {
                const float v = y[(b * L + i) * H * D + c];
                if (i == 5)
                    assert_true(isnan(v));
                else
                    assert_true(v == y0[(b * L + i) * H * D + c]);
            }
    free(x);
    tu_layer_free(&t);
}

/* Bad extras and options: exact statuses, outputs untouched, options unchanged. */
static void test_bad_input(void **state)
{
    (void)state;
    enum { H = 2, D = 4, L = 6 };
    const tu_spec spec = {H * D, H, 0, 0, 1, 1, 0, 1, 1, 0};
    tu_layer t;
    assert_int_equal(tu_layer_make(&spec, 51, &t), SELFATTN_OK);
    tu_rng r = {52};
    float *x = tu_random(&r, L * H * D, -1, 1);
    float y[L * H * D], w[H * L * L], lse[H * L], bias[L * L] = {0};
    struct {
        selfattn_extras e;
        unsigned char tail[16];
    } big;
    for (int round = 0; round < 6; round++) {
        for (int i = 0; i < L * H * D; i++)
            y[i] = 77.0f;
        for (int i = 0; i < H * L * L; i++)
            w[i] = 77.0f;
        for (int i = 0; i < H * L; i++)
            lse[i] = 77.0f;
        memset(&big, 0, sizeof big);
        selfattn_extras *e = &big.e;
        *e = (selfattn_extras){sizeof *e, bias, 0, 0, L, w, lse, NULL, 0};
        selfattn_status want = SELFATTN_ERR_INVALID;
        switch (round) {
        case 0: /* below the 1.1 struct (1.3 grew it: a 1.1 size is valid) */
            e->struct_size = offsetof(selfattn_extras, scores) - 1;
            break;
        case 1:
            e->struct_size = 0;
            break;
        case 2:
            e->struct_size = sizeof big;
            big.tail[7] = 1;
            want = SELFATTN_ERR_UNSUPPORTED;
            break;
        case 3:
            e->bias_stride_row = -L;
            break;
        case 4:
            e->bias_stride_head = -1;
            break;
        case 5:
            e->bias_stride_batch = INT64_MAX / 2;
            e->bias_stride_head = INT64_MAX / 2;
            want = SELFATTN_ERR_OVERFLOW;
            break;
        }
        assert_int_equal(selfattn_forward_ex(t.layer, 1, L, x, NULL, e, y), want);
        float q[L * H * D] = {0};
        assert_int_equal(selfattn_attend_ex(t.layer, 1, L, L, q, q, q, NULL, e, y), want);
        for (int i = 0; i < L * H * D; i++)
            assert_true(y[i] == 77.0f);
        for (int i = 0; i < H * L * L; i++)
            assert_true(w[i] == 77.0f);
        for (int i = 0; i < H * L; i++)
            assert_true(lse[i] == 77.0f);
    }
    /* a newer caller's larger struct with zero tail bytes is fine */
    memset(&big, 0, sizeof big);
    big.e = (selfattn_extras){sizeof big, NULL, 0, 0, 0, w, NULL, NULL, 0};
    assert_int_equal(selfattn_forward_ex(t.layer, 1, L, x, NULL, &big.e, y), SELFATTN_OK);

    /* float options: non-finite and out of range values change nothing */
    const double bad[][2] = {{SELFATTN_FOPT_SCALE, NAN},       {SELFATTN_FOPT_SCALE, INFINITY},
                             {SELFATTN_FOPT_SCALE, 1e300},     {SELFATTN_FOPT_SOFTCAP, -1.0},
                             {SELFATTN_FOPT_SOFTCAP, NAN},     {SELFATTN_FOPT_SOFTCAP, -INFINITY},
                             {SELFATTN_FOPT_ROPE_THETA, -5.0}, {SELFATTN_FOPT_ROPE_THETA, INFINITY},
                             {4, 1.0},                         {0, 1.0}};
    double before[3], after[3];
    assert_int_equal(selfattn_layer_set_float(t.layer, SELFATTN_FOPT_SOFTCAP, 2.5), SELFATTN_OK);
    for (int o = 0; o < 3; o++)
        assert_int_equal(selfattn_layer_get_float(t.layer, (selfattn_float_option)(o + 1), &before[o]),
                         SELFATTN_OK);
    assert_true(before[0] == (double)(float)(1.0 / 2.0)); /* 1/sqrt(head_dim 4), resolved */
    assert_true(before[1] == 10000.0 && before[2] == 2.5);
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_int_equal(selfattn_layer_set_float(t.layer, (selfattn_float_option)bad[i][0], bad[i][1]),
                         SELFATTN_ERR_INVALID);
    for (int o = 0; o < 3; o++) {
        assert_int_equal(selfattn_layer_get_float(t.layer, (selfattn_float_option)(o + 1), &after[o]),
                         SELFATTN_OK);
        assert_true(after[o] == before[o]);
    }
    double v;
    assert_int_equal(selfattn_layer_get_float(t.layer, (selfattn_float_option)4, &v),
                     SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_set_float(NULL, SELFATTN_FOPT_SCALE, 1.0), SELFATTN_ERR_NULL);
    assert_int_equal(selfattn_layer_get_float(t.layer, SELFATTN_FOPT_SCALE, NULL), SELFATTN_ERR_NULL);
    free(x);
    tu_layer_free(&t);
}

/* A long windowed causal forward: only O(L w) work, and it matches the reference on sampled
   rows (the reference computes whole sequences, so this uses a moderate length). */
static void test_window_long(void **state)
{
    (void)state;
    enum { H = 2, D = 8, L = 700, W = 37 };
    const tu_spec spec = {H * D, H, 0, 0, 1, 1, 0, 1, 2, 0};
    for (int causal = 0; causal <= 1; causal++) {
        tu_spec s = spec;
        s.causal = causal;
        tu_layer t;
        assert_int_equal(tu_layer_make(&s, 61, &t), SELFATTN_OK);
        assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_WINDOW, W), SELFATTN_OK);
        tu_rng r = {62};
        float *x = tu_random(&r, (size_t)L * H * D, -1, 1);
        float *y = malloc(sizeof(float) * L * H * D);
        double *yr = malloc(sizeof(double) * L * H * D);
        assert_int_equal(selfattn_forward(t.layer, 1, L, x, NULL, y), SELFATTN_OK);
        ref_opts o = {W, 0, 0, NULL, 0, 0, 0, 0, 0, 0};
        ref_forward_ex(&t.ref, &o, 1, L, x, NULL, yr, NULL, NULL);
        double err, mx;
        ref_max_err(y, yr, (size_t)L * H * D, &err, &mx);
        assert_true(err <= TOL * mx);
        free(x);
        free(y);
        free(yr);
        tu_layer_free(&t);
    }
}

/* RoPE over rows that span several of the rotation's exact re-evaluations (every 32 rows of a
   run; the angles stepped from row to row in between) and more pairs than one chunk of 32 (head_dim
   80, 72 of them rotating: 36 pairs), both modes, two sequences (one padded), two threads (whose
   row ranges start mid-sequence): the forward against the float64 reference, which takes a cos and
   a sin per pair and row. */
static void test_rope_long_rows(void **state)
{
    (void)state;
    enum { B = 2, D = 80, H = 2, L = 75 };
    const int32_t lens[B] = {L, 40};
    for (int rope = 1; rope <= 2; rope++) {
        const tu_spec spec = {H * D, H, 1, D, 1, 1, 0, 1, 2, 0};
        tu_layer t;
        assert_int_equal(tu_layer_make(&spec, 700 + (uint64_t)rope, &t), SELFATTN_OK);
        assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_ROPE, rope), SELFATTN_OK);
        assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_ROPE_DIMS, 72), SELFATTN_OK);
        tu_rng r = {710 + (uint64_t)rope};
        const size_t n = (size_t)B * L * H * D;
        float *x = tu_random(&r, n, -1.5f, 1.5f), *y = malloc(sizeof(float) * n);
        double *yr = malloc(sizeof(double) * n);
        assert_int_equal(selfattn_forward(t.layer, B, L, x, lens, y), SELFATTN_OK);
        const ref_opts o = {0, 0, 0.0, NULL, 0, 0, 0, rope, 72, 0};
        ref_forward_ex(&t.ref, &o, B, L, x, lens, yr, NULL, NULL);
        double err, mx;
        ref_max_err(y, yr, n, &err, &mx);
        printf("  rope %d, %d rows, 36 pairs: max err %.3e (max |y| %.3e)\n", rope, L, err, mx);
        assert_true(mx > 0.0 && err <= TOL * mx);
        free(x);
        free(y);
        free(yr);
        tu_layer_free(&t);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_combinations),   cmocka_unit_test(test_alibi_slopes),
        cmocka_unit_test(test_all_masked_rows), cmocka_unit_test(test_lse_merge),
        cmocka_unit_test(test_nan_bias_is_local), cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_window_long),    cmocka_unit_test(test_rope_long_rows),
    };
    printf("softmax kernel: %s\n", selfattn_kernel_name());
    return cmocka_run_group_tests(tests, NULL, NULL);
}
