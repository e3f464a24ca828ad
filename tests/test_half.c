/* Half-precision storage (1.3): 16-bit weights (SELFATTN_OPT_WEIGHT_DTYPE) and key/value caches
 * (SELFATTN_OPT_KV_DTYPE) against the float64 reference computed on the rounded values, so that
 * the tolerance stays float32's (TOL of the largest output, as the other numerics tests). The
 * rounding is the test's own (testutil.c, from the formats' widths in double), never the
 * library's. Also: the rounding rules at set time, bit-exact typed weights, bad input, and an
 * infinity stored in an F16 cache reaching only its own sequence. */
#include <float.h>
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
static const char *const dt_name[3] = {"f32", "f16", "bf16"};

static void check_close(const float *got, const double *want, size_t n, const char *what, int dt)
{
    double err, mx;
    ref_max_err(got, want, n, &err, &mx);
    if (!(err <= TOL * mx + 1e-12)) {
        print_error("%s (%s): max err %g of max %g\n", what, dt_name[dt], err, mx);
        fail();
    }
}

/* ---- 16-bit weights: forward, _ex, backward, the train state ---- */

typedef struct hw_case {
    tu_spec spec;
    ref_opts opts;
    int batch, seq;
    int32_t lengths[3]; /* lengths[0] < 0: none */
} hw_case;

static tu_layer hw_layer(const hw_case *c, int dt)
{
    tu_layer t;
    assert_int_equal(tu_layer_make_typed(&c->spec, 40 + (uint64_t)dt, dt, &t), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_WINDOW, c->opts.window), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_ALIBI, c->opts.alibi), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_ROPE, c->opts.rope), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_float(t.layer, SELFATTN_FOPT_SOFTCAP, c->opts.softcap),
                     SELFATTN_OK);
    return t;
}

static const hw_case hw_cases[] = {
    /* GQA, causal, biases, RoPE, lengths */
    {{32, 4, 2, 0, 1, 1, 0, 1, 2, 0}, {.rope = 1}, 2, 19, {19, 11, 0}},
    /* full attention, window, ALiBi, softcap, 3 threads */
    {{24, 3, 0, 0, 0, 1, 0, 1, 3, 0}, {.window = 4, .alibi = 1, .softcap = 5.0}, 2, 40, {-1, -1, -1}},
    /* packed in-projection, no biases, a sequence long enough for the panel products */
    {{16, 2, 0, 0, 1, 1, 1, 0, 2, 0}, {0}, 1, 300, {-1, -1, -1}},
    /* no output projection */
    {{16, 4, 4, 0, 1, 0, 0, 1, 1, 0}, {.rope = 2}, 3, 9, {9, 0, 5}},
};

static void test_weights_forward(void **state)
{
    (void)state;
    for (size_t ci = 0; ci < sizeof hw_cases / sizeof hw_cases[0]; ci++)
        for (int dt = 1; dt <= 2; dt++) {
            const hw_case *c = &hw_cases[ci];
            tu_layer t = hw_layer(c, dt);
            const int32_t *len = c->lengths[0] < 0 ? NULL : c->lengths;
            const int dm = c->spec.d_model, H = c->spec.n_heads;
            const size_t n = (size_t)c->batch * c->seq * dm, nw = (size_t)c->batch * H * c->seq;
            tu_rng r = {ci * 10 + (uint64_t)dt};
            float *x = tu_random(&r, n, -1, 1), *y = malloc(n * sizeof(float));
            float *w = malloc(nw * c->seq * sizeof(float)), *lse = malloc(nw * sizeof(float));
            double *yr = malloc(n * sizeof(double)), *wr = malloc(nw * c->seq * sizeof(double));
            double *lr = malloc(nw * sizeof(double));
            assert_int_equal(selfattn_forward(t.layer, c->batch, c->seq, x, len, y), SELFATTN_OK);
            ref_forward_ex(&t.ref, &c->opts, c->batch, c->seq, x, len, yr, wr, lr);
            check_close(y, yr, n, "forward", dt);
            selfattn_extras e;
            memset(&e, 0, sizeof e);
            e.struct_size = sizeof e;
            e.weights = w;
            e.lse = lse;
            assert_int_equal(selfattn_forward_ex(t.layer, c->batch, c->seq, x, len, &e, y),
                             SELFATTN_OK);
            check_close(y, yr, n, "forward_ex", dt);
            check_close(w, wr, nw * c->seq, "forward_ex weights", dt);
            for (size_t i = 0; i < nw; i++)
                assert_true(isinf(lr[i]) ? lse[i] == (float)lr[i]
                                         : fabs(lse[i] - lr[i]) <= 1e-5 * (1 + fabs(lr[i])));
            free(x);
            free(y);
            free(w);
            free(lse);
            free(yr);
            free(wr);
            free(lr);
            tu_layer_free(&t);
        }
}

static void test_weights_backward(void **state)
{
    (void)state;
    for (size_t ci = 0; ci < sizeof hw_cases / sizeof hw_cases[0]; ci++)
        for (int dt = 1; dt <= 2; dt++) {
            const hw_case *c = &hw_cases[ci];
            if (c->opts.softcap > 0 || c->seq > 100)
                continue; /* softcap: test_backward's; long: kept short here */
            tu_layer t = hw_layer(c, dt);
            const int32_t *len = c->lengths[0] < 0 ? NULL : c->lengths;
            const size_t dm = (size_t)c->spec.d_model, H = (size_t)c->spec.n_heads;
            const size_t hd = dm / H;
            const size_t nkv = c->spec.n_kv_heads ? (size_t)c->spec.n_kv_heads : H;
            const size_t n = (size_t)c->batch * c->seq * dm;
            const size_t cnt[8] = {H * hd * dm, nkv * hd * dm, nkv * hd * dm, dm * H * hd,
                                   H * hd,      nkv * hd,      nkv * hd,      dm};
            tu_rng r = {ci * 10 + 7 + (uint64_t)dt};
            float *x = tu_random(&r, n, -1, 1), *dy = tu_random(&r, n, -1, 1);
            float *dx = malloc(n * sizeof(float)), *y = malloc(n * sizeof(float));
            double *dxr = malloc(n * sizeof(double)), *gr[8];
            float *g[8];
            for (int i = 0; i < 8; i++) {
                g[i] = malloc(cnt[i] * sizeof(float));
                gr[i] = malloc(cnt[i] * sizeof(double));
            }
            selfattn_grads grads;
            memset(&grads, 0, sizeof grads);
            grads.struct_size = sizeof grads;
            grads.w_q = g[0], grads.w_k = g[1], grads.w_v = g[2], grads.b_q = g[4];
            grads.b_k = g[5], grads.b_v = g[6];
            if (c->spec.out_proj)
                grads.w_o = g[3], grads.b_o = g[7];
            ref_backward(&t.ref, &c->opts, c->batch, c->seq, x, len, dy, dxr, gr);
            for (int pass = 0; pass < 2; pass++) { /* recomputing, then the train state */
                if (pass == 0) {
                    assert_int_equal(selfattn_backward(t.layer, c->batch, c->seq, x, len, dy, dx,
                                                       &grads),
                                     SELFATTN_OK);
                } else {
                    size_t bytes;
                    assert_int_equal(
                        selfattn_train_state_size(t.layer, c->batch, c->seq, &bytes),
                        SELFATTN_OK);
                    void *st = malloc(bytes);
                    assert_int_equal(selfattn_forward_train(t.layer, c->batch, c->seq, x, len, y,
                                                            st, bytes),
                                     SELFATTN_OK);
                    assert_int_equal(selfattn_backward_train(t.layer, c->batch, c->seq, x, len,
                                                             dy, dx, &grads, st, bytes),
                                     SELFATTN_OK);
                    free(st);
                }
                check_close(dx, dxr, n, pass ? "backward_train dx" : "backward dx", dt);
                for (int i = 0; i < 8; i++)
                    if (i != 3 && i != 7 ? c->spec.biases || i < 4 : c->spec.out_proj)
                        check_close(g[i], gr[i], cnt[i], pass ? "train grads" : "grads", dt);
            }
            free(x);
            free(dy);
            free(dx);
            free(y);
            free(dxr);
            for (int i = 0; i < 8; i++) {
                free(g[i]);
                free(gr[i]);
            }
            tu_layer_free(&t);
        }
}

/* ---- the cache with every (weight dtype, KV dtype) pair ----
   Inputs and weights are dyadic (x on 2^-6, weights and biases on 2^-8): Q, K and V are then
   exact in float32 and in double alike, so the library and the reference round the very same
   K and V, and the comparison keeps float32's tolerance. */
#define CD 16
#define CH 4
#define CKV 2
#define CHD 4
#define CT 14 /* positions per sequence: a prompt, then single steps */

typedef struct cache_ref {
    float wq[CH * CHD * CD], wk[CKV * CHD * CD], wv[CKV * CHD * CD], wo[CD * CH * CHD];
    float bq[CH * CHD], bk[CKV * CHD], bv[CKV * CHD], bo[CD];
} cache_ref;

/* y rows of one sequence x [CT][CD] from the float64 reference with K and V rounded to kvdt. */
static void cache_reference(const cache_ref *w, int window, int kvdt, const float *x, double *y)
{
    const ref_layer rl = {CD, CH, CKV, CHD, 1, 1, 1.0 / sqrt((double)CHD), w->wq, w->wk,
                          w->wv, w->wo, w->bq, w->bk, w->bv, w->bo, 0};
    double q[CT * CH * CHD], k[CT * CKV * CHD], v[CT * CKV * CHD], a[CT * CH * CHD];
    float qf[CT * CH * CHD], kf[CT * CKV * CHD], vf[CT * CKV * CHD];
    ref_linear(x, CT, CD, w->wq, w->bq, CH * CHD, q);
    ref_linear(x, CT, CD, w->wk, w->bk, CKV * CHD, k);
    ref_linear(x, CT, CD, w->wv, w->bv, CKV * CHD, v);
    for (int i = 0; i < CT * CH * CHD; i++)
        qf[i] = (float)q[i]; /* exact: dyadic */
    for (int i = 0; i < CT * CKV * CHD; i++) {
        kf[i] = tu_round(kvdt, (float)k[i]);
        vf[i] = tu_round(kvdt, (float)v[i]);
    }
    const ref_opts o = {.window = window};
    ref_attend_ex(&rl, &o, 1, CT, CT, qf, kf, vf, NULL, a, NULL, NULL);
    ref_linear_d(a, CT, CH * CHD, w->wo, w->bo, CD, y);
}

static void test_cache_dtypes(void **state)
{
    (void)state;
    static const int windows[] = {0, 5};
    static const int32_t prompt[2] = {6, 3};
    for (int wdt = 0; wdt <= 2; wdt++)
        for (int kvdt = 0; kvdt <= 2; kvdt++)
            for (size_t wi = 0; wi < 2; wi++) {
                tu_rng r = {(uint64_t)(wdt * 9 + kvdt * 3) + wi};
                cache_ref w;
                float *all[8] = {w.wq, w.wk, w.wv, w.wo, w.bq, w.bk, w.bv, w.bo};
                const size_t cnt[8] = {sizeof w.wq, sizeof w.wk, sizeof w.wv, sizeof w.wo,
                                       sizeof w.bq, sizeof w.bk, sizeof w.bv, sizeof w.bo};
                selfattn_layer *l;
                assert_int_equal(selfattn_layer_create(CD, CH, &l), SELFATTN_OK);
                assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_N_KV_HEADS, CKV), SELFATTN_OK);
                assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_CAUSAL, 1), SELFATTN_OK);
                assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_WINDOW, windows[wi]),
                                 SELFATTN_OK);
                assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_WEIGHT_DTYPE, wdt), SELFATTN_OK);
                assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_KV_DTYPE, kvdt), SELFATTN_OK);
                for (int i = 0; i < 8; i++) {
                    const size_t m = cnt[i] / sizeof(float);
                    for (size_t j = 0; j < m; j++)
                        all[i][j] = tu_dyadic(&r, 8, 0.5);
                    assert_int_equal(selfattn_layer_set_weight(l, (selfattn_weight)(i + 1), all[i],
                                                               (int64_t)m),
                                     SELFATTN_OK);
                    if (i < 4)
                        tu_round_all(wdt, all[i], m); /* 8 bits: exact in both, but say so */
                }
                selfattn_cache *c;
                /* with the window a ring smaller than the sequence */
                assert_int_equal(selfattn_cache_create(l, 2, windows[wi] ? 9 : CT, &c),
                                 SELFATTN_OK);
                float x[2][CT * CD], y[2 * 8 * CD];
                double yr[2][CT * CD];
                for (int s = 0; s < 2; s++) {
                    for (int i = 0; i < CT * CD; i++)
                        x[s][i] = tu_dyadic(&r, 6, 1.0);
                    cache_reference(&w, windows[wi], kvdt, x[s], yr[s]);
                }
                int32_t done[2] = {0, 0};
                while (done[0] < CT || done[1] < CT) {
                    int32_t n_new[2];
                    float xin[2 * 8 * CD];
                    const float *const xs[2] = {x[0], x[1]};
                    const int32_t max_new = tu_decode_step(2, xs, CD, CT, prompt, done, n_new, xin);
                    assert_int_equal(selfattn_forward_cached(l, c, max_new, xin, n_new, y),
                                     SELFATTN_OK);
                    for (int s = 0; s < 2; s++) {
                        char what[64];
                        snprintf(what, sizeof what, "cache w %s kv %s window %d seq %d",
                                 dt_name[wdt], dt_name[kvdt], windows[wi], s);
                        check_close(y + (size_t)s * max_new * CD, yr[s] + (size_t)done[s] * CD,
                                    (size_t)n_new[s] * CD, what, kvdt);
                        done[s] += n_new[s];
                    }
                }
                selfattn_cache_destroy(c);
                selfattn_layer_destroy(l);
            }
}

/* RoPE rotates K in float32 before it is stored: the library's and a float64 reference's K can
   round to neighbouring 16-bit values, so this checks against the float32 cache instead, to
   within the 16-bit format's own precision (2^-8 of the largest output for bf16). */
static void test_cache_rope(void **state)
{
    (void)state;
    const tu_spec spec = {32, 4, 2, 0, 1, 1, 0, 1, 1, 0};
    for (int kvdt = 1; kvdt <= 2; kvdt++) {
        tu_layer t;
        assert_int_equal(tu_layer_make(&spec, 77, &t), SELFATTN_OK);
        assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_ROPE, 1), SELFATTN_OK);
        selfattn_cache *c32, *c16;
        assert_int_equal(selfattn_cache_create(t.layer, 1, 64, &c32), SELFATTN_OK);
        assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_KV_DTYPE, kvdt), SELFATTN_OK);
        assert_int_equal(selfattn_cache_create(t.layer, 1, 64, &c16), SELFATTN_OK);
        tu_rng r = {3};
        float x[40 * 32], y32[40 * 32], y16[40 * 32];
        tu_fill(&r, x, 40 * 32, -1, 1);
        assert_int_equal(selfattn_forward_cached(t.layer, c16, 40, x, NULL, y16), SELFATTN_OK);
        assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_KV_DTYPE, 0), SELFATTN_OK);
        assert_int_equal(selfattn_forward_cached(t.layer, c32, 40, x, NULL, y32), SELFATTN_OK);
        double mx = 0, err = 0;
        for (int i = 0; i < 40 * 32; i++) {
            mx = fmax(mx, fabs(y32[i]));
            err = fmax(err, fabs((double)y16[i] - y32[i]));
        }
        assert_true(err > 0.0 && err <= ldexp(mx, kvdt == 1 ? -10 : -7));
        selfattn_cache_destroy(c32);
        selfattn_cache_destroy(c16);
        tu_layer_free(&t);
    }
}

/* ---- rounding at set time, typed weights ---- */

static void forward_bits(selfattn_layer *l, float *y)
{
    float x[3 * 8];
    tu_rng r = {12};
    tu_fill(&r, x, 3 * 8, -1, 1);
    assert_int_equal(selfattn_forward(l, 1, 3, x, NULL, y), SELFATTN_OK);
}

static selfattn_layer *small_layer(int dt, float fill)
{
    selfattn_layer *l;
    assert_int_equal(selfattn_layer_create(8, 2, &l), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_WEIGHT_DTYPE, dt), SELFATTN_OK);
    float w[64];
    tu_rng r = {(uint64_t)(fill * 100)};
    tu_fill(&r, w, 64, -fill, fill);
    for (int i = 1; i <= 4; i++)
        assert_int_equal(selfattn_layer_set_weight(l, (selfattn_weight)i, w, 64), SELFATTN_OK);
    return l;
}

static void test_rounding_rules(void **state)
{
    (void)state;
    float y0[24], y1[24], w[64];
    for (int dt = 1; dt <= 2; dt++) {
        selfattn_layer *l = small_layer(dt, 0.5f);
        forward_bits(l, y0);
        /* a finite weight that would round to infinity: INVALID, nothing changes */
        for (int i = 0; i < 64; i++)
            w[i] = 0.25f;
        w[17] = dt == 1 ? 65520.0f : FLT_MAX;
        assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_Q, w, 64), SELFATTN_ERR_INVALID);
        w[17] = dt == 1 ? -70000.0f : -FLT_MAX;
        assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_K, w, 64), SELFATTN_ERR_INVALID);
        forward_bits(l, y1);
        assert_memory_equal(y0, y1, sizeof y0);
        /* the largest finite values are fine; inf and NaN are stored as such */
        w[17] = dt == 1 ? 65504.0f : ldexpf(255.0f, 120);
        assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_Q, w, 64), SELFATTN_OK);
        w[17] = INFINITY;
        w[18] = NAN;
        assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_V, w, 64), SELFATTN_OK);
        forward_bits(l, y1);
        int finite = 1;
        for (int i = 0; i < 24; i++)
            finite = finite && isfinite(y1[i]);
        assert_false(finite);
        selfattn_layer_destroy(l);
    }
    /* F16 ties to even and subnormals, seen through a forward: a layer given weights that tie
       equals one given the rounded values */
    const float ties[4] = {1.0f + 0x1p-11f, 1.0f + 0x3p-11f, 0x1p-25f, 0x3p-25f};
    const float rounded[4] = {1.0f, 1.0f + 0x1p-9f, 0.0f, 0x1p-23f};
    for (int i = 0; i < 4; i++)
        assert_true(tu_round_f16(ties[i]) == rounded[i]); /* the test's own rounding agrees */
    selfattn_layer *a = small_layer(1, 0.5f), *b = small_layer(1, 0.5f);
    for (int i = 0; i < 64; i++)
        w[i] = ties[i % 4] * (i % 2 ? 0.5f : 1.0f);
    assert_int_equal(selfattn_layer_set_weight(a, SELFATTN_W_K, w, 64), SELFATTN_OK);
    for (int i = 0; i < 64; i++)
        w[i] = rounded[i % 4] * (i % 2 ? 0.5f : 1.0f);
    assert_int_equal(selfattn_layer_set_weight(b, SELFATTN_W_K, w, 64), SELFATTN_OK);
    forward_bits(a, y0);
    forward_bits(b, y1);
    assert_memory_equal(y0, y1, sizeof y0);
    selfattn_layer_destroy(a);
    selfattn_layer_destroy(b);
}

/* Weights given as 16-bit patterns: into a layer of the same dtype bit for bit (a layer given
   the same values as floats computes the same bits); into another dtype, converted exactly
   and rounded once. */
static void test_typed_weights(void **state)
{
    (void)state;
    float y0[24], y1[24];
    for (int given = 1; given <= 2; given++)
        for (int stored = 0; stored <= 2; stored++) {
            selfattn_layer *a = small_layer(stored, 0.5f), *b = small_layer(stored, 0.5f);
            uint16_t bits[64];
            float vals[64];
            tu_rng r = {(uint64_t)(given * 3 + stored)};
            for (int i = 0; i < 64; i++) {
                const float f = given == 1 ? tu_round_f16((float)(tu_uniform(&r) - 0.5))
                                           : tu_round_bf16((float)(tu_uniform(&r) - 0.5));
                vals[i] = tu_round(stored, f);
                uint32_t u;
                memcpy(&u, &f, sizeof u);
                if (given == 2) {
                    bits[i] = (uint16_t)(u >> 16);
                } else { /* binary16 bits of f, which is exactly representable: |f| <= 1/2 */
                    int e;
                    const double m = frexp(fabs(f), &e);
                    uint16_t h = f < 0 ? 0x8000 : 0;
                    if (f != 0.0f) {
                        if (e - 1 >= -14)
                            h |= (uint16_t)(((e - 1 + 15) << 10) | (int)((m * 2 - 1) * 1024));
                        else
                            h |= (uint16_t)ldexp(fabs(f), 24);
                    }
                    bits[i] = h;
                }
            }
            assert_int_equal(selfattn_layer_set_weight_typed(a, SELFATTN_W_O,
                                                             (selfattn_dtype)given, bits, 64),
                             SELFATTN_OK);
            assert_int_equal(selfattn_layer_set_weight(b, SELFATTN_W_O, vals, 64), SELFATTN_OK);
            forward_bits(a, y0);
            forward_bits(b, y1);
            if (memcmp(y0, y1, sizeof y0) != 0) {
                print_error("given %s stored %s differ\n", dt_name[given], dt_name[stored]);
                fail();
            }
            /* a bias given in 16 bits is widened exactly */
            assert_int_equal(selfattn_layer_set_weight_typed(a, SELFATTN_B_O,
                                                             (selfattn_dtype)given, bits, 8),
                             SELFATTN_OK);
            selfattn_layer_destroy(a);
            selfattn_layer_destroy(b);
        }
}

/* ---- bad input ---- */
static void test_bad_input(void **state)
{
    (void)state;
    selfattn_layer *l;
    assert_int_equal(selfattn_layer_create(8, 2, &l), SELFATTN_OK);
    uint16_t bits[64] = {0};
    assert_int_equal(selfattn_layer_set_weight_typed(l, SELFATTN_W_Q, (selfattn_dtype)3, bits, 64),
                     SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_set_weight_typed(l, SELFATTN_W_Q, (selfattn_dtype)-1, bits,
                                                     64),
                     SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_set_weight_typed(l, SELFATTN_W_Q, SELFATTN_DTYPE_F16, NULL,
                                                     64),
                     SELFATTN_ERR_NULL);
    assert_int_equal(selfattn_layer_set_weight_typed(NULL, SELFATTN_W_Q, SELFATTN_DTYPE_F16, bits,
                                                     64),
                     SELFATTN_ERR_NULL);
    assert_int_equal(selfattn_layer_set_weight_typed(l, SELFATTN_W_Q, SELFATTN_DTYPE_F16, bits,
                                                     63),
                     SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_set_weight_typed(l, (selfattn_weight)11, SELFATTN_DTYPE_F16,
                                                     bits, 64),
                     SELFATTN_ERR_INVALID);
    int64_t v = -1;
    assert_int_equal(selfattn_layer_get(l, SELFATTN_OPT_WEIGHT_DTYPE, &v), SELFATTN_OK);
    assert_int_equal(v, SELFATTN_DTYPE_F32);
    /* no weight set by the failed calls: the dtype may still change; after a weight, STATE */
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_WEIGHT_DTYPE, SELFATTN_DTYPE_BF16),
                     SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_weight_typed(l, SELFATTN_W_Q, SELFATTN_DTYPE_F16, bits,
                                                     64),
                     SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_WEIGHT_DTYPE, SELFATTN_DTYPE_F16),
                     SELFATTN_ERR_STATE);
    assert_int_equal(selfattn_layer_get(l, SELFATTN_OPT_WEIGHT_DTYPE, &v), SELFATTN_OK);
    assert_int_equal(v, SELFATTN_DTYPE_BF16);
    selfattn_layer_destroy(l);

    /* KV_DTYPE changed under a live cache: STATE, nothing written, the cache as it was; set
       back, the cache works again */
    const tu_spec spec = {16, 2, 0, 0, 1, 1, 0, 1, 1, 0};
    tu_layer t;
    assert_int_equal(tu_layer_make(&spec, 3, &t), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_KV_DTYPE, SELFATTN_DTYPE_F16),
                     SELFATTN_OK);
    selfattn_cache *c;
    assert_int_equal(selfattn_cache_create(t.layer, 1, 8, &c), SELFATTN_OK);
    float x[2 * 16], y[2 * 16], y_sent[2 * 16];
    tu_rng r = {4};
    tu_fill(&r, x, 32, -1, 1);
    assert_int_equal(selfattn_forward_cached(t.layer, c, 2, x, NULL, y), SELFATTN_OK);
    for (int i = 0; i < 32; i++)
        y[i] = y_sent[i] = 1234.5f;
    for (int dt = 0; dt <= 2; dt += 2) {
        assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_KV_DTYPE, dt), SELFATTN_OK);
        assert_int_equal(selfattn_forward_cached(t.layer, c, 1, x, NULL, y), SELFATTN_ERR_STATE);
        assert_memory_equal(y, y_sent, sizeof y);
        int32_t len;
        assert_int_equal(selfattn_cache_length(c, 0, &len), SELFATTN_OK);
        assert_int_equal(len, 2);
    }
    assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_KV_DTYPE, SELFATTN_DTYPE_F16),
                     SELFATTN_OK);
    assert_int_equal(selfattn_forward_cached(t.layer, c, 1, x, NULL, y), SELFATTN_OK);
    selfattn_cache_destroy(c);
    tu_layer_free(&t);
}

/* A K value past binary16's range is stored as infinity: it makes its own sequence's rows
   non-finite and leaves the other sequence exactly as it is alone. */
static void test_cache_inf_isolated(void **state)
{
    (void)state;
    const tu_spec spec = {16, 2, 0, 0, 1, 1, 0, 1, 1, 0};
    tu_layer t;
    assert_int_equal(tu_layer_make(&spec, 9, &t), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_KV_DTYPE, SELFATTN_DTYPE_F16),
                     SELFATTN_OK);
    selfattn_cache *two, *one;
    assert_int_equal(selfattn_cache_create(t.layer, 2, 8, &two), SELFATTN_OK);
    assert_int_equal(selfattn_cache_create(t.layer, 1, 8, &one), SELFATTN_OK);
    float x[2 * 4 * 16], y[2 * 4 * 16], y1[4 * 16];
    tu_rng r = {5};
    tu_fill(&r, x, 2 * 4 * 16, -1, 1);
    for (int i = 0; i < 16; i++)
        x[4 * 16 + 16 + i] = 1e6f; /* sequence 1, token 1: K and V far past 65504 */
    assert_int_equal(selfattn_forward_cached(t.layer, two, 4, x, NULL, y), SELFATTN_OK);
    assert_int_equal(selfattn_forward_cached(t.layer, one, 4, x, NULL, y1), SELFATTN_OK);
    /* sequence 0 as alone (to float32 rounding: the projection's rows split otherwise) */
    for (int i = 0; i < 4 * 16; i++)
        assert_true(isfinite(y[i]) && fabsf(y[i] - y1[i]) <= 1e-5f * (1.0f + fabsf(y1[i])));
    int finite = 1;
    for (int i = 16; i < 4 * 16; i++)
        finite = finite && isfinite(y[4 * 16 + i]);
    assert_false(finite);
    selfattn_cache_destroy(two);
    selfattn_cache_destroy(one);
    tu_layer_free(&t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_weights_forward), cmocka_unit_test(test_weights_backward),
        cmocka_unit_test(test_cache_dtypes),    cmocka_unit_test(test_cache_rope),
        cmocka_unit_test(test_rounding_rules),  cmocka_unit_test(test_typed_weights),
        cmocka_unit_test(test_bad_input),       cmocka_unit_test(test_cache_inf_isolated),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
