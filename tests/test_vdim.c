/* A value head size of its own (1.3, SELFATTN_OPT_V_HEAD_DIM): dv in {head_dim / 2, head_dim,
 * head_dim + 8, 2 head_dim} through every entry point (forward, forward_ex, attend, attend_ex,
 * the cache with each KV dtype, backward, the train state, attend_backward, 16-bit weights)
 * against the float64 reference of reference.c (v of width n_kv_heads dv, out of n_heads dv),
 * whose gradients at dv != head_dim are themselves checked against finite differences here. Also
 * the bad input: V_HEAD_DIM after a weight, W_QKV/B_QKV with dv != head_dim, OUT_PROJ 0 with
 * n_heads dv != d_model in each order of setting, negative and overflowing dv, a cache whose
 * layer's dv changed.
 *
 * Tolerances as in test_backward.c and test_half.c: max |got - ref| <= 1e-4 max |ref| (+ 1e-6),
 * float32 sums of at most a few hundred terms; finite differences of the float64 reference with
 * a step of 1e-3, within 1e-5 (1 + max |g|). The 16-bit caches use dyadic weights and inputs
 * (projections exact in float32) and a reference fed the test's own rounding of K and V. */
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
#define FD_TOL 1e-5
#define SENT -4242.0f

/* head_dim of the tests and the four value widths */
#define HD 12
static const int dvs[4] = {HD / 2, HD, HD + 8, 2 * HD};

static void expect_close(const char *what, int dv, const float *a, const double *r, size_t n)
{
    double err, mx;
    ref_max_err(a, r, n, &err, &mx);
    if (!(err <= TOL * mx + 1e-6)) {
        print_error("%s (dv %d): max error %g, scale %g\n", what, dv, err, mx);
        fail();
    }
}

/* ---- A test layer ---------------------------------------------------------------------------- */

typedef struct vcase {
    int heads, kv_heads, dm; /* dm 0: n_heads dv, with OUT_PROJ 0 */
    int causal, window, alibi, rope, biases;
    double softcap;
    int batch, seq, lengths;
} vcase;

static void make_layer(const vcase *c, int hd, int dv, int wdt, uint64_t seed, tu_layer *t,
                       ref_opts *o)
{
    const int out_proj = c->dm != 0;
    const tu_spec spec = {.d_model = out_proj ? c->dm : c->heads * dv,
                          .n_heads = c->heads,
                          .n_kv_heads = c->kv_heads,
                          .head_dim = hd,
                          .causal = c->causal,
                          .out_proj = out_proj,
                          .biases = c->biases,
                          .threads = 2};
    assert_int_equal(tu_layer_make_v(&spec, dv, seed, wdt, t), SELFATTN_OK);
    int64_t got = -1;
    assert_int_equal(selfattn_layer_get(t->layer, SELFATTN_OPT_V_HEAD_DIM, &got), SELFATTN_OK);
    assert_int_equal(got, dv);
    memset(o, 0, sizeof *o);
    o->window = c->window;
    o->alibi = c->alibi;
    o->softcap = c->softcap;
    o->rope = c->rope;
    assert_int_equal(tu_layer_set_opts(t->layer, o), SELFATTN_OK);
}

static const int32_t *case_lengths(const vcase *c, int32_t *lens)
{
    if (!c->lengths)
        return NULL;
    for (int b = 0; b < c->batch; b++)
        lens[b] = b == 0 ? c->seq : b == 1 ? (c->seq + 1) / 2 : 0;
    return lens;
}

/* ---- The float64 reference's gradients at dv != head_dim, by finite differences ------------ */

static void fd_check(const char *what, float *p, size_t n, const double *g, const ref_layer *l,
                     const ref_opts *o, int batch, int seq, const float *x, const float *dy,
                     double *y)
{
    const tu_fd_forward f = {l, o, batch, seq, x, NULL, dy, y};
    double mx;
    const double err = tu_fd_error(p, n, g, tu_fd_forward_loss, &f, &mx);
    if (!(err <= FD_TOL * (1.0 + mx))) {
        print_error("%s: finite differences differ by %g (scale %g)\n", what, err, mx);
        fail();
    }
}

static void test_reference_finite_differences(void **state)
{
    (void)state;
    static const int small_dvs[2] = {1, 5}; /* head_dim 2: below and above */
    for (int di = 0; di < 2; di++) {
        const int dv = small_dvs[di], hd = 2, heads = 2, kv = 1, dm = 5, seq = 4;
        tu_layer t;
        const tu_spec spec = {.d_model = dm,
                              .n_heads = heads,
                              .n_kv_heads = kv,
                              .head_dim = hd,
                              .causal = 1,
                              .out_proj = 1,
                              .biases = 1,
                              .threads = 1};
        assert_int_equal(tu_layer_make_v(&spec, dv, 5 + (uint64_t)di, 0, &t), SELFATTN_OK);
        const ref_opts o = {.rope = 1, .softcap = 2.0};
        const size_t n_x = (size_t)seq * dm;
        tu_rng r = {11};
        float *x = tu_random(&r, n_x, -1.5f, 1.5f), *dy = tu_random(&r, n_x, -1, 1);
        const size_t nq = (size_t)heads * hd, nkv = (size_t)kv * hd;
        const size_t nqv = (size_t)heads * dv, nkvv = (size_t)kv * dv;
        const size_t n[8] = {nq * dm, nkv * dm, nkvv * dm, dm * nqv, nq, nkv, nkvv, dm};
        double *dx = malloc(sizeof(double) * n_x), *y = malloc(sizeof(double) * n_x), *g[8];
        for (int i = 0; i < 8; i++)
            g[i] = malloc(sizeof(double) * n[i]);
        ref_backward(&t.ref, &o, 1, seq, x, NULL, dy, dx, g);
        fd_check("dx", x, n_x, dx, &t.ref, &o, 1, seq, x, dy, y);
        for (int i = 0; i < 8; i++)
            fd_check("dW", t.w[i], n[i], g[i], &t.ref, &o, 1, seq, x, dy, y);

        /* attention alone, q_len 3 over kv_len 4 */
        const int ql = 3, kl = 4;
        const ref_opts oa = {.window = 3};
        float *q = tu_random(&r, ql * nq, -1.5f, 1.5f), *k = tu_random(&r, kl * nkv, -1.5f, 1.5f);
        float *v = tu_random(&r, kl * nkvv, -1, 1), *go = tu_random(&r, ql * nqv, -1, 1);
        double *ga[3] = {malloc(sizeof(double) * ql * nq), malloc(sizeof(double) * kl * nkv),
                         malloc(sizeof(double) * kl * nkvv)};
        double *out = malloc(sizeof(double) * ql * nqv);
        ref_attend_backward(&t.ref, &oa, 1, ql, kl, q, k, v, NULL, go, ga[0], ga[1], ga[2]);
        float *p[3] = {q, k, v};
        const size_t na[3] = {ql * nq, kl * nkv, kl * nkvv};
        const tu_fd_attend f = {&t.ref, &oa, 1, ql, kl, q, k, v, NULL, go, out};
        for (int m = 0; m < 3; m++) {
            double mx;
            const double err = tu_fd_error(p[m], na[m], ga[m], tu_fd_attend_loss, &f, &mx);
            assert_true(err <= FD_TOL * (1.0 + mx));
        }
        free(q);
        free(k);
        free(v);
        free(go);
        free(out);
        for (int m = 0; m < 3; m++)
            free(ga[m]);
        free(x);
        free(dy);
        free(dx);
        free(y);
        for (int i = 0; i < 8; i++)
            free(g[i]);
        tu_layer_free(&t);
    }
}

/* ---- Forward and forward_ex ---------------------------------------------------------------- */

/* heads kv dm causal window alibi rope biases softcap batch seq lengths */
static const vcase layer_cases[] = {
    {4, 2, 40, 1, 0, 0, 1, 1, 0.0, 2, 7, 1},  /* GQA, RoPE, padding */
    {4, 4, 24, 0, 9, 1, 2, 0, 3.0, 1, 70, 0}, /* window, ALiBi, softcap, head-major K/V */
    {4, 1, 0, 1, 0, 0, 0, 1, 0.0, 2, 5, 1},   /* OUT_PROJ 0: d_model = n_heads dv */
    {2, 1, 16, 1, 4, 0, 1, 1, 0.0, 1, 40, 0}, /* causal window, one sequence */
};

static void run_forward_case(const vcase *c, int dv, int wdt, uint64_t seed)
{
    tu_layer t;
    ref_opts o;
    make_layer(c, HD, dv, wdt, seed, &t, &o);
    const int dm = t.ref.d_model;
    const size_t n_x = (size_t)c->batch * c->seq * dm;
    const size_t n_w = (size_t)c->batch * c->heads * c->seq * c->seq;
    const size_t n_l = (size_t)c->batch * c->heads * c->seq;
    tu_rng r = {seed * 5 + 3};
    float *x = tu_random(&r, n_x, -1.5f, 1.5f), *y = malloc(sizeof(float) * n_x);
    float *wts = malloc(sizeof(float) * n_w), *lse = malloc(sizeof(float) * n_l);
    int32_t lens[4];
    const int32_t *lp = case_lengths(c, lens);
    double *yr = malloc(sizeof(double) * n_x), *wr = malloc(sizeof(double) * n_w);
    double *lr = malloc(sizeof(double) * n_l);
    ref_forward_ex(&t.ref, &o, c->batch, c->seq, x, lp, yr, wr, lr);

    tu_set(y, n_x, SENT);
    assert_int_equal(selfattn_forward(t.layer, c->batch, c->seq, x, lp, y), SELFATTN_OK);
    expect_close("forward", dv, y, yr, n_x);
    selfattn_extras e;
    memset(&e, 0, sizeof e);
    e.struct_size = sizeof e;
    e.weights = wts;
    e.lse = lse;
    tu_set(y, n_x, SENT);
    assert_int_equal(selfattn_forward_ex(t.layer, c->batch, c->seq, x, lp, &e, y), SELFATTN_OK);
    expect_close("forward_ex", dv, y, yr, n_x);
    expect_close("forward_ex weights", dv, wts, wr, n_w);
    for (size_t i = 0; i < n_l; i++) {
        if (isinf(lr[i]))
            assert_true(isinf(lse[i]) && lse[i] < 0);
        else
            assert_true(fabs(lse[i] - lr[i]) <= 1e-4 * (1.0 + fabs(lr[i])));
    }
    free(x);
    free(y);
    free(wts);
    free(lse);
    free(yr);
    free(wr);
    free(lr);
    tu_layer_free(&t);
}

static void test_forward(void **state)
{
    (void)state;
    for (int d = 0; d < 4; d++)
        for (size_t i = 0; i < sizeof layer_cases / sizeof layer_cases[0]; i++)
            run_forward_case(&layer_cases[i], dvs[d], 0, 100 + 10 * (uint64_t)d + i);
}

/* 16-bit weights: the reference takes the rounded weights (tu_layer_make_typed). */
static void test_half_weights(void **state)
{
    (void)state;
    for (int wdt = 1; wdt <= 2; wdt++)
        for (int d = 0; d < 4; d += 3) /* dv = head_dim / 2 and 2 head_dim */
            for (size_t i = 0; i < 3; i++)
                run_forward_case(&layer_cases[i], dvs[d], wdt, 300 + 10 * (uint64_t)d + i);
}

/* ---- attend and attend_ex -------------------------------------------------------------------- */

static void run_attend_case(const vcase *c, int dv, int q_len, int kv_len, uint64_t seed)
{
    tu_layer t;
    ref_opts o;
    make_layer(c, HD, dv, 0, seed, &t, &o);
    o.rope = 0; /* attend takes q and k as they are */
    const size_t nq = (size_t)c->heads * HD, nkv = (size_t)c->kv_heads * HD;
    const size_t nqv = (size_t)c->heads * dv, nkvv = (size_t)c->kv_heads * dv;
    const size_t B = (size_t)c->batch;
    const size_t n_q = B * q_len * nq, n_k = B * kv_len * nkv, n_v = B * kv_len * nkvv;
    const size_t n_o = B * q_len * nqv, n_w = B * c->heads * q_len * kv_len;
    tu_rng r = {seed * 3 + 1};
    float *q = tu_random(&r, n_q, -1.5f, 1.5f), *k = tu_random(&r, n_k, -1.5f, 1.5f);
    float *v = tu_random(&r, n_v, -1, 1), *out = malloc(sizeof(float) * n_o);
    float *wts = malloc(sizeof(float) * n_w);
    int32_t lens[4];
    const int32_t *lp = tu_key_lengths(c->lengths, c->batch, kv_len, lens);
    double *ro = malloc(sizeof(double) * n_o), *rw = malloc(sizeof(double) * n_w);
    ref_attend_ex(&t.ref, &o, c->batch, q_len, kv_len, q, k, v, lp, ro, rw, NULL);
    tu_set(out, n_o, SENT);
    assert_int_equal(selfattn_attend(t.layer, c->batch, q_len, kv_len, q, k, v, lp, out),
                     SELFATTN_OK);
    expect_close("attend", dv, out, ro, n_o);
    selfattn_extras e;
    memset(&e, 0, sizeof e);
    e.struct_size = sizeof e;
    e.weights = wts;
    tu_set(out, n_o, SENT);
    assert_int_equal(selfattn_attend_ex(t.layer, c->batch, q_len, kv_len, q, k, v, lp, &e, out),
                     SELFATTN_OK);
    expect_close("attend_ex", dv, out, ro, n_o);
    expect_close("attend_ex weights", dv, wts, rw, n_w);

    /* attend_backward against the reference's gradients */
    float *go = tu_random(&r, n_o, -1, 1);
    float *dq = malloc(sizeof(float) * n_q), *dk = malloc(sizeof(float) * n_k);
    float *dvv = malloc(sizeof(float) * n_v);
    tu_set(dq, n_q, SENT);
    tu_set(dk, n_k, SENT);
    tu_set(dvv, n_v, SENT);
    assert_int_equal(
        selfattn_attend_backward(t.layer, c->batch, q_len, kv_len, q, k, v, lp, go, dq, dk, dvv),
        SELFATTN_OK);
    double *rq = malloc(sizeof(double) * n_q), *rk = malloc(sizeof(double) * n_k);
    double *rv = malloc(sizeof(double) * n_v);
    ref_attend_backward(&t.ref, &o, c->batch, q_len, kv_len, q, k, v, lp, go, rq, rk, rv);
    expect_close("attend_backward dq", dv, dq, rq, n_q);
    expect_close("attend_backward dk", dv, dk, rk, n_k);
    expect_close("attend_backward dv", dv, dvv, rv, n_v);
    /* dv alone: the same bits */
    float *one = malloc(sizeof(float) * n_v);
    assert_int_equal(selfattn_attend_backward(t.layer, c->batch, q_len, kv_len, q, k, v, lp, go,
                                              NULL, NULL, one),
                     SELFATTN_OK);
    assert_memory_equal(one, dvv, sizeof(float) * n_v);
    free(one);
    free(go);
    free(dq);
    free(dk);
    free(dvv);
    free(rq);
    free(rk);
    free(rv);
    free(q);
    free(k);
    free(v);
    free(out);
    free(wts);
    free(ro);
    free(rw);
    tu_layer_free(&t);
}

static void test_attend(void **state)
{
    (void)state;
    /* heads kv dm causal window alibi rope biases softcap batch seq lengths */
    const vcase gqa = {4, 2, 40, 1, 0, 0, 0, 0, 0.0, 2, 0, 1};
    const vcase gqa_one = {4, 2, 40, 1, 0, 0, 0, 0, 0.0, 1, 0, 0};
    const vcase win = {4, 4, 40, 0, 16, 1, 0, 0, 1.5, 1, 0, 0};
    for (int d = 0; d < 4; d++) {
        const uint64_t s = 500 + 10 * (uint64_t)d;
        run_attend_case(&gqa, dvs[d], 1, 9, s);     /* one query: a GQA group per task */
        run_attend_case(&gqa, dvs[d], 3, 9, s + 1); /* passes A and B of the backward */
        run_attend_case(&gqa_one, dvs[d], 5, 7, s + 2);
        run_attend_case(&win, dvs[d], 70, 80, s + 3); /* head-major K/V, sgemm blocks */
    }
}

/* ---- backward and the train state ---------------------------------------------------------- */

static void run_backward_case(const vcase *c, int dv, int wdt, uint64_t seed)
{
    tu_layer t;
    ref_opts o;
    make_layer(c, HD, dv, wdt, seed, &t, &o);
    const int dm = t.ref.d_model, out_proj = c->dm != 0;
    const size_t n_x = (size_t)c->batch * c->seq * dm;
    const size_t nq = (size_t)c->heads * HD, nkv = (size_t)c->kv_heads * HD;
    const size_t nqv = (size_t)c->heads * dv, nkvv = (size_t)c->kv_heads * dv;
    const size_t n[8] = {nq * dm, nkv * dm, nkvv * dm, out_proj ? dm * nqv : 0,
                         nq,      nkv,      nkvv,      out_proj ? (size_t)dm : 0};
    tu_rng r = {seed * 7 + 1};
    float *x = tu_random(&r, n_x, -1.5f, 1.5f), *dy = tu_random(&r, n_x, -1, 1);
    int32_t lens[4];
    const int32_t *lp = case_lengths(c, lens);
    double *rdx = malloc(sizeof(double) * n_x), *rg[8];
    for (int i = 0; i < 8; i++)
        rg[i] = malloc(sizeof(double) * (n[i] ? n[i] : 1));
    ref_backward(&t.ref, &o, c->batch, c->seq, x, lp, dy, rdx, rg);
    static const char *const names[8] = {"dW_Q", "dW_K", "dW_V", "dW_O",
                                         "db_Q", "db_K", "db_V", "db_O"};
    for (int train = 0; train <= 1; train++) {
        float *dx = malloc(sizeof(float) * n_x), *g[8];
        tu_set(dx, n_x, SENT);
        selfattn_grads gr;
        memset(&gr, 0, sizeof gr);
        gr.struct_size = sizeof gr;
        for (int i = 0; i < 8; i++) {
            g[i] = n[i] ? malloc(sizeof(float) * n[i]) : NULL;
            if (g[i])
                tu_set(g[i], n[i], SENT);
        }
        gr.w_q = g[0];
        gr.w_k = g[1];
        gr.w_v = g[2];
        gr.w_o = g[3];
        gr.b_q = g[4];
        gr.b_k = g[5];
        gr.b_v = g[6];
        gr.b_o = g[7];
        if (train) {
            size_t bytes = 0;
            assert_int_equal(selfattn_train_state_size(t.layer, c->batch, c->seq, &bytes),
                             SELFATTN_OK);
            /* Q, K, V (nq + nkv + nkvv) and O (nqv) floats a row, then the lse */
            assert_true(bytes >= sizeof(float) * (size_t)c->batch * c->seq *
                                     (nq + nkv + nkvv + nqv + (size_t)c->heads));
            void *st = malloc(bytes);
            float *y = malloc(sizeof(float) * n_x), *y_plain = malloc(sizeof(float) * n_x);
            assert_int_equal(selfattn_forward_train(t.layer, c->batch, c->seq, x, lp, y, st, bytes),
                             SELFATTN_OK);
            assert_int_equal(selfattn_forward(t.layer, c->batch, c->seq, x, lp, y_plain),
                             SELFATTN_OK);
            assert_memory_equal(y, y_plain, sizeof(float) * n_x);
            assert_int_equal(
                selfattn_backward_train(t.layer, c->batch, c->seq, x, lp, dy, dx, &gr, st, bytes),
                SELFATTN_OK);
            free(st);
            free(y);
            free(y_plain);
        } else {
            assert_int_equal(selfattn_backward(t.layer, c->batch, c->seq, x, lp, dy, dx, &gr),
                             SELFATTN_OK);
        }
        expect_close(train ? "dx (train)" : "dx", dv, dx, rdx, n_x);
        for (int i = 0; i < 8; i++)
            if (n[i])
                expect_close(names[i], dv, g[i], rg[i], n[i]);
        free(dx);
        for (int i = 0; i < 8; i++)
            free(g[i]);
    }
    free(x);
    free(dy);
    free(rdx);
    for (int i = 0; i < 8; i++)
        free(rg[i]);
    tu_layer_free(&t);
}

static void test_backward(void **state)
{
    (void)state;
    /* heads kv dm causal window alibi rope biases softcap batch seq lengths */
    const vcase cases[] = {
        {4, 2, 40, 1, 0, 0, 1, 1, 0.0, 2, 7, 1}, /* the single pass (batch x kv heads = 4) */
        {4, 2, 24, 1, 3, 1, 2, 1, 2.0, 1, 9, 0}, /* passes A and B */
        {4, 1, 0, 0, 0, 0, 1, 1, 0.0, 2, 6, 1},  /* OUT_PROJ 0 */
    };
    for (int d = 0; d < 4; d++)
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
            run_backward_case(&cases[i], dvs[d], 0, 700 + 10 * (uint64_t)d + i);
    /* 16-bit weights: the gradients at the rounded weights */
    for (int wdt = 1; wdt <= 2; wdt++)
        run_backward_case(&cases[0], 2 * HD, wdt, 790 + (uint64_t)wdt);
}

/* ---- The cache with each KV dtype -------------------------------------------------------------
 */

#define CD 16
#define CH 4
#define CKV 2
#define CHD 4
#define CT 12 /* positions per sequence: a prompt, then single steps */

/* y rows of one sequence x [CT][CD] from the float64 reference with K and V rounded to kvdt
   (RoPE, when on, applied in double before: only with F32, where no rounding follows). */
static void cache_reference(const ref_layer *rl, const ref_opts *o, int kvdt, const float *x,
                            double *y)
{
    const int dv = rl->v_dim;
    const size_t nq = CH * CHD, nkv = CKV * CHD, nqv = (size_t)CH * dv, nkvv = (size_t)CKV * dv;
    double *q = malloc(sizeof(double) * CT * nq), *k = malloc(sizeof(double) * CT * nkv);
    double *v = malloc(sizeof(double) * CT * nkvv), *a = malloc(sizeof(double) * CT * nqv);
    float *qf = malloc(sizeof(float) * CT * nq), *kf = malloc(sizeof(float) * CT * nkv);
    float *vf = malloc(sizeof(float) * CT * nkvv);
    ref_linear(x, CT, CD, rl->wq, rl->bq, (int)nq, q);
    ref_linear(x, CT, CD, rl->wk, rl->bk, (int)nkv, k);
    ref_linear(x, CT, CD, rl->wv, rl->bv, (int)nkvv, v);
    for (int t = 0; t < CT; t++) {
        ref_rope_row(o, CH, CHD, t, q + (size_t)t * nq);
        ref_rope_row(o, CKV, CHD, t, k + (size_t)t * nkv);
    }
    for (size_t i = 0; i < CT * nq; i++)
        qf[i] = (float)q[i]; /* exact without RoPE: dyadic */
    for (size_t i = 0; i < CT * nkv; i++)
        kf[i] = tu_round(kvdt, (float)k[i]);
    for (size_t i = 0; i < CT * nkvv; i++)
        vf[i] = tu_round(kvdt, (float)v[i]);
    ref_opts oa = *o;
    oa.rope = 0; /* applied above */
    ref_attend_ex(rl, &oa, 1, CT, CT, qf, kf, vf, NULL, a, NULL, NULL);
    ref_linear_d(a, CT, (int)nqv, rl->wo, rl->bo, CD, y);
    free(q);
    free(k);
    free(v);
    free(a);
    free(qf);
    free(kf);
    free(vf);
}

static void run_cache_case(int dv, int kvdt, int window, int rope, uint64_t seed)
{
    tu_rng r = {seed};
    const size_t nq = CH * CHD, nkv = CKV * CHD, nqv = (size_t)CH * dv, nkvv = (size_t)CKV * dv;
    const size_t cnt[8] = {nq * CD, nkv * CD, nkvv * CD, CD * nqv, nq, nkv, nkvv, CD};
    float *w[8];
    selfattn_layer *l;
    assert_int_equal(selfattn_layer_create(CD, CH, &l), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_N_KV_HEADS, CKV), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_V_HEAD_DIM, dv), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_CAUSAL, 1), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_WINDOW, window), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_ROPE, rope), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_KV_DTYPE, kvdt), SELFATTN_OK);
    for (int i = 0; i < 8; i++) {
        w[i] = malloc(sizeof(float) * cnt[i]);
        for (size_t j = 0; j < cnt[i]; j++)
            w[i][j] = tu_dyadic(&r, 8, 0.5);
        assert_int_equal(
            selfattn_layer_set_weight(l, (selfattn_weight)(i + 1), w[i], (int64_t)cnt[i]),
            SELFATTN_OK);
    }
    const ref_layer rl = {.d_model = CD,
                          .n_heads = CH,
                          .n_kv_heads = CKV,
                          .head_dim = CHD,
                          .causal = 1,
                          .out_proj = 1,
                          .scale = 1.0 / sqrt((double)CHD),
                          .wq = w[0],
                          .wk = w[1],
                          .wv = w[2],
                          .wo = w[3],
                          .bq = w[4],
                          .bk = w[5],
                          .bv = w[6],
                          .bo = w[7],
                          .v_dim = dv};
    const ref_opts o = {.window = window, .rope = rope};
    selfattn_cache *c;
    /* with the window a ring smaller than the sequence */
    assert_int_equal(selfattn_cache_create(l, 2, window ? 8 : CT, &c), SELFATTN_OK);
    static const int32_t prompt[2] = {5, 2};
    float x[2][CT * CD], y[2 * 8 * CD], xin[2 * 8 * CD];
    double yr[2][CT * CD];
    for (int s = 0; s < 2; s++) {
        for (int i = 0; i < CT * CD; i++)
            x[s][i] = tu_dyadic(&r, 6, 1.0);
        cache_reference(&rl, &o, kvdt, x[s], yr[s]);
    }
    int32_t done[2] = {0, 0};
    while (done[0] < CT || done[1] < CT) {
        int32_t n_new[2];
        const float *const xs[2] = {x[0], x[1]};
        const int32_t max_new = tu_decode_step(2, xs, CD, CT, prompt, done, n_new, xin);
        assert_int_equal(selfattn_forward_cached(l, c, max_new, xin, n_new, y), SELFATTN_OK);
        for (int s = 0; s < 2; s++) {
            char what[64];
            snprintf(what, sizeof what, "cache kv %d window %d rope %d seq %d", kvdt, window, rope,
                     s);
            expect_close(what, dv, y + (size_t)s * max_new * CD, yr[s] + (size_t)done[s] * CD,
                         (size_t)n_new[s] * CD);
            done[s] += n_new[s];
        }
    }
    /* a copied sequence continues as the original */
    assert_int_equal(selfattn_cache_truncate(c, -1, window ? CT : CT - 3), SELFATTN_OK);
    if (!window) {
        assert_int_equal(selfattn_cache_copy(c, 0, 1), SELFATTN_OK);
        const int32_t one[2] = {1, 1};
        memcpy(xin, x[0] + (size_t)(CT - 3) * CD, CD * sizeof(float));
        memcpy(xin + CD, x[0] + (size_t)(CT - 3) * CD, CD * sizeof(float));
        assert_int_equal(selfattn_forward_cached(l, c, 1, xin, one, y), SELFATTN_OK);
        expect_close("cache copy", dv, y, yr[0] + (size_t)(CT - 3) * CD, CD);
        expect_close("cache copy", dv, y + CD, yr[0] + (size_t)(CT - 3) * CD, CD);
    }
    selfattn_cache_destroy(c);
    selfattn_layer_destroy(l);
    for (int i = 0; i < 8; i++)
        free(w[i]);
}

static void test_cache(void **state)
{
    (void)state;
    static const int cdvs[4] = {CHD / 2, CHD, CHD + 8, 2 * CHD};
    for (int d = 0; d < 4; d++) {
        for (int kvdt = 0; kvdt <= 2; kvdt++)
            for (int window = 0; window <= 5; window += 5)
                run_cache_case(cdvs[d], kvdt, window, 0, 900 + 10 * (uint64_t)d + kvdt + window);
        run_cache_case(cdvs[d], 0, 0, 1, 950 + (uint64_t)d); /* RoPE on Q and K only */
        run_cache_case(cdvs[d], 0, 5, 2, 960 + (uint64_t)d);
    }
}

/* ---- Bad input ---------------------------------------------------------------------------------
 */

static int64_t get_opt(const selfattn_layer *l, selfattn_option opt)
{
    int64_t v = -1;
    assert_int_equal(selfattn_layer_get(l, opt, &v), SELFATTN_OK);
    return v;
}

static void test_options(void **state)
{
    (void)state;
    selfattn_layer *l;
    int64_t lo = 0, hi = 0;
    assert_int_equal(selfattn_option_bounds(SELFATTN_OPT_V_HEAD_DIM, &lo, &hi), SELFATTN_OK);
    assert_int_equal(lo, 1);
    assert_int_equal(hi, INT32_MAX);

    /* the effective dv: head_dim by default, following it; 0 while head_dim is undetermined */
    assert_int_equal(selfattn_layer_create(10, 4, &l), SELFATTN_OK);
    assert_int_equal(get_opt(l, SELFATTN_OPT_V_HEAD_DIM), 0);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_V_HEAD_DIM, 6), SELFATTN_OK);
    assert_int_equal(get_opt(l, SELFATTN_OPT_V_HEAD_DIM), 6);
    float w[64 * 10];
    memset(w, 0, sizeof w);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_V, w, 4 * 6 * 10), SELFATTN_ERR_STATE);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_HEAD_DIM, 3), SELFATTN_OK);
    assert_int_equal(get_opt(l, SELFATTN_OPT_V_HEAD_DIM), 6);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_V_HEAD_DIM, 0), SELFATTN_OK);
    assert_int_equal(get_opt(l, SELFATTN_OPT_V_HEAD_DIM), 3);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_V_HEAD_DIM, -1), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_V_HEAD_DIM, (int64_t)INT32_MAX + 1),
                     SELFATTN_ERR_INVALID);
    assert_int_equal(get_opt(l, SELFATTN_OPT_V_HEAD_DIM), 3);
    /* W_V's rows and W_O's columns too large for an int: OVERFLOW, unchanged */
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_V_HEAD_DIM, INT32_MAX / 2),
                     SELFATTN_ERR_OVERFLOW);
    assert_int_equal(get_opt(l, SELFATTN_OPT_V_HEAD_DIM), 3);
    selfattn_layer_destroy(l);

    /* weight sizes, W_QKV, and the shape frozen once a weight is set */
    assert_int_equal(selfattn_layer_create(8, 2, &l), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_V_HEAD_DIM, 4), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_QKV, w, 3 * 8 * 8), SELFATTN_OK);
    selfattn_layer_destroy(l); /* dv given but equal to head_dim: the packed weights are fine */
    assert_int_equal(selfattn_layer_create(8, 2, &l), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_V_HEAD_DIM, 6), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_QKV, w, 3 * 8 * 8),
                     SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_QKV, w, 8 * 8 + 8 * 8 + 12 * 8),
                     SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_B_QKV, w, 3 * 8), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_V, w, 8 * 8), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_O, w, 8 * 8), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_B_V, w, 8), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_V_HEAD_DIM, 5),
                     SELFATTN_OK); /* no weight yet */
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_V_HEAD_DIM, 6), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_V, w, 12 * 8), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_B_V, w, 12), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_O, w, 8 * 12), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_V_HEAD_DIM, 4), SELFATTN_ERR_STATE);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_V_HEAD_DIM, 6), SELFATTN_ERR_STATE);
    assert_int_equal(get_opt(l, SELFATTN_OPT_V_HEAD_DIM), 6);
    selfattn_layer_destroy(l);
}

/* One step of an option script: set opt to value and expect status, or (get) expect value. */
typedef struct opt_step {
    int get;
    selfattn_option opt;
    int64_t value;
    selfattn_status status;
} opt_step;

/* Runs the steps on a new layer of d_model 16, 2 heads. */
static void run_opt_steps(const opt_step *s, size_t n)
{
    selfattn_layer *l;
    assert_int_equal(selfattn_layer_create(16, 2, &l), SELFATTN_OK);
    for (size_t i = 0; i < n; i++) {
        if (s[i].get)
            assert_int_equal(get_opt(l, s[i].opt), s[i].value);
        else
            assert_int_equal(selfattn_layer_set(l, s[i].opt, s[i].value), s[i].status);
    }
    selfattn_layer_destroy(l);
}

/* OUT_PROJ 0 needs n_heads dv == d_model: the setting that would break it, in any order, is
   INVALID and changes nothing. d_model 16, 2 heads: head_dim 8 by default. */
static void test_out_proj_rule(void **state)
{
    (void)state;
    /* OUT_PROJ 0 first, then a dv that breaks it */
    static const opt_step first[] = {{0, SELFATTN_OPT_OUT_PROJ, 0, SELFATTN_OK},
                                     {0, SELFATTN_OPT_V_HEAD_DIM, 4, SELFATTN_ERR_INVALID},
                                     {1, SELFATTN_OPT_V_HEAD_DIM, 8, SELFATTN_OK},
                                     {0, SELFATTN_OPT_V_HEAD_DIM, 8, SELFATTN_OK},
                                     /* dv given: head_dim may change, dv stays 8 */
                                     {0, SELFATTN_OPT_HEAD_DIM, 4, SELFATTN_OK},
                                     {1, SELFATTN_OPT_HEAD_DIM, 4, SELFATTN_OK},
                                     {1, SELFATTN_OPT_V_HEAD_DIM, 8, SELFATTN_OK},
                                     /* back to the default (dv = head_dim = 4): 2 x 4 != 16 */
                                     {0, SELFATTN_OPT_V_HEAD_DIM, 0, SELFATTN_ERR_INVALID},
                                     {1, SELFATTN_OPT_V_HEAD_DIM, 8, SELFATTN_OK},
                                     {1, SELFATTN_OPT_OUT_PROJ, 0, SELFATTN_OK}};
    run_opt_steps(first, sizeof first / sizeof first[0]);

    /* dv default, OUT_PROJ 0, then HEAD_DIM (which is dv) breaking it */
    static const opt_step head_dim[] = {{0, SELFATTN_OPT_OUT_PROJ, 0, SELFATTN_OK},
                                        {0, SELFATTN_OPT_HEAD_DIM, 4, SELFATTN_ERR_INVALID},
                                        {1, SELFATTN_OPT_HEAD_DIM, 8, SELFATTN_OK},
                                        {1, SELFATTN_OPT_V_HEAD_DIM, 8, SELFATTN_OK}};
    run_opt_steps(head_dim, sizeof head_dim / sizeof head_dim[0]);

    /* dv first, then OUT_PROJ 0: INVALID; with a fitting dv, fine */
    static const opt_step dv_first[] = {{0, SELFATTN_OPT_V_HEAD_DIM, 12, SELFATTN_OK},
                                        {0, SELFATTN_OPT_OUT_PROJ, 0, SELFATTN_ERR_INVALID},
                                        {1, SELFATTN_OPT_OUT_PROJ, 1, SELFATTN_OK},
                                        {1, SELFATTN_OPT_V_HEAD_DIM, 12, SELFATTN_OK},
                                        {0, SELFATTN_OPT_HEAD_DIM, 6, SELFATTN_OK},
                                        {0, SELFATTN_OPT_V_HEAD_DIM, 8, SELFATTN_OK},
                                        {0, SELFATTN_OPT_OUT_PROJ, 0, SELFATTN_OK},
                                        {1, SELFATTN_OPT_HEAD_DIM, 6, SELFATTN_OK}};
    run_opt_steps(dv_first, sizeof dv_first / sizeof dv_first[0]);
}

/* Calls whose checks fail write nothing; a cache made before dv changed is STATE. */
static void test_calls(void **state)
{
    (void)state;
    /* heads kv dm causal window alibi rope biases softcap batch seq lengths */
    const vcase c = {4, 2, 40, 1, 0, 0, 0, 0, 0.0, 1, 4, 0};
    tu_layer t;
    ref_opts o;
    make_layer(&c, HD, 2 * HD, 0, 31, &t, &o);
    float x[4 * 40], y[4 * 40];
    tu_set(x, 4 * 40, 0.5f);
    tu_set(y, 4 * 40, SENT);
    const int32_t bad_len[1] = {5};
    assert_int_equal(selfattn_forward(t.layer, 1, 4, x, bad_len, y), SELFATTN_ERR_INVALID);
    assert_true(tu_all_equal(y, 4 * 40, SENT));

    /* attend needs no weights: q [1][2][4 x 12], k [1][3][2 x 12], v [1][3][2 x dv] */
    selfattn_layer *l;
    assert_int_equal(selfattn_layer_create(48, 4, &l), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_N_KV_HEADS, 2), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_V_HEAD_DIM, 5), SELFATTN_OK);
    float q[2 * 48], k[3 * 24], v[3 * 10], out[2 * 20];
    tu_rng r = {4};
    tu_fill(&r, q, 2 * 48, -1, 1);
    tu_fill(&r, k, 3 * 24, -1, 1);
    tu_fill(&r, v, 3 * 10, -1, 1);
    tu_set(out, 2 * 20, SENT);
    assert_int_equal(selfattn_attend(l, 1, 2, 3, q, k, v, bad_len, out), SELFATTN_ERR_INVALID);
    assert_true(tu_all_equal(out, 2 * 20, SENT));
    assert_int_equal(selfattn_attend(l, 1, 2, 3, q, k, v, NULL, out), SELFATTN_OK);
    assert_false(tu_all_equal(out, 2 * 20, SENT));
    selfattn_layer_destroy(l);

    /* a cache records dv: a layer whose dv differs cannot use it (the shape changes before
       weights; here a fresh layer of the same shape with a cache, then dv changed) */
    assert_int_equal(selfattn_layer_create(16, 2, &l), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_CAUSAL, 1), SELFATTN_OK);
    selfattn_cache *cache;
    assert_int_equal(selfattn_cache_create(l, 1, 4, &cache), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_V_HEAD_DIM, 4), SELFATTN_OK);
    float w[16 * 16];
    memset(w, 0, sizeof w);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_Q, w, 16 * 16), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_K, w, 16 * 16), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_V, w, 8 * 16), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_O, w, 16 * 8), SELFATTN_OK);
    float xc[16], yc[16];
    tu_set(xc, 16, 0.25f);
    tu_set(yc, 16, SENT);
    assert_int_equal(selfattn_forward_cached(l, cache, 1, xc, NULL, yc), SELFATTN_ERR_STATE);
    assert_true(tu_all_equal(yc, 16, SENT));
    int32_t len = -1;
    assert_int_equal(selfattn_cache_length(cache, 0, &len), SELFATTN_OK);
    assert_int_equal(len, 0);
    selfattn_cache_destroy(cache);
    assert_int_equal(selfattn_cache_create(l, 1, 4, &cache), SELFATTN_OK);
    assert_int_equal(selfattn_forward_cached(l, cache, 1, xc, NULL, yc), SELFATTN_OK);
    selfattn_cache_destroy(cache);
    selfattn_layer_destroy(l);
    tu_layer_free(&t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reference_finite_differences),
        cmocka_unit_test(test_forward),
        cmocka_unit_test(test_half_weights),
        cmocka_unit_test(test_attend),
        cmocka_unit_test(test_backward),
        cmocka_unit_test(test_cache),
        cmocka_unit_test(test_options),
        cmocka_unit_test(test_out_proj_rule),
        cmocka_unit_test(test_calls),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
