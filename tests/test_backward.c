/* Gradients: selfattn_backward and selfattn_attend_backward against the float64 reference
 * gradients of reference.c, which are themselves checked here against central finite differences
 * of the float64 forward (ref_forward_ex, ref_attend_ex) on tiny shapes.
 *
 * Tolerances. Finite differences: the loss sum(dy * y) is smooth in every input (the masks do not
 * depend on values), central differences with a step of 1e-3 have a truncation error of order
 * 1e-6 of the gradient's scale, so |fd - ref| <= 1e-5 (1 + max|ref|). Library: float32 with
 * sums over at most a few hundred terms of similar size, as the forward (test_numerics.c allows
 * 1e-4 of the scale); a gradient also goes through the softmax's derivative, P (dP - D), whose
 * terms cancel: max|g - g_ref| <= 1e-4 max|g_ref| (the worst case seen is printed).
 * Also: padding rows (dx = 0, NaN in their dy changes nothing), bit-identical results with 1 and
 * 2 threads, partial requests giving the same bits, and every error status with no write. */
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
#define FD_TOL 1e-5
#define SENT -4242.0f

static double worst; /* largest relative error seen against the reference */

static void expect_close(const char *what, const float *a, const double *r, size_t n)
{
    double err, mx;
    ref_max_err(a, r, n, &err, &mx);
    /* (db_K is 0 up to rounding without RoPE: softmax ignores a shift common to all keys) */
    if (mx > 1e-3 && err / mx > worst)
        worst = err / mx;
    if (!(err <= TOL * mx + 1e-6)) {
        print_message("%s: max error %g, scale %g\n", what, err, mx);
        fail();
    }
}

/* ---- A test layer with every option -------------------------------------------------------- */

typedef struct bcase {
    int heads, kv_heads, hd, extra_dm; /* d_model = heads * hd + extra_dm (out_proj on only) */
    int causal, window, alibi, rope, rope_dims, out_proj, lengths, biases, packed, threads;
    double softcap, scale, theta;
    int batch, seq;
} bcase;

static void make_layer(const bcase *c, uint64_t seed, tu_layer *t, ref_opts *o)
{
    const int dm = c->heads * c->hd + (c->out_proj ? c->extra_dm : 0);
    const tu_spec spec = {dm,          c->heads,  c->kv_heads, c->hd,      c->causal,
                          c->out_proj, c->packed, c->biases,   c->threads, (float)c->scale};
    assert_int_equal(tu_layer_make(&spec, seed, t), SELFATTN_OK);
    memset(o, 0, sizeof *o);
    o->window = c->window;
    o->alibi = c->alibi;
    o->softcap = c->softcap;
    o->rope = c->rope;
    o->rope_dims = c->rope_dims;
    o->rope_theta = c->theta;
    assert_int_equal(tu_layer_set_opts(t->layer, o), SELFATTN_OK);
}

/* The sizes of the eight gradients (0: not there). */
static void grad_sizes(const ref_layer *r, size_t n[8])
{
    const size_t dm = (size_t)r->d_model, nq = (size_t)r->n_heads * r->head_dim;
    const size_t nkv = (size_t)r->n_kv_heads * r->head_dim;
    const size_t s[8] = {nq * dm, nkv * dm, nkv * dm, dm * nq, nq, nkv, nkv, dm};
    for (int i = 0; i < 8; i++)
        n[i] = (!r->out_proj && (i == 3 || i == 7)) ? 0 : s[i];
}

typedef struct bufs {
    float *dx, *g[8];
    selfattn_grads grads;
} bufs;

static void bufs_make(bufs *b, const ref_layer *r, size_t n_x)
{
    size_t n[8];
    grad_sizes(r, n);
    b->dx = malloc(sizeof(float) * n_x);
    tu_set(b->dx, n_x, SENT);
    for (int i = 0; i < 8; i++) {
        b->g[i] = n[i] ? malloc(sizeof(float) * n[i]) : NULL;
        if (b->g[i])
            tu_set(b->g[i], n[i], SENT);
    }
    memset(&b->grads, 0, sizeof b->grads);
    b->grads.struct_size = sizeof b->grads;
    b->grads.w_q = b->g[0];
    b->grads.w_k = b->g[1];
    b->grads.w_v = b->g[2];
    b->grads.w_o = b->g[3];
    b->grads.b_q = b->g[4];
    b->grads.b_k = b->g[5];
    b->grads.b_v = b->g[6];
    b->grads.b_o = b->g[7];
}

static void bufs_free(bufs *b)
{
    free(b->dx);
    for (int i = 0; i < 8; i++)
        free(b->g[i]);
}

static const char *gnames[8] = {"dW_Q", "dW_K", "dW_V", "dW_O", "db_Q", "db_K", "db_V", "db_O"};

/* dx and every asked-for gradient of b against the float64 reference (n[i] 0: not there). */
static void expect_grads_close(const char *dx_name, const bufs *b, const double *rdx,
                               double *const rg[8], size_t n_x, const size_t n[8])
{
    expect_close(dx_name, b->dx, rdx, n_x);
    for (int i = 0; i < 8; i++)
        if (n[i])
            expect_close(gnames[i], b->g[i], rg[i], n[i]);
}

/* The same bits in dx and every gradient. */
static void expect_same_bits(const bufs *a, const bufs *b, size_t n_x, const size_t n[8])
{
    assert_memory_equal(a->dx, b->dx, sizeof(float) * n_x);
    for (int i = 0; i < 8; i++)
        assert_memory_equal(a->g[i], b->g[i], sizeof(float) * n[i]);
}

/* Rows of padding (t >= lens[b]) of dx [batch][seq][dm] are exactly 0. */
static void expect_padding_zero(const float *dx, const int32_t *lens, int batch, int seq, int dm)
{
    for (int b = 0; lens != NULL && b < batch; b++)
        for (size_t e = (size_t)lens[b] * dm; e < (size_t)seq * dm; e++)
            assert_true(dx[(size_t)b * seq * dm + e] == 0.0f);
}

/* The gradients through a train state of its own (forward_train, then backward_train) into out;
   the forward's y into y. */
static void train_backward(const selfattn_layer *l, int batch, int seq, const float *x,
                           const int32_t *lens, const float *dy, float *y, bufs *out)
{
    size_t bytes = 0;
    assert_int_equal(selfattn_train_state_size(l, batch, seq, &bytes), SELFATTN_OK);
    void *st = malloc(bytes);
    assert_int_equal(selfattn_forward_train(l, batch, seq, x, lens, y, st, bytes), SELFATTN_OK);
    assert_int_equal(
        selfattn_backward_train(l, batch, seq, x, lens, dy, out->dx, &out->grads, st, bytes),
        SELFATTN_OK);
    free(st);
}

static const int32_t *case_lengths(const bcase *c, int32_t *lens)
{
    if (!c->lengths)
        return NULL;
    for (int b = 0; b < c->batch; b++)
        if (c->lengths == 2) /* every sequence short */
            lens[b] = c->seq > 5 ? 5 - b : 1;
        else
            lens[b] = b == 0 ? c->seq : b == 1 ? (c->seq > 4 ? 4 : 1) : 0;
    return lens;
}

/* The layer's gradients against ref_backward. */
static void run_layer_case(const bcase *c, uint64_t seed)
{
    tu_layer t;
    ref_opts o;
    make_layer(c, seed, &t, &o);
    const int dm = t.ref.d_model;
    const size_t n_x = (size_t)c->batch * c->seq * dm;
    tu_rng r = {seed * 7 + 1};
    float *x = tu_random(&r, n_x, -1.5f, 1.5f), *dy = tu_random(&r, n_x, -1, 1);
    int32_t lens[4];
    const int32_t *lp = case_lengths(c, lens);
    bufs lib;
    bufs_make(&lib, &t.ref, n_x);
    assert_int_equal(selfattn_backward(t.layer, c->batch, c->seq, x, lp, dy, lib.dx, &lib.grads),
                     SELFATTN_OK);
    size_t n[8];
    grad_sizes(&t.ref, n);
    double *rdx = malloc(sizeof(double) * n_x), *rg[8];
    for (int i = 0; i < 8; i++)
        rg[i] = malloc(sizeof(double) * (n[i] ? n[i] : 1));
    ref_backward(&t.ref, &o, c->batch, c->seq, x, lp, dy, rdx, rg);
    expect_grads_close("dx", &lib, rdx, rg, n_x, n);
    expect_padding_zero(lib.dx, lp, c->batch, c->seq, dm); /* exactly 0 */

    /* The same through the kept activations: y bit for bit as selfattn_forward's, gradients
       against the same reference. */
    float *y = malloc(sizeof(float) * n_x), *y_train = malloc(sizeof(float) * n_x);
    assert_int_equal(selfattn_forward(t.layer, c->batch, c->seq, x, lp, y), SELFATTN_OK);
    bufs kept;
    bufs_make(&kept, &t.ref, n_x);
    train_backward(t.layer, c->batch, c->seq, x, lp, dy, y_train, &kept);
    assert_memory_equal(y_train, y, sizeof(float) * n_x);
    expect_grads_close("dx (train)", &kept, rdx, rg, n_x, n);
    expect_padding_zero(kept.dx, lp, c->batch, c->seq, dm);
    bufs_free(&kept);
    free(y);
    free(y_train);
    free(x);
    free(dy);
    free(rdx);
    for (int i = 0; i < 8; i++)
        free(rg[i]);
    bufs_free(&lib);
    tu_layer_free(&t);
}

/* attend_backward against ref_attend_backward, with q_len != kv_len. */
static void run_attend_case(const bcase *c, int q_len, int kv_len, uint64_t seed)
{
    tu_layer t;
    ref_opts o;
    make_layer(c, seed, &t, &o);
    o.rope = 0; /* attend takes q and k as they are */
    const size_t nq = (size_t)c->heads * c->hd, nkv = (size_t)c->kv_heads * c->hd;
    const size_t n_q = (size_t)c->batch * q_len * nq, n_k = (size_t)c->batch * kv_len * nkv;
    tu_rng r = {seed * 3 + 2};
    float *q = tu_random(&r, n_q, -1.5f, 1.5f), *k = tu_random(&r, n_k, -1.5f, 1.5f);
    float *v = tu_random(&r, n_k, -1, 1), *go = tu_random(&r, n_q, -1, 1);
    int32_t lens[4];
    const int32_t *lp = tu_key_lengths(c->lengths, c->batch, kv_len, lens);
    float *dq = malloc(sizeof(float) * n_q), *dk = malloc(sizeof(float) * n_k);
    float *dv = malloc(sizeof(float) * n_k);
    tu_set(dq, n_q, SENT);
    tu_set(dk, n_k, SENT);
    tu_set(dv, n_k, SENT);
    assert_int_equal(selfattn_attend_backward(t.layer, c->batch, q_len, kv_len, q, k, v, lp, go,
                                              dq, dk, dv),
                     SELFATTN_OK);
    double *rq = malloc(sizeof(double) * n_q), *rk = malloc(sizeof(double) * n_k);
    double *rv = malloc(sizeof(double) * n_k);
    ref_attend_backward(&t.ref, &o, c->batch, q_len, kv_len, q, k, v, lp, go, rq, rk, rv);
    expect_close("dq", dq, rq, n_q);
    expect_close("dk", dk, rk, n_k);
    expect_close("dv", dv, rv, n_k);
    /* rows past kv_lengths: exactly 0 */
    for (int b = 0; lp != NULL && b < c->batch; b++)
        for (size_t e = (size_t)lp[b] * nkv; e < (size_t)kv_len * nkv; e++) {
            assert_true(dk[(size_t)b * kv_len * nkv + e] == 0.0f);
            assert_true(dv[(size_t)b * kv_len * nkv + e] == 0.0f);
        }
    /* each alone: the same bits */
    float *one = malloc(sizeof(float) * (n_q > n_k ? n_q : n_k));
    assert_int_equal(selfattn_attend_backward(t.layer, c->batch, q_len, kv_len, q, k, v, lp, go,
                                              one, NULL, NULL),
                     SELFATTN_OK);
    assert_memory_equal(one, dq, sizeof(float) * n_q);
    assert_int_equal(selfattn_attend_backward(t.layer, c->batch, q_len, kv_len, q, k, v, lp, go,
                                              NULL, one, NULL),
                     SELFATTN_OK);
    assert_memory_equal(one, dk, sizeof(float) * n_k);
    assert_int_equal(selfattn_attend_backward(t.layer, c->batch, q_len, kv_len, q, k, v, lp, go,
                                              NULL, NULL, one),
                     SELFATTN_OK);
    assert_memory_equal(one, dv, sizeof(float) * n_k);
    free(one);
    free(q);
    free(k);
    free(v);
    free(go);
    free(dq);
    free(dk);
    free(dv);
    free(rq);
    free(rk);
    free(rv);
    tu_layer_free(&t);
}

/* ---- The reference against finite differences ------------------------------------------------ */

/* d loss / d p[i] for every i by central differences, against the analytic g. */
static void fd_check(const char *what, float *p, size_t n, const double *g, const ref_layer *l,
                     const ref_opts *o, int batch, int seq, const float *x, const int32_t *lens,
                     const float *dy, double *y)
{
    const tu_fd_forward f = {l, o, batch, seq, x, lens, dy, y};
    double mx;
    const double err = tu_fd_error(p, n, g, tu_fd_forward_loss, &f, &mx);
    if (!(err <= FD_TOL * (1.0 + mx))) {
        print_message("%s: finite differences differ by %g (scale %g)\n", what, err, mx);
        fail();
    }
}

static void fd_layer_case(const bcase *c, uint64_t seed)
{
    tu_layer t;
    ref_opts o;
    make_layer(c, seed, &t, &o);
    const int dm = t.ref.d_model;
    const size_t n_x = (size_t)c->batch * c->seq * dm;
    tu_rng r = {seed + 99};
    float *x = tu_random(&r, n_x, -1.5f, 1.5f), *dy = tu_random(&r, n_x, -1, 1);
    int32_t lens[4];
    const int32_t *lp = case_lengths(c, lens);
    size_t n[8];
    grad_sizes(&t.ref, n);
    double *dx = malloc(sizeof(double) * n_x), *g[8], *y = malloc(sizeof(double) * n_x);
    for (int i = 0; i < 8; i++)
        g[i] = malloc(sizeof(double) * (n[i] ? n[i] : 1));
    ref_backward(&t.ref, &o, c->batch, c->seq, x, lp, dy, dx, g);
    fd_check("dx", x, n_x, dx, &t.ref, &o, c->batch, c->seq, x, lp, dy, y);
    for (int i = 0; i < 8; i++)
        if (n[i] && t.w[i] != NULL) /* the reference reads t.w[i] through t.ref */
            fd_check(gnames[i], t.w[i], n[i], g[i], &t.ref, &o, c->batch, c->seq, x, lp, dy, y);
    free(x);
    free(dy);
    free(dx);
    free(y);
    for (int i = 0; i < 8; i++)
        free(g[i]);
    tu_layer_free(&t);
}

static void fd_attend_case(const bcase *c, int ql, int kl, uint64_t seed)
{
    tu_layer t;
    ref_opts o;
    make_layer(c, seed, &t, &o);
    o.rope = 0;
    const size_t nq = (size_t)c->heads * c->hd, nkv = (size_t)c->kv_heads * c->hd;
    const size_t n_q = (size_t)c->batch * ql * nq, n_k = (size_t)c->batch * kl * nkv;
    tu_rng r = {seed + 5};
    float *q = tu_random(&r, n_q, -1.5f, 1.5f), *k = tu_random(&r, n_k, -1.5f, 1.5f);
    float *v = tu_random(&r, n_k, -1, 1), *go = tu_random(&r, n_q, -1, 1);
    const int32_t lens[4] = {kl, kl - 2, 1, 0};
    const int32_t *lp = c->lengths ? lens : NULL;
    double *g[3] = {malloc(sizeof(double) * n_q), malloc(sizeof(double) * n_k),
                    malloc(sizeof(double) * n_k)};
    double *out = malloc(sizeof(double) * n_q);
    ref_attend_backward(&t.ref, &o, c->batch, ql, kl, q, k, v, lp, go, g[0], g[1], g[2]);
    float *p[3] = {q, k, v};
    const size_t n[3] = {n_q, n_k, n_k};
    const tu_fd_attend f = {&t.ref, &o, c->batch, ql, kl, q, k, v, lp, go, out};
    for (int m = 0; m < 3; m++) {
        double mx;
        const double err = tu_fd_error(p[m], n[m], g[m], tu_fd_attend_loss, &f, &mx);
        if (!(err <= FD_TOL * (1.0 + mx))) {
            print_message("attend d%c: finite differences differ by %g\n", "qkv"[m], err);
            fail();
        }
    }
    free(q);
    free(k);
    free(v);
    free(go);
    free(out);
    for (int m = 0; m < 3; m++)
        free(g[m]);
    tu_layer_free(&t);
}

/* The hand-derived reference against finite differences, over the options that change the
   derivative: GQA, causal, window, RoPE modes with partial dims and theta, ALiBi, softcap, scale,
   output projection on and off, lengths, biases. */
static void test_reference_finite_differences(void **state)
{
    (void)state;
    /* heads kv hd extra causal window alibi rope rdims oproj lens bias packed thr cap scale theta
       B L */
    const bcase cases[] = {
        {2, 2, 4, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 1, 0.0, 0.0, 0.0, 1, 5},
        {2, 1, 4, 3, 1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1.5, 0.0, 0.0, 3, 5},
        {2, 2, 4, 0, 0, 2, 0, 2, 2, 0, 1, 1, 0, 1, 0.0, 0.7, 100.0, 2, 6},
        {4, 2, 2, 0, 1, 3, 1, 1, 2, 1, 0, 0, 0, 1, 0.8, 0.0, 0.0, 1, 6},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        fd_layer_case(&cases[i], 40 + i);
        fd_attend_case(&cases[i], 4, 6, 60 + i);
        fd_attend_case(&cases[i], 6, 6, 80 + i);
    }
}

/* ---- The library against the reference ----------------------------------------------------- */

/* Every option alone and in combination, layer and attention. */
static void test_combinations(void **state)
{
    (void)state;
    int n = 0;
    for (int causal = 0; causal <= 1; causal++)
        for (int window = 0; window <= 3; window += 3)
            for (int gqa = 0; gqa <= 2; gqa++)
                for (int lengths = 0; lengths <= 1; lengths++)
                    for (int alibi = 0; alibi <= 1; alibi++)
                        for (int cap = 0; cap <= 1; cap++) {
                            const int rope = n % 3, oproj = (n / 3) % 2;
                            bcase c = {4,         gqa == 0 ? 4 : gqa == 1 ? 2 : 1,
                                       8,         oproj ? 3 : 0,
                                       causal,    window,
                                       alibi,     rope,
                                       n % 4 == 0 ? 4 : 0, oproj,
                                       lengths,   n % 5 != 0,
                                       0,         2,
                                       cap ? 2.0 : 0.0, n % 7 == 0 ? 0.3 : 0.0,
                                       n % 6 == 0 ? 500.0 : 0.0, 3,
                                       9};
                            run_layer_case(&c, 1000 + (uint64_t)n);
                            run_attend_case(&c, 7, 10, 2000 + (uint64_t)n);
                            run_attend_case(&c, 10, 7, 3000 + (uint64_t)n);
                            n++;
                        }
    print_message("  %d combinations, layer and attention (worst relative error %.2g)\n", n,
                  worst);
}

/* Longer sequences: several query blocks, key blocks and query chunks per task, through passes A
   and B (fewer than 4 tasks of batch x key/value heads) and the single pass. */
static void test_multiblock(void **state)
{
    (void)state;
    /* heads kv hd extra causal window alibi rope rdims oproj lens bias packed thr cap scale theta
       B L */
    const bcase cases[] = {
        {2, 1, 8, 0, 1, 0, 0, 1, 0, 1, 1, 1, 0, 2, 0.0, 0.0, 0.0, 2, 600},
        {2, 2, 8, 0, 0, 0, 1, 2, 4, 0, 0, 1, 0, 2, 5.0, 0.0, 0.0, 1, 560},
        {2, 1, 8, 4, 1, 150, 0, 0, 0, 1, 1, 0, 0, 2, 0.0, 0.0, 0.0, 2, 400},
        {2, 2, 8, 0, 0, 70, 1, 0, 0, 1, 0, 1, 1, 2, 0.0, 0.0, 0.0, 1, 300},
        /* batch x key/value heads >= 4: the single pass (dQ summed over key blocks in order) */
        {4, 4, 8, 0, 1, 0, 0, 1, 0, 1, 1, 1, 0, 2, 0.0, 0.0, 0.0, 1, 600},
        {4, 2, 8, 4, 0, 150, 1, 0, 0, 1, 1, 0, 0, 2, 3.0, 0.0, 0.0, 2, 560},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        run_layer_case(&cases[i], 500 + i);
        run_attend_case(&cases[i], cases[i].seq - 37, cases[i].seq, 600 + i);
    }
    print_message("  worst relative error %.2g\n", worst);
}

/* Packed W_QKV gives the same gradients, reported as W_Q, W_K, W_V. */
/* Every sequence shorter than seq_len (none full), and d_model below n_heads * head_dim. */
static void test_every_sequence_short(void **state)
{
    (void)state;
    const bcase c = {4, 4, 2, -7, 1, 0, 0, 1, 0, 1, 2, 1, 0, 2, 0.0, 0.0, 0.0, 2, 20};
    run_layer_case(&c, 77);
    const bcase c2 = {4, 4, 2, 0, 0, 0, 0, 0, 0, 1, 2, 1, 0, 1, 0.0, 0.0, 0.0, 2, 20};
    run_layer_case(&c2, 77);
}

static void test_packed(void **state)
{
    (void)state;
    const bcase c = {4, 4, 8, 0, 1, 0, 0, 1, 0, 1, 1, 1, 1, 2, 0.0, 0.0, 0.0, 2, 12};
    run_layer_case(&c, 77);
}

/* Rows of padding: dx 0 and NaN in their dy changes nothing, bit for bit. */
static void test_padding(void **state)
{
    (void)state;
    const bcase c = {4, 2, 8, 4, 1, 0, 1, 1, 0, 1, 1, 1, 0, 2, 0.0, 0.0, 0.0, 3, 40};
    tu_layer t;
    ref_opts o;
    make_layer(&c, 5, &t, &o);
    const int dm = t.ref.d_model;
    const size_t n_x = (size_t)c.batch * c.seq * dm;
    tu_rng r = {17};
    float *x = tu_random(&r, n_x, -1, 1), *dy = tu_random(&r, n_x, -1, 1);
    const int32_t lens[3] = {40, 9, 0};
    for (int b = 0; b < 3; b++)
        for (size_t e = (size_t)lens[b] * dm; e < (size_t)c.seq * dm; e++) {
            dy[(size_t)b * c.seq * dm + e] = 0.0f;
            x[(size_t)b * c.seq * dm + e] = NAN; /* x there is never read either */
        }
    bufs a, b2;
    bufs_make(&a, &t.ref, n_x);
    bufs_make(&b2, &t.ref, n_x);
    assert_int_equal(selfattn_backward(t.layer, 3, c.seq, x, lens, dy, a.dx, &a.grads),
                     SELFATTN_OK);
    for (int b = 0; b < 3; b++)
        for (size_t e = (size_t)lens[b] * dm; e < (size_t)c.seq * dm; e++)
            dy[(size_t)b * c.seq * dm + e] = NAN;
    assert_int_equal(selfattn_backward(t.layer, 3, c.seq, x, lens, dy, b2.dx, &b2.grads),
                     SELFATTN_OK);
    size_t n[8];
    grad_sizes(&t.ref, n);
    expect_same_bits(&a, &b2, n_x, n);
    expect_padding_zero(a.dx, lens, 3, c.seq, dm);
    /* the same through the train state, NaN dy and x in the padding rows: the same gradients to
       rounding (they take another path), dx 0 in the padding rows */
    float *y = malloc(sizeof(float) * n_x);
    bufs k;
    bufs_make(&k, &t.ref, n_x);
    train_backward(t.layer, 3, c.seq, x, lens, dy, y, &k);
    for (size_t e = 0; e < n_x; e++)
        assert_true(fabsf(k.dx[e] - a.dx[e]) <= 1e-5f);
    for (int i = 0; i < 8; i++)
        for (size_t e = 0; e < n[i]; e++)
            assert_true(fabsf(k.g[i][e] - a.g[i][e]) <= 1e-5f);
    expect_padding_zero(k.dx, lens, 3, c.seq, dm);
    bufs_free(&k);
    free(y);
    /* every sequence empty: dx all 0, weight gradients all 0 */
    const int32_t zero[3] = {0, 0, 0};
    assert_int_equal(selfattn_backward(t.layer, 3, c.seq, x, zero, dy, a.dx, &a.grads),
                     SELFATTN_OK);
    assert_true(tu_all_equal(a.dx, n_x, 0.0f));
    for (int i = 0; i < 8; i++)
        assert_true(tu_all_equal(a.g[i], n[i], 0.0f));
    free(x);
    free(dy);
    bufs_free(&a);
    bufs_free(&b2);
    tu_layer_free(&t);
}

/* One, two and three threads, and repeated calls: the same bits. */
static void test_threads_identical(void **state)
{
    (void)state;
    const bcase c = {4, 2, 16, 0, 1, 0, 0, 1, 0, 1, 1, 1, 0, 1, 1.0, 0.0, 0.0, 2, 700};
    tu_layer t;
    ref_opts o;
    make_layer(&c, 9, &t, &o);
    const int dm = t.ref.d_model;
    const size_t n_x = (size_t)c.batch * c.seq * dm;
    tu_rng r = {23};
    float *x = tu_random(&r, n_x, -1, 1), *dy = tu_random(&r, n_x, -1, 1);
    const int32_t lens[2] = {700, 333};
    size_t n[8];
    grad_sizes(&t.ref, n);
    bufs ref;
    bufs_make(&ref, &t.ref, n_x);
    assert_int_equal(selfattn_backward(t.layer, 2, c.seq, x, lens, dy, ref.dx, &ref.grads),
                     SELFATTN_OK);
    const size_t nq = 4 * 16, nkv = 2 * 16, n_q = 2 * 700 * nq, n_k = 2 * 700 * nkv;
    float *q = tu_random(&r, n_q, -1, 1), *k = tu_random(&r, n_k, -1, 1);
    float *v = tu_random(&r, n_k, -1, 1), *go = tu_random(&r, n_q, -1, 1);
    float *aq = malloc(sizeof(float) * n_q), *ak = malloc(sizeof(float) * n_k);
    float *av = malloc(sizeof(float) * n_k), *bq = malloc(sizeof(float) * n_q);
    float *bk = malloc(sizeof(float) * n_k), *bv = malloc(sizeof(float) * n_k);
    assert_int_equal(selfattn_attend_backward(t.layer, 2, 700, 700, q, k, v, lens, go, aq, ak, av),
                     SELFATTN_OK);
    for (int threads = 2; threads <= 3; threads++)
        for (int rep = 0; rep < 2; rep++) {
            assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_THREADS, threads),
                             SELFATTN_OK);
            bufs run;
            bufs_make(&run, &t.ref, n_x);
            assert_int_equal(
                selfattn_backward(t.layer, 2, c.seq, x, lens, dy, run.dx, &run.grads),
                SELFATTN_OK);
            expect_same_bits(&run, &ref, n_x, n);
            bufs_free(&run);
            assert_int_equal(
                selfattn_attend_backward(t.layer, 2, 700, 700, q, k, v, lens, go, bq, bk, bv),
                SELFATTN_OK);
            assert_memory_equal(aq, bq, sizeof(float) * n_q);
            assert_memory_equal(ak, bk, sizeof(float) * n_k);
            assert_memory_equal(av, bv, sizeof(float) * n_k);
        }
    /* the train state's backward: the same bits with 1, 2 and 3 threads (the state filled with 1) */
    assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_THREADS, 1), SELFATTN_OK);
    size_t bytes = 0;
    assert_int_equal(selfattn_train_state_size(t.layer, 2, c.seq, &bytes), SELFATTN_OK);
    void *st = malloc(bytes);
    float *y = malloc(sizeof(float) * n_x);
    assert_int_equal(selfattn_forward_train(t.layer, 2, c.seq, x, lens, y, st, bytes), SELFATTN_OK);
    bufs kref;
    bufs_make(&kref, &t.ref, n_x);
    assert_int_equal(
        selfattn_backward_train(t.layer, 2, c.seq, x, lens, dy, kref.dx, &kref.grads, st, bytes),
        SELFATTN_OK);
    for (int threads = 2; threads <= 3; threads++) {
        assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_THREADS, threads), SELFATTN_OK);
        bufs run;
        bufs_make(&run, &t.ref, n_x);
        assert_int_equal(
            selfattn_backward_train(t.layer, 2, c.seq, x, lens, dy, run.dx, &run.grads, st, bytes),
            SELFATTN_OK);
        expect_same_bits(&run, &kref, n_x, n);
        bufs_free(&run);
    }
    bufs_free(&kref);
    free(st);
    free(y);
    assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_THREADS, 1), SELFATTN_OK);
    free(x);
    free(dy);
    free(q);
    free(k);
    free(v);
    free(go);
    free(aq);
    free(ak);
    free(av);
    free(bq);
    free(bk);
    free(bv);
    bufs_free(&ref);
    tu_layer_free(&t);
}

/* Asking for part of the gradients gives the same bits for those parts and leaves the rest
   alone; asking for none is a successful no-op. */
static void test_partial(void **state)
{
    (void)state;
    const bcase c = {4, 2, 8, 0, 1, 0, 1, 2, 0, 1, 1, 1, 0, 2, 0.0, 0.0, 0.0, 2, 30};
    tu_layer t;
    ref_opts o;
    make_layer(&c, 31, &t, &o);
    const int dm = t.ref.d_model;
    const size_t n_x = (size_t)c.batch * c.seq * dm;
    tu_rng r = {29};
    float *x = tu_random(&r, n_x, -1, 1), *dy = tu_random(&r, n_x, -1, 1);
    const int32_t lens[2] = {30, 11};
    size_t n[8];
    grad_sizes(&t.ref, n);
    bufs full;
    bufs_make(&full, &t.ref, n_x);
    assert_int_equal(selfattn_backward(t.layer, 2, c.seq, x, lens, dy, full.dx, &full.grads),
                     SELFATTN_OK);
    for (int want = 0; want < 8; want++) {
        bufs one;
        bufs_make(&one, &t.ref, n_x);
        float *keep = one.g[want];
        memset(&one.grads.w_q, 0, sizeof one.grads - offsetof(selfattn_grads, w_q));
        float **slot[8] = {&one.grads.w_q, &one.grads.w_k, &one.grads.w_v, &one.grads.w_o,
                           &one.grads.b_q, &one.grads.b_k, &one.grads.b_v, &one.grads.b_o};
        *slot[want] = keep;
        assert_int_equal(selfattn_backward(t.layer, 2, c.seq, x, lens, dy, NULL, &one.grads),
                         SELFATTN_OK);
        assert_memory_equal(keep, full.g[want], sizeof(float) * n[want]);
        for (int i = 0; i < 8; i++)
            if (i != want)
                assert_true(tu_all_equal(one.g[i], n[i], SENT));
        bufs_free(&one);
    }
    bufs only;
    bufs_make(&only, &t.ref, n_x);
    assert_int_equal(selfattn_backward(t.layer, 2, c.seq, x, lens, dy, only.dx, NULL),
                     SELFATTN_OK);
    assert_memory_equal(only.dx, full.dx, sizeof(float) * n_x);
    tu_set(only.dx, n_x, SENT);
    assert_int_equal(selfattn_backward(t.layer, 2, c.seq, x, lens, dy, NULL, NULL), SELFATTN_OK);
    /* a newer caller's larger struct with a zero tail */
    struct {
        selfattn_grads g;
        uint64_t newer[2];
    } big;
    memset(&big, 0, sizeof big);
    big.g.struct_size = sizeof big;
    big.g.w_q = only.g[0];
    assert_int_equal(selfattn_backward(t.layer, 2, c.seq, x, lens, dy, NULL, &big.g), SELFATTN_OK);
    assert_memory_equal(only.g[0], full.g[0], sizeof(float) * n[0]);
    free(x);
    free(dy);
    bufs_free(&full);
    bufs_free(&only);
    tu_layer_free(&t);
}

/* Queries that see no key (causal with more queries than keys, zero lengths): dq 0. */
static void test_attend_empty_rows(void **state)
{
    (void)state;
    const bcase c = {4, 2, 8, 0, 1, 2, 0, 0, 0, 1, 1, 1, 0, 1, 0.0, 0.0, 0.0, 2, 0};
    run_attend_case(&c, 9, 5, 7);
}

/* ---- Errors: exact statuses, nothing written ------------------------------------------------- */

static void test_errors(void **state)
{
    (void)state;
    const bcase c = {2, 2, 4, 0, 1, 0, 0, 0, 0, 1, 0, 1, 0, 1, 0.0, 0.0, 0.0, 2, 5};
    tu_layer t;
    ref_opts o;
    make_layer(&c, 3, &t, &o);
    const int dm = t.ref.d_model;
    const size_t n_x = (size_t)2 * 5 * dm;
    tu_rng r = {4};
    float *x = tu_random(&r, n_x, -1, 1), *dy = tu_random(&r, n_x, -1, 1);
    size_t n[8];
    grad_sizes(&t.ref, n);
    bufs b;
    bufs_make(&b, &t.ref, n_x);
    const selfattn_layer *l = t.layer;
#define UNTOUCHED()                                                                                \
    do {                                                                                           \
        assert_true(tu_all_equal(b.dx, n_x, SENT));                                                \
        for (int i_ = 0; i_ < 8; i_++)                                                             \
            assert_true(tu_all_equal(b.g[i_], n[i_], SENT));                                       \
    } while (0)
#define EXPECT(call, status)                                                                       \
    do {                                                                                           \
        assert_int_equal((call), (status));                                                        \
        UNTOUCHED();                                                                               \
    } while (0)
    EXPECT(selfattn_backward(NULL, 2, 5, x, NULL, dy, b.dx, &b.grads), SELFATTN_ERR_NULL);
    EXPECT(selfattn_backward(l, 2, 5, NULL, NULL, dy, b.dx, &b.grads), SELFATTN_ERR_NULL);
    EXPECT(selfattn_backward(l, 2, 5, x, NULL, NULL, b.dx, &b.grads), SELFATTN_ERR_NULL);
    EXPECT(selfattn_backward(l, 0, 5, x, NULL, dy, b.dx, &b.grads), SELFATTN_ERR_INVALID);
    EXPECT(selfattn_backward(l, 2, 0, x, NULL, dy, b.dx, &b.grads), SELFATTN_ERR_INVALID);
    EXPECT(selfattn_backward(l, -1, 5, x, NULL, dy, b.dx, &b.grads), SELFATTN_ERR_INVALID);
    const int32_t bad1[2] = {5, 6}, bad2[2] = {-1, 3};
    EXPECT(selfattn_backward(l, 2, 5, x, bad1, dy, b.dx, &b.grads), SELFATTN_ERR_INVALID);
    EXPECT(selfattn_backward(l, 2, 5, x, bad2, dy, b.dx, &b.grads), SELFATTN_ERR_INVALID);
    EXPECT(selfattn_backward(l, INT32_MAX, INT32_MAX, x, NULL, dy, b.dx, &b.grads),
           SELFATTN_ERR_OVERFLOW);
    /* struct_size: too small, larger with a non-zero tail */
    b.grads.struct_size = sizeof b.grads - 1;
    EXPECT(selfattn_backward(l, 2, 5, x, NULL, dy, b.dx, &b.grads), SELFATTN_ERR_INVALID);
    b.grads.struct_size = 0;
    EXPECT(selfattn_backward(l, 2, 5, x, NULL, dy, b.dx, &b.grads), SELFATTN_ERR_INVALID);
    struct {
        selfattn_grads g;
        uint32_t newer;
    } big;
    memset(&big, 0, sizeof big);
    big.g = b.grads;
    big.g.struct_size = sizeof big;
    big.newer = 1;
    EXPECT(selfattn_backward(l, 2, 5, x, NULL, dy, b.dx, &big.g), SELFATTN_ERR_UNSUPPORTED);
    b.grads.struct_size = sizeof b.grads;

    /* output projection off: w_o and b_o must be NULL */
    const bcase c2 = {2, 2, 4, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0.0, 0.0, 0.0, 2, 5};
    tu_layer t2;
    make_layer(&c2, 8, &t2, &o);
    float wo[64], bo[8];
    tu_set(wo, 64, SENT);
    tu_set(bo, 8, SENT);
    b.grads.w_o = wo;
    EXPECT(selfattn_backward(t2.layer, 2, 5, x, NULL, dy, b.dx, &b.grads), SELFATTN_ERR_INVALID);
    b.grads.w_o = NULL;
    b.grads.b_o = bo;
    EXPECT(selfattn_backward(t2.layer, 2, 5, x, NULL, dy, b.dx, &b.grads), SELFATTN_ERR_INVALID);
    assert_true(tu_all_equal(wo, 64, SENT) && tu_all_equal(bo, 8, SENT));
    b.grads.b_o = b.g[7];
    tu_layer_free(&t2);

    /* missing weights: STATE */
    selfattn_layer *bare = NULL;
    assert_int_equal(selfattn_layer_create(dm, 2, &bare), SELFATTN_OK);
    EXPECT(selfattn_backward(bare, 2, 5, x, NULL, dy, b.dx, &b.grads), SELFATTN_ERR_STATE);
    assert_int_equal(selfattn_layer_set_weight(bare, SELFATTN_W_Q, t.w[0], (int64_t)n[0]),
                     SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_weight(bare, SELFATTN_W_K, t.w[1], (int64_t)n[1]),
                     SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_weight(bare, SELFATTN_W_V, t.w[2], (int64_t)n[2]),
                     SELFATTN_OK);
    EXPECT(selfattn_backward(bare, 2, 5, x, NULL, dy, b.dx, &b.grads), SELFATTN_ERR_STATE);
    selfattn_layer_destroy(bare);
    /* head_dim undetermined */
    assert_int_equal(selfattn_layer_create(7, 2, &bare), SELFATTN_OK);
    EXPECT(selfattn_backward(bare, 2, 5, x, NULL, dy, b.dx, &b.grads), SELFATTN_ERR_STATE);

    /* attend_backward */
    const size_t nq = 2 * 4, n_q = 2 * 5 * nq;
    float *q = tu_random(&r, n_q, -1, 1), *k = tu_random(&r, n_q, -1, 1);
    float *v = tu_random(&r, n_q, -1, 1), *go = tu_random(&r, n_q, -1, 1);
    float *dq = malloc(sizeof(float) * n_q), *dk = malloc(sizeof(float) * n_q);
    float *dv = malloc(sizeof(float) * n_q);
    tu_set(dq, n_q, SENT);
    tu_set(dk, n_q, SENT);
    tu_set(dv, n_q, SENT);
#define AEXPECT(call, status)                                                                      \
    do {                                                                                           \
        assert_int_equal((call), (status));                                                        \
        assert_true(tu_all_equal(dq, n_q, SENT) && tu_all_equal(dk, n_q, SENT) &&                  \
                    tu_all_equal(dv, n_q, SENT));                                                  \
    } while (0)
    AEXPECT(selfattn_attend_backward(NULL, 2, 5, 5, q, k, v, NULL, go, dq, dk, dv),
            SELFATTN_ERR_NULL);
    AEXPECT(selfattn_attend_backward(l, 2, 5, 5, NULL, k, v, NULL, go, dq, dk, dv),
            SELFATTN_ERR_NULL);
    AEXPECT(selfattn_attend_backward(l, 2, 5, 5, q, NULL, v, NULL, go, dq, dk, dv),
            SELFATTN_ERR_NULL);
    AEXPECT(selfattn_attend_backward(l, 2, 5, 5, q, k, NULL, NULL, go, dq, dk, dv),
            SELFATTN_ERR_NULL);
    AEXPECT(selfattn_attend_backward(l, 2, 5, 5, q, k, v, NULL, NULL, dq, dk, dv),
            SELFATTN_ERR_NULL);
    AEXPECT(selfattn_attend_backward(l, 0, 5, 5, q, k, v, NULL, go, dq, dk, dv),
            SELFATTN_ERR_INVALID);
    AEXPECT(selfattn_attend_backward(l, 2, 0, 5, q, k, v, NULL, go, dq, dk, dv),
            SELFATTN_ERR_INVALID);
    AEXPECT(selfattn_attend_backward(l, 2, 5, -3, q, k, v, NULL, go, dq, dk, dv),
            SELFATTN_ERR_INVALID);
    AEXPECT(selfattn_attend_backward(l, 2, 5, 5, q, k, v, bad1, go, dq, dk, dv),
            SELFATTN_ERR_INVALID);
    AEXPECT(selfattn_attend_backward(l, 2, 5, 5, q, k, v, bad2, go, dq, dk, dv),
            SELFATTN_ERR_INVALID);
    AEXPECT(selfattn_attend_backward(l, INT32_MAX, INT32_MAX, 5, q, k, v, NULL, go, dq, dk, dv),
            SELFATTN_ERR_OVERFLOW);
    AEXPECT(selfattn_attend_backward(bare, 2, 5, 5, q, k, v, NULL, go, dq, dk, dv),
            SELFATTN_ERR_STATE);
    /* nothing wanted: a successful no-op */
    assert_int_equal(selfattn_attend_backward(l, 2, 5, 5, q, k, v, NULL, go, NULL, NULL, NULL),
                     SELFATTN_OK);
    selfattn_layer_destroy(bare);
#undef EXPECT
#undef AEXPECT
#undef UNTOUCHED
    free(q);
    free(k);
    free(v);
    free(go);
    free(dq);
    free(dk);
    free(dv);
    free(x);
    free(dy);
    bufs_free(&b);
    tu_layer_free(&t);
}

/* The train state: exact statuses, nothing written on failure, and a state refused once it no
   longer describes the call (another layer, shapes or lengths, or the layer changed since). */
static void test_train_state(void **state)
{
    (void)state;
    const bcase c = {2, 2, 4, 0, 1, 0, 0, 1, 0, 1, 0, 1, 0, 1, 0.0, 0.0, 0.0, 2, 5};
    tu_layer t, other;
    ref_opts o;
    make_layer(&c, 3, &t, &o);
    make_layer(&c, 3, &other, &o); /* the same weights, another layer */
    const int dm = t.ref.d_model;
    const size_t n_x = (size_t)2 * 5 * dm;
    tu_rng r = {4};
    float *x = tu_random(&r, n_x, -1, 1), *dy = tu_random(&r, n_x, -1, 1);
    float *y = malloc(sizeof(float) * n_x);
    size_t n[8];
    grad_sizes(&t.ref, n);
    bufs b, first;
    bufs_make(&b, &t.ref, n_x);
    bufs_make(&first, &t.ref, n_x);
    selfattn_layer *l = t.layer;
    const int32_t lens[2] = {5, 3}, lens2[2] = {5, 2}, bad[2] = {6, 1};

    size_t bytes = 0;
    assert_int_equal(selfattn_train_state_size(NULL, 2, 5, &bytes), SELFATTN_ERR_NULL);
    assert_int_equal(selfattn_train_state_size(l, 2, 5, NULL), SELFATTN_ERR_NULL);
    assert_int_equal(selfattn_train_state_size(l, 0, 5, &bytes), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_train_state_size(l, 2, -1, &bytes), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_train_state_size(l, INT32_MAX, INT32_MAX, &bytes),
                     SELFATTN_ERR_OVERFLOW);
    assert_int_equal(bytes, 0);
    assert_int_equal(selfattn_train_state_size(l, 2, 5, &bytes), SELFATTN_OK);
    /* at least Q, K, V, O and the lse in floats */
    assert_true(bytes >= sizeof(float) * (2 * 5 * (4 * 8) + 2 * 2 * 5));
    unsigned char *st = malloc(bytes + 8), *copy = malloc(bytes + 8);
    memset(st, 0xA5, bytes + 8);
    memcpy(copy, st, bytes + 8);
#define STATE_AND_Y_UNTOUCHED(call, status)                                                        \
    do {                                                                                           \
        tu_set(y, n_x, SENT);                                                                      \
        assert_int_equal((call), (status));                                                        \
        assert_true(tu_all_equal(y, n_x, SENT));                                                   \
        assert_memory_equal(st, copy, bytes + 8);                                                  \
    } while (0)
    STATE_AND_Y_UNTOUCHED(selfattn_forward_train(NULL, 2, 5, x, lens, y, st, bytes),
                          SELFATTN_ERR_NULL);
    STATE_AND_Y_UNTOUCHED(selfattn_forward_train(l, 2, 5, NULL, lens, y, st, bytes),
                          SELFATTN_ERR_NULL);
    STATE_AND_Y_UNTOUCHED(selfattn_forward_train(l, 2, 5, x, lens, y, NULL, bytes),
                          SELFATTN_ERR_NULL);
    STATE_AND_Y_UNTOUCHED(selfattn_forward_train(l, 2, 5, x, lens, y, st, bytes - 1),
                          SELFATTN_ERR_INVALID);
    STATE_AND_Y_UNTOUCHED(selfattn_forward_train(l, 2, 5, x, lens, y, st + 4, bytes),
                          SELFATTN_ERR_INVALID);
    STATE_AND_Y_UNTOUCHED(selfattn_forward_train(l, 2, 5, x, bad, y, st, bytes),
                          SELFATTN_ERR_INVALID);
    STATE_AND_Y_UNTOUCHED(selfattn_forward_train(l, 0, 5, x, lens, y, st, bytes),
                          SELFATTN_ERR_INVALID);
    selfattn_layer *bare = NULL;
    assert_int_equal(selfattn_layer_create(dm, 2, &bare), SELFATTN_OK);
    STATE_AND_Y_UNTOUCHED(selfattn_forward_train(bare, 2, 5, x, lens, y, st, bytes),
                          SELFATTN_ERR_STATE);
    selfattn_layer_destroy(bare);

#define UNTOUCHED(call, status)                                                                    \
    do {                                                                                           \
        assert_int_equal((call), (status));                                                        \
        assert_true(tu_all_equal(b.dx, n_x, SENT));                                                \
        for (int i_ = 0; i_ < 8; i_++)                                                             \
            assert_true(tu_all_equal(b.g[i_], n[i_], SENT));                                       \
    } while (0)
    /* never filled */
    UNTOUCHED(selfattn_backward_train(l, 2, 5, x, lens, dy, b.dx, &b.grads, st, bytes),
              SELFATTN_ERR_STATE);
    assert_int_equal(selfattn_forward_train(l, 2, 5, x, lens, y, st, bytes), SELFATTN_OK);
    assert_int_equal(
        selfattn_backward_train(l, 2, 5, x, lens, dy, first.dx, &first.grads, st, bytes),
        SELFATTN_OK);
    /* a failed forward_train leaves the state usable as it was */
    memcpy(copy, st, bytes + 8);
    STATE_AND_Y_UNTOUCHED(selfattn_forward_train(l, 2, 5, x, bad, y, st, bytes),
                          SELFATTN_ERR_INVALID);
    UNTOUCHED(selfattn_backward_train(NULL, 2, 5, x, lens, dy, b.dx, &b.grads, st, bytes),
              SELFATTN_ERR_NULL);
    UNTOUCHED(selfattn_backward_train(l, 2, 5, NULL, lens, dy, b.dx, &b.grads, st, bytes),
              SELFATTN_ERR_NULL);
    UNTOUCHED(selfattn_backward_train(l, 2, 5, x, lens, NULL, b.dx, &b.grads, st, bytes),
              SELFATTN_ERR_NULL);
    UNTOUCHED(selfattn_backward_train(l, 2, 5, x, lens, dy, b.dx, &b.grads, NULL, bytes),
              SELFATTN_ERR_NULL);
    UNTOUCHED(selfattn_backward_train(l, 2, 5, x, lens, dy, b.dx, &b.grads, st, bytes - 1),
              SELFATTN_ERR_INVALID);
    UNTOUCHED(selfattn_backward_train(l, 0, 5, x, lens, dy, b.dx, &b.grads, st, bytes),
              SELFATTN_ERR_INVALID);
    /* another call's shapes or lengths, another layer */
    UNTOUCHED(selfattn_backward_train(l, 1, 5, x, lens, dy, b.dx, &b.grads, st, bytes),
              SELFATTN_ERR_STATE);
    UNTOUCHED(selfattn_backward_train(l, 2, 4, x, lens, dy, b.dx, &b.grads, st, bytes),
              SELFATTN_ERR_STATE);
    UNTOUCHED(selfattn_backward_train(l, 2, 6, x, lens, dy, b.dx, &b.grads, st, bytes),
              SELFATTN_ERR_STATE); /* larger than the state: still another call's state */
    UNTOUCHED(selfattn_backward_train(l, 2, 5, x, lens, dy, b.dx, &b.grads, st, 16),
              SELFATTN_ERR_INVALID);
    UNTOUCHED(selfattn_backward_train(l, 2, 5, x, NULL, dy, b.dx, &b.grads, st, bytes),
              SELFATTN_ERR_STATE);
    UNTOUCHED(selfattn_backward_train(l, 2, 5, x, lens2, dy, b.dx, &b.grads, st, bytes),
              SELFATTN_ERR_STATE);
    UNTOUCHED(selfattn_backward_train(other.layer, 2, 5, x, lens, dy, b.dx, &b.grads, st, bytes),
              SELFATTN_ERR_STATE);
    /* a bad grads struct: the backward's own check */
    b.grads.struct_size = 4;
    UNTOUCHED(selfattn_backward_train(l, 2, 5, x, lens, dy, b.dx, &b.grads, st, bytes),
              SELFATTN_ERR_INVALID);
    b.grads.struct_size = sizeof b.grads;
    /* the state is only read, and THREADS changes nothing: the same bits again */
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_THREADS, 2), SELFATTN_OK);
    assert_int_equal(selfattn_backward_train(l, 2, 5, x, lens, dy, b.dx, &b.grads, st, bytes),
                     SELFATTN_OK);
    expect_same_bits(&b, &first, n_x, n);
    for (int i = 0; i < 8; i++)
        tu_set(b.g[i], n[i], SENT);
    tu_set(b.dx, n_x, SENT);
    /* a weight set again (even to the same values) or an option changed: STATE */
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_Q, t.w[0], (int64_t)n[0]),
                     SELFATTN_OK);
    UNTOUCHED(selfattn_backward_train(l, 2, 5, x, lens, dy, b.dx, &b.grads, st, bytes),
              SELFATTN_ERR_STATE);
    assert_int_equal(selfattn_forward_train(l, 2, 5, x, lens, y, st, bytes), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_float(l, SELFATTN_FOPT_SOFTCAP, 0.0), SELFATTN_OK);
    UNTOUCHED(selfattn_backward_train(l, 2, 5, x, lens, dy, b.dx, &b.grads, st, bytes),
              SELFATTN_ERR_STATE);
    assert_int_equal(selfattn_forward_train(l, 2, 5, x, lens, y, st, bytes), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_CAUSAL, 1), SELFATTN_OK);
    UNTOUCHED(selfattn_backward_train(l, 2, 5, x, lens, dy, b.dx, &b.grads, st, bytes),
              SELFATTN_ERR_STATE);
#undef UNTOUCHED
#undef STATE_AND_Y_UNTOUCHED
    free(st);
    free(copy);
    free(x);
    free(dy);
    free(y);
    bufs_free(&b);
    bufs_free(&first);
    tu_layer_free(&t);
    tu_layer_free(&other);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reference_finite_differences),
        cmocka_unit_test(test_combinations),
        cmocka_unit_test(test_multiblock),
        cmocka_unit_test(test_every_sequence_short),
        cmocka_unit_test(test_packed),
        cmocka_unit_test(test_padding),
        cmocka_unit_test(test_threads_identical),
        cmocka_unit_test(test_partial),
        cmocka_unit_test(test_attend_empty_rows),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_train_state),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
