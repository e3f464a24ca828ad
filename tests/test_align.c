/* 1.3: causal alignment (SELFATTN_OPT_CAUSAL 2 = top-left, 3 = bottom-right of each sequence's
 * valid keys) and the scores out (selfattn_extras.scores at stages 0, 1, 2).
 *
 * attend_ex and attend_backward against the float64 reference (reference.c, whose causal 2 and 3
 * put query i at position i and at kv_lengths[b] - q_len + i) for every alignment x q_len below,
 * equal to and above kv_len (few rows and several query blocks) x lengths x window x ALiBi x GQA,
 * with a softcap and a bias in some cases, and each scores stage. Keys that no query of a sequence
 * sees are never read by attend (NaN there changes no bit: no block reaching only them is
 * computed), and get zero dk, dv. The layer's
 * entry points (forward_ex, backward, the train state, the cache) give the same bits with 2 and 3
 * as with 1. forward_ex's scores against the reference's projections. Bad values: INVALID and
 * nothing written; the struct_size rule for a 1.1 caller and one that stops between the new fields.
 *
 * Tolerances as test_masks.c and test_backward.c: outputs and gradients max|e| <= 1e-4 max|ref|,
 * weights 1e-5, lse 1e-4 (1 + |lse|). Scores are float32 dot products of 8 terms of size <= 2
 * (scaled), plus ALiBi terms up to ~40 and a bias: |s - s_ref| <= 1e-5 (1 + |s_ref|); -INFINITY
 * exactly where the reference has it. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "testutil.h"

#define TOL 1e-4
#define W_TOL 1e-5
#define S_TOL 1e-5
#define B 2
#define D 8
#define SENT 77.0f

typedef struct acase {
    int align, heads, kv_heads, q_len, kv_len, lengths, window, alibi, bias;
    double softcap;
} acase;

/* The API text's rule, written out here: the position of query i of a sequence of len keys. */
static long a_pos(const acase *c, int len, int i)
{
    if (c->align == 2)
        return i;
    if (c->align == 3)
        return (long)len - c->q_len + i;
    return (long)c->kv_len - c->q_len + i;
}

static int a_visible(const acase *c, int len, int i, int j)
{
    const long p = a_pos(c, len, i);
    if (j >= len || (c->align && j > p))
        return 0;
    if (c->window > 0 && (c->align ? j <= p - c->window : labs(p - j) >= c->window))
        return 0;
    return 1;
}

static int a_len(const acase *c, const int32_t *lens, int b)
{
    return lens != NULL ? lens[b] : c->kv_len;
}

static double *to_double(const float *p, size_t n)
{
    double *d = malloc(sizeof(double) * (n ? n : 1));
    for (size_t i = 0; i < n; i++)
        d[i] = p[i];
    return d;
}

static void check_scores(const float *s, const double *ref, size_t n, const char *what)
{
    for (size_t e = 0; e < n; e++) {
        const int ok = isinf(ref[e]) ? (isinf(s[e]) && s[e] < 0)
                                     : fabs((double)s[e] - ref[e]) <= S_TOL * (1.0 + fabs(ref[e]));
        if (!ok) {
            print_error("%s: score %zu is %g, reference %g\n", what, e, (double)s[e], ref[e]);
            fail();
        }
    }
}

/* NaN in K and V rows that no query row of their sequence sees (below the length): such rows
   must never be read. Returns how many rows were poisoned. */
static int poison_unseen(const acase *c, const int32_t *lens, float *k, float *v)
{
    const int nkv = c->kv_heads * D;
    int n = 0;
    for (int b = 0; b < B; b++)
        for (int j = 0; j < a_len(c, lens, b); j++) {
            int seen = 0;
            for (int i = 0; i < c->q_len && !seen; i++)
                seen = a_visible(c, a_len(c, lens, b), i, j);
            if (seen)
                continue;
            n++;
            for (int d = 0; d < nkv; d++)
                k[((size_t)b * c->kv_len + j) * nkv + d] = v[((size_t)b * c->kv_len + j) * nkv + d] =
                    NAN;
        }
    return n;
}

static void attend_case(const acase *c, uint64_t seed, int stage)
{
    const int H = c->heads, Q = c->q_len, K = c->kv_len;
    const tu_spec spec = {H * D, H, c->kv_heads, D, c->align, 1, 0, 0, 2, 0};
    tu_layer t;
    assert_int_equal(tu_layer_make(&spec, seed, &t), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_WINDOW, c->window), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_ALIBI, c->alibi), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_float(t.layer, SELFATTN_FOPT_SOFTCAP, c->softcap),
                     SELFATTN_OK);
    tu_rng r = {seed};
    const size_t nq = (size_t)H * D, nkv = (size_t)c->kv_heads * D;
    const size_t nqe = (size_t)B * Q * nq, nke = (size_t)B * K * nkv;
    const size_t nw = (size_t)B * H * Q * K, nl = (size_t)B * H * Q;
    float *q = tu_random(&r, nqe, -1.5f, 1.5f), *k = tu_random(&r, nke, -1.5f, 1.5f);
    float *v = tu_random(&r, nke, -1, 1), *dout = tu_random(&r, nqe, -1, 1);
    const int32_t lens[B] = {K, c->lengths == 2 ? 0 : K / 3}; /* lengths 2: one empty */
    const int32_t *lp = c->lengths ? lens : NULL;
    float *bias = NULL;
    if (c->bias) {
        bias = tu_random(&r, nw, -1, 1);
        for (size_t e = 0; e < nw; e++)
            if (tu_uniform(&r) < 0.1)
                bias[e] = -INFINITY;
    }
    selfattn_extras e;
    memset(&e, 0, sizeof e);
    e.struct_size = sizeof e;
    e.attn_bias = bias;
    e.bias_stride_batch = (int64_t)H * Q * K;
    e.bias_stride_head = (int64_t)Q * K;
    e.bias_stride_row = K;
    e.weights = malloc(nw * sizeof(float));
    e.lse = malloc(nl * sizeof(float));
    e.scores = malloc(nw * sizeof(float));
    e.scores_stage = stage;
    float *out = malloc(nqe * sizeof(float));
    assert_int_equal(selfattn_attend_ex(t.layer, B, Q, K, q, k, v, lp, &e, out), SELFATTN_OK);

    double *yr = malloc(sizeof(double) * nqe), *wr = malloc(sizeof(double) * nw);
    double *lr = malloc(sizeof(double) * nl), *sr = malloc(sizeof(double) * nw);
    const ref_opts o = {c->window, c->alibi, c->softcap, bias, e.bias_stride_batch,
                        e.bias_stride_head, e.bias_stride_row, 0, 0, 0};
    ref_attend_ex(&t.ref, &o, B, Q, K, q, k, v, lp, yr, wr, lr);
    double *qd = to_double(q, nqe), *kd = to_double(k, nke);
    for (int b = 0; b < B; b++)
        ref_scores(&t.ref, &o, b, Q, K, qd + (size_t)b * Q * nq, kd + (size_t)b * K * nkv,
                   a_len(c, lp, b), stage, sr + (size_t)b * H * Q * K);
    double err, mx;
    ref_max_err(out, yr, nqe, &err, &mx);
    if (!(mx == 0.0 ? err == 0.0 : err <= TOL * mx)) {
        print_error("align %d q %d kv %d lengths %d window %d alibi %d gqa %d/%d: out error %g of "
                    "%g\n",
                    c->align, Q, K, c->lengths, c->window, c->alibi, H, c->kv_heads, err, mx);
        fail();
    }
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < Q; i++) {
                const size_t row = ((size_t)b * H + h) * Q + i;
                int any = 0;
                for (int j = 0; j < K; j++) {
                    const float wv = e.weights[row * K + j];
                    assert_true(fabs((double)wv - wr[row * K + j]) <= W_TOL);
                    if (!a_visible(c, a_len(c, lp, b), i, j))
                        assert_true(wv == 0.0f);
                    else
                        any = 1;
                }
                if (isinf(lr[row])) {
                    assert_true(isinf(e.lse[row]) && e.lse[row] < 0);
                    for (int d = 0; d < D; d++) /* sees no key: zeros */
                        assert_true(out[((size_t)b * Q + i) * nq + h * D + d] == 0.0f);
                } else {
                    assert_true(any);
                    assert_true(fabs((double)e.lse[row] - lr[row]) <= TOL * (1.0 + fabs(lr[row])));
                }
            }
    check_scores(e.scores, sr, nw, "attend_ex scores");

    /* keys no query sees are never read: NaN there changes no bit (no block reaches them) */
    float *k2 = malloc(nke * sizeof(float)), *v2 = malloc(nke * sizeof(float));
    memcpy(k2, k, nke * sizeof(float));
    memcpy(v2, v, nke * sizeof(float));
    float *out2 = malloc(nqe * sizeof(float));
    if (poison_unseen(c, lp, k2, v2) > 0) {
        selfattn_extras e2 = e;
        e2.scores = NULL; /* stages 0 and 1 read every key below the length */
        assert_int_equal(selfattn_attend_ex(t.layer, B, Q, K, q, k2, v2, lp, &e2, out2),
                         SELFATTN_OK);
        assert_memory_equal(out, out2, nqe * sizeof(float));
    }

    /* the backward (no bias: it takes none) */
    float *dq = malloc(nqe * sizeof(float)), *dk = malloc(nke * sizeof(float));
    float *dv = malloc(nke * sizeof(float));
    double *rq = malloc(sizeof(double) * nqe), *rk = malloc(sizeof(double) * nke);
    double *rv = malloc(sizeof(double) * nke);
    assert_int_equal(selfattn_attend_backward(t.layer, B, Q, K, q, k, v, lp, dout, dq, dk, dv),
                     SELFATTN_OK);
    ref_attend_backward(&t.ref, &o, B, Q, K, q, k, v, lp, dout, rq, rk, rv);
    const float *g[3] = {dq, dk, dv};
    const double *gr[3] = {rq, rk, rv};
    const size_t gn[3] = {nqe, nke, nke};
    for (int x = 0; x < 3; x++) {
        ref_max_err(g[x], gr[x], gn[x], &err, &mx);
        if (!(err <= TOL * (mx > 1.0 ? mx : 1.0))) {
            print_error("align %d q %d kv %d lengths %d window %d alibi %d softcap %g gqa %d/%d: "
                        "gradient %d error %g of %g\n",
                        c->align, Q, K, c->lengths, c->window, c->alibi, c->softcap, H,
                        c->kv_heads, x, err, mx);
            fail();
        }
    }
    for (int b = 0; b < B; b++) {
        const int len = a_len(c, lp, b);
        for (int i = 0; i < Q; i++) { /* a row that sees no key: dq zero */
            int any = 0;
            for (int j = 0; j < K && !any; j++)
                any = a_visible(c, len, i, j);
            if (!any)
                for (size_t d = 0; d < nq; d++)
                    assert_true(dq[((size_t)b * Q + i) * nq + d] == 0.0f);
        }
        for (size_t x = (size_t)len * nkv; x < (size_t)K * nkv; x++)
            assert_true(dk[(size_t)b * K * nkv + x] == 0.0f && dv[(size_t)b * K * nkv + x] == 0.0f);
    }
    /* dk and dv rows of keys that no query sees are zeros (the backward's key blocks span
       whole blocks of keys, so unlike the forward it may read such rows inside a block it
       computes: only the zeros are promised) */
    for (int b = 0; b < B; b++)
        for (int j = 0; j < a_len(c, lp, b); j++) {
            int seen = 0;
            for (int i = 0; i < Q && !seen; i++)
                seen = a_visible(c, a_len(c, lp, b), i, j);
            for (size_t d = 0; d < nkv && !seen; d++)
                assert_true(dk[((size_t)b * K + j) * nkv + d] == 0.0f &&
                            dv[((size_t)b * K + j) * nkv + d] == 0.0f);
        }

    free(q);
    free(k);
    free(v);
    free(dout);
    free(bias);
    free(e.weights);
    free(e.lse);
    free(e.scores);
    free(out);
    free(yr);
    free(wr);
    free(lr);
    free(sr);
    free(qd);
    free(kd);
    free(k2);
    free(v2);
    free(out2);
    free(dq);
    free(dk);
    free(dv);
    free(rq);
    free(rk);
    free(rv);
    tu_layer_free(&t);
}

/* Every alignment x q_len <, =, > kv_len (one row; few rows; several query blocks) x lengths x
   window x ALiBi x GQA; softcap, bias and the scores stage vary along. */
static void test_attend_alignments(void **state)
{
    (void)state;
    static const int shapes[][2] = {{1, 13}, {5, 13}, {13, 13}, {21, 13}, {150, 97}, {97, 150},
                                    {160, 160}};
    static const int gqa[][2] = {{4, 4}, {4, 2}, {4, 1}};
    int n = 0;
    for (int align = 0; align <= 3; align++)
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
            for (int lengths = 0; lengths <= 1; lengths++)
                for (int window = 0; window <= 5; window += 5)
                    for (int alibi = 0; alibi <= 1; alibi++)
                        for (size_t g = 0; g < sizeof gqa / sizeof gqa[0]; g++) {
                            const acase c = {.align = align,
                                             .heads = gqa[g][0],
                                             .kv_heads = gqa[g][1],
                                             .q_len = shapes[s][0],
                                             .kv_len = shapes[s][1],
                                             .lengths = lengths,
                                             .window = window,
                                             .alibi = alibi,
                                             .bias = n % 2,
                                             .softcap = n % 3 == 1 ? 3.0 : 0.0};
                            attend_case(&c, 1000u + (uint64_t)n, (n / 2) % 3);
                            n++;
                        }
    print_message("%d cases\n", n);
}

/* A sequence with no key (length 0) and top-left rows past the keys with a window: zeros,
   lse -inf, dq 0 (checked in attend_case), and stages 0/1 all -inf for the empty sequence. */
static void test_rows_without_keys(void **state)
{
    (void)state;
    for (int align = 1; align <= 3; align++)
        for (int stage = 0; stage <= 2; stage++) {
            const acase c = {.align = align, .heads = 2, .kv_heads = 1, .q_len = 40, .kv_len = 9,
                             .lengths = 2, .window = 3};
            attend_case(&c, 77u + (uint64_t)align, stage);
        }
}

/* forward_ex (weights, lse, scores), forward, backward, the train state and the cache give the
   same bits with CAUSAL 2 and 3 as with 1: their queries have known positions. */
static void test_layer_calls_as_causal_1(void **state)
{
    (void)state;
    enum { H = 4, KVH = 2, DM = 32, L = 70, NG = 8 };
    const tu_spec spec = {DM, H, KVH, 0, 1, 1, 0, 1, 2, 0};
    tu_layer t;
    assert_int_equal(tu_layer_make(&spec, 9, &t), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_WINDOW, 20), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_ALIBI, 1), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_ROPE, 1), SELFATTN_OK);
    tu_rng r = {5};
    const size_t nx = (size_t)B * L * DM, nw = (size_t)B * H * L * L, nl = (size_t)B * H * L;
    float *x = tu_random(&r, nx, -1, 1), *dy = tu_random(&r, nx, -1, 1);
    const int32_t lens[B] = {L, 33};
    const size_t gsz[NG] = {(size_t)H * 8 * DM, (size_t)KVH * 8 * DM, (size_t)KVH * 8 * DM,
                            (size_t)DM * H * 8, (size_t)H * 8, (size_t)KVH * 8, (size_t)KVH * 8,
                            DM};
    size_t total = 3 * nx + nw + nl + nw + nx; /* y, dx, y_train / dx_train, w, lse, scores, y_c */
    for (int i = 0; i < NG; i++)
        total += 2 * gsz[i];
    size_t state_bytes;
    assert_int_equal(selfattn_train_state_size(t.layer, B, L, &state_bytes), SELFATTN_OK);
    void *st = malloc(state_bytes);
    float *res[4];
    for (int causal = 1; causal <= 3; causal++) {
        assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_CAUSAL, causal), SELFATTN_OK);
        float *p = res[causal] = calloc(total + nx, sizeof(float));
        float *y = p, *dx = y + nx, *yt = dx + nx, *w = yt + nx, *lse = w + nw, *sc = lse + nl;
        float *yc = sc + nw, *g = yc + nx, *dxt;
        selfattn_extras e;
        memset(&e, 0, sizeof e);
        e.struct_size = sizeof e;
        e.weights = w;
        e.lse = lse;
        e.scores = sc;
        e.scores_stage = 2;
        assert_int_equal(selfattn_forward_ex(t.layer, B, L, x, lens, &e, y), SELFATTN_OK);
        float *gp[NG];
        for (int i = 0; i < NG; i++) {
            gp[i] = g;
            g += gsz[i];
        }
        selfattn_grads gr = {sizeof gr, gp[0], gp[1], gp[2], gp[3], gp[4], gp[5], gp[6], gp[7]};
        assert_int_equal(selfattn_backward(t.layer, B, L, x, lens, dy, dx, &gr), SELFATTN_OK);
        float *gpt[NG];
        for (int i = 0; i < NG; i++) {
            gpt[i] = g;
            g += gsz[i];
        }
        dxt = g;
        selfattn_grads grt = {sizeof grt, gpt[0], gpt[1], gpt[2], gpt[3],
                              gpt[4],     gpt[5], gpt[6], gpt[7]};
        assert_int_equal(selfattn_forward_train(t.layer, B, L, x, lens, yt, st, state_bytes),
                         SELFATTN_OK);
        assert_int_equal(selfattn_backward_train(t.layer, B, L, x, lens, dy, dxt, &grt, st,
                                                 state_bytes),
                         SELFATTN_OK);
        /* the cache: a prompt of 50 then 20 single steps, per sequence */
        selfattn_cache *cache;
        assert_int_equal(selfattn_cache_create(t.layer, B, L, &cache), SELFATTN_OK);
        float *xs = malloc(sizeof(float) * B * 50 * DM), *ys = malloc(sizeof(float) * B * 50 * DM);
        for (int b = 0; b < B; b++)
            memcpy(xs + (size_t)b * 50 * DM, x + (size_t)b * L * DM, sizeof(float) * 50 * DM);
        assert_int_equal(selfattn_forward_cached(t.layer, cache, 50, xs, NULL, ys), SELFATTN_OK);
        for (int b = 0; b < B; b++)
            memcpy(yc + (size_t)b * L * DM, ys + (size_t)b * 50 * DM, sizeof(float) * 50 * DM);
        for (int s = 50; s < L; s++) {
            float xr[B * DM], yr[B * DM];
            for (int b = 0; b < B; b++)
                memcpy(xr + b * DM, x + ((size_t)b * L + s) * DM, sizeof(float) * DM);
            assert_int_equal(selfattn_forward_cached(t.layer, cache, 1, xr, NULL, yr),
                             SELFATTN_OK);
            for (int b = 0; b < B; b++)
                memcpy(yc + ((size_t)b * L + s) * DM, yr + b * DM, sizeof(float) * DM);
        }
        selfattn_cache_destroy(cache);
        free(xs);
        free(ys);
        if (causal > 1)
            assert_memory_equal(res[1], res[causal], (total + nx) * sizeof(float));
    }
    for (int causal = 1; causal <= 3; causal++)
        free(res[causal]);
    free(st);
    free(x);
    free(dy);
    tu_layer_free(&t);
}

/* forward_ex's scores against the reference's own projections: every stage, with lengths (padding
   rows all -inf), causal (1, and 3 which is 1 here) or not, window, ALiBi, softcap, several
   query blocks. */
static void test_forward_scores(void **state)
{
    (void)state;
    enum { H = 2, DM = 16, HD = 8 };
    static const int seq[] = {11, 70};
    for (size_t si = 0; si < 2; si++)
        for (int causal = 0; causal <= 3; causal += 1)
            for (int stage = 0; stage <= 2; stage++) {
                const int L = seq[si];
                const tu_spec spec = {DM, H, 1, HD, causal, 1, 0, 1, 1, 0};
                tu_layer t;
                assert_int_equal(tu_layer_make(&spec, 40u + (uint64_t)stage, &t), SELFATTN_OK);
                assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_WINDOW, 4), SELFATTN_OK);
                assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_ALIBI, 1), SELFATTN_OK);
                assert_int_equal(selfattn_layer_set_float(t.layer, SELFATTN_FOPT_SOFTCAP, 2.0),
                                 SELFATTN_OK);
                t.ref.causal = causal != 0; /* the layer's calls treat 2 and 3 as 1 */
                tu_rng r = {(uint64_t)L + 3u * (uint64_t)causal};
                const size_t nx = (size_t)B * L * DM, nw = (size_t)B * H * L * L;
                float *x = tu_random(&r, nx, -1.5f, 1.5f), *y = malloc(nx * sizeof(float));
                float *sc = malloc(nw * sizeof(float));
                const int32_t lens[B] = {L, L / 2 - 1};
                selfattn_extras e;
                memset(&e, 0, sizeof e);
                e.struct_size = sizeof e;
                e.scores = sc;
                e.scores_stage = stage;
                assert_int_equal(selfattn_forward_ex(t.layer, B, L, x, lens, &e, y), SELFATTN_OK);
                const ref_opts o = {4, 1, 2.0, NULL, 0, 0, 0, 0, 0, 0};
                double *qd = malloc(sizeof(double) * L * H * HD), *kd = malloc(sizeof(double) * L * HD);
                double *sr = malloc(sizeof(double) * nw);
                for (int b = 0; b < B; b++) {
                    ref_linear(x + (size_t)b * L * DM, L, DM, t.w[0], t.w[4], H * HD, qd);
                    ref_linear(x + (size_t)b * L * DM, L, DM, t.w[1], t.w[5], HD, kd);
                    double *sb = sr + (size_t)b * H * L * L;
                    ref_scores(&t.ref, &o, b, L, L, qd, kd, lens[b], stage, sb);
                    for (int h = 0; h < H; h++) /* padding rows: every key -inf */
                        for (int i = lens[b]; i < L; i++)
                            for (int j = 0; j < L; j++)
                                sb[((size_t)h * L + i) * L + j] = -INFINITY;
                }
                check_scores(sc, sr, nw, "forward_ex scores");
                free(x);
                free(y);
                free(sc);
                free(qd);
                free(kd);
                free(sr);
                tu_layer_free(&t);
            }
}

/* Bad values: CAUSAL 4 and -1, scores_stage 3 and -1 (with scores), a struct_size inside a new
   field: INVALID, the option unchanged, nothing written. A 1.1 caller's struct_size: the new
   fields are not read. A struct_size that covers scores but not scores_stage: stage 0. */
static void test_bad_values_and_sizes(void **state)
{
    (void)state;
    enum { H = 2, DM = 16, L = 6 };
    const tu_spec spec = {DM, H, 0, 0, 2, 1, 0, 1, 1, 0};
    tu_layer t;
    assert_int_equal(tu_layer_make(&spec, 3, &t), SELFATTN_OK);
    int64_t v = -5;
    assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_CAUSAL, 4), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_CAUSAL, -1), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_get(t.layer, SELFATTN_OPT_CAUSAL, &v), SELFATTN_OK);
    assert_int_equal(v, 2);
    for (int64_t c = 0; c <= 3; c++) {
        assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_CAUSAL, c), SELFATTN_OK);
        assert_int_equal(selfattn_layer_get(t.layer, SELFATTN_OPT_CAUSAL, &v), SELFATTN_OK);
        assert_int_equal(v, c);
    }
    int64_t lo, hi;
    assert_int_equal(selfattn_option_bounds(SELFATTN_OPT_CAUSAL, &lo, &hi), SELFATTN_OK);
    assert_true(lo == 0 && hi == 3);

    tu_rng r = {8};
    const size_t nx = (size_t)L * DM, nw = (size_t)H * L * L;
    float *x = tu_random(&r, nx, -1, 1);
    float y[L * DM], w[H * L * L], lse[H * L], sc[H * L * L];
    struct {
        selfattn_extras e;
        unsigned char tail[16];
    } big;
    const int32_t bad_stage[] = {3, -1, 100};
    const size_t at = offsetof(selfattn_extras, scores);
    for (int round = 0; round < 5; round++) {
        for (size_t i = 0; i < nx; i++)
            y[i] = SENT;
        for (size_t i = 0; i < nw; i++)
            w[i] = sc[i] = SENT;
        for (int i = 0; i < H * L; i++)
            lse[i] = SENT;
        memset(&big, 0, sizeof big);
        big.e.struct_size = sizeof big.e;
        big.e.weights = w;
        big.e.lse = lse;
        big.e.scores = sc;
        if (round < 3)
            big.e.scores_stage = bad_stage[round];
        else if (round == 3)
            big.e.struct_size = (uint32_t)at + 1; /* inside scores */
        else
            big.e.struct_size = (uint32_t)(offsetof(selfattn_extras, scores_stage) + 1);
        for (int call = 0; call < 2; call++) {
            const selfattn_status st =
                call == 0 ? selfattn_forward_ex(t.layer, 1, L, x, NULL, &big.e, y)
                          : selfattn_attend_ex(t.layer, 1, L, L, x, x, x, NULL, &big.e, y);
            assert_int_equal(st, SELFATTN_ERR_INVALID);
            if (round < 3)
                assert_non_null(strstr(selfattn_last_error(), "scores_stage"));
            for (size_t i = 0; i < nx; i++)
                assert_true(y[i] == SENT);
            for (size_t i = 0; i < nw; i++)
                assert_true(w[i] == SENT && sc[i] == SENT);
            for (int i = 0; i < H * L; i++)
                assert_true(lse[i] == SENT);
        }
    }
    /* scores NULL: the stage is not looked at */
    memset(&big, 0, sizeof big);
    big.e.struct_size = sizeof big.e;
    big.e.scores_stage = 3;
    assert_int_equal(selfattn_forward_ex(t.layer, 1, L, x, NULL, &big.e, y), SELFATTN_OK);
    /* a 1.1 caller: struct_size ends before scores, whatever lies there is not read */
    float y11[L * DM];
    big.e.struct_size = (uint32_t)at;
    big.e.scores = sc;
    big.e.scores_stage = 9;
    big.e.weights = w;
    for (size_t i = 0; i < nw; i++)
        sc[i] = SENT;
    assert_int_equal(selfattn_forward_ex(t.layer, 1, L, x, NULL, &big.e, y11), SELFATTN_OK);
    for (size_t i = 0; i < nw; i++)
        assert_true(sc[i] == SENT);
    assert_int_equal(selfattn_forward(t.layer, 1, L, x, NULL, y), SELFATTN_OK);
    assert_memory_equal(y, y11, sizeof y);
    /* scores covered, scores_stage not: stage 0, the same as asking for it */
    float sc0[H * L * L];
    big.e.struct_size = (uint32_t)offsetof(selfattn_extras, scores_stage);
    big.e.scores_stage = 2; /* past struct_size: not read */
    assert_int_equal(selfattn_attend_ex(t.layer, 1, L, L, x, x, x, NULL, &big.e, y), SELFATTN_OK);
    big.e.struct_size = sizeof big.e;
    big.e.scores = sc0;
    big.e.scores_stage = 0;
    assert_int_equal(selfattn_attend_ex(t.layer, 1, L, L, x, x, x, NULL, &big.e, y), SELFATTN_OK);
    assert_memory_equal(sc, sc0, sizeof sc0);
    /* a newer caller's larger struct: zero tail fine, a set byte UNSUPPORTED */
    big.e.struct_size = sizeof big;
    assert_int_equal(selfattn_attend_ex(t.layer, 1, L, L, x, x, x, NULL, &big.e, y), SELFATTN_OK);
    big.tail[3] = 1;
    assert_int_equal(selfattn_attend_ex(t.layer, 1, L, L, x, x, x, NULL, &big.e, y),
                     SELFATTN_ERR_UNSUPPORTED);
    free(x);
    tu_layer_free(&t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bad_values_and_sizes),
        cmocka_unit_test(test_rows_without_keys),
        cmocka_unit_test(test_forward_scores),
        cmocka_unit_test(test_layer_calls_as_causal_1),
        cmocka_unit_test(test_attend_alignments),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
