/* Allocation failure: a script of API calls (create, options, every weight and bias, forward
 * with and without lengths, attend, the 1.1 calls, backward and attend_backward, the 1.2 train
 * state calls, 16-bit storage, a value head size of its own, destroy) is run with its n-th
 * allocation made to fail, for n = 1, 2, ... until a run meets no failure. Each time the failing
 * call must return SELFATTN_ERR_NOMEM with caller outputs untouched and the handle unchanged and
 * usable: the same call is retried without the failure and the script finishes with results
 * bit-identical to a run without failures. Leaks are caught by LeakSanitizer in the sanitizer
 * build. Helper-thread start failures are injected too. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "internal.h"
#include "testutil.h"

#define D 32
#define H 4
#define KV 2
#define L 40
#define B 2
#define SENT -4242.0f

#define KL (8 * L) /* a longer attend_ex: needs a larger workspace than the calls before it */
#define EX_N (B * L * D + B * H * L * L + B * H * L)
#define EX2_N (B * L * D + B * H * L * KL + B * H * L)

#define NKV (KV * (D / H))
#define BW_N (B * L * D + 2 * D * D + 2 * NKV * D + 2 * D + 2 * NKV) /* dx, then the grads */
#define ABW_N (B * L * D + 2 * B * L * NKV)                          /* dq, dk, dv */

/* 1.3 V_HEAD_DIM: value heads twice head_dim wide */
#define DV (2 * (D / H))
#define NKVV (KV * DV)
#define NQV (H * DV)
#define VBW_N (B * L * D + D * D + NKV * D + NKVV * D + D * NQV + D + NKV + NKVV + D)

typedef struct script_out {
    float y1[B * L * D], y2[B * L * D], att[B * L * D];
    float ex[EX_N];   /* forward_ex: y, weights, lse */
    float ex2[EX2_N]; /* attend_ex: out, weights, lse */
    float bw[BW_N];   /* backward: dx, dW_Q, dW_K, dW_V, dW_O, db_Q, db_K, db_V, db_O */
    float abw[ABW_N]; /* attend_backward: dq, dk, dv */
    float ty[B * L * D], tbw[BW_N]; /* forward_train, backward_train */
    float cached[B * L * D], cached2[B * D]; /* forward_cached: a prompt, then one step */
    float hy[B * L * D], hbw[BW_N], hcached[B * L * D]; /* 1.3: bf16 weights, an f16 cache */
    float vy[B * L * D], vatt[B * L * NQV], vbw[VBW_N], vty[B * L * D], vcached[B * L * D];
} script_out;

/* The gradients' places in o->bw. */
static selfattn_grads script_grads(float *bw)
{
    float *p = bw + B * L * D;
    selfattn_grads g = {sizeof g, p, p + D * D, p + D * D + NKV * D, p + D * D + 2 * NKV * D,
                        p + 2 * D * D + 2 * NKV * D, p + 2 * D * D + 2 * NKV * D + D,
                        p + 2 * D * D + 2 * NKV * D + D + NKV,
                        p + 2 * D * D + 2 * NKV * D + D + 2 * NKV};
    return g;
}

static float w[8][D * D];
static float wvo[D * NQV]; /* W_V and W_O of the V_HEAD_DIM layer */

/* Runs the call; on failure checks the contract and retries it without the failure. Counts
   failures seen in *failed. */
#define STEP(call, out, n_out)                                                                     \
    do {                                                                                           \
        if ((out) != NULL)                                                                         \
            for (long i_ = 0; i_ < (long)(n_out); i_++)                                            \
                ((float *)(out))[i_] = SENT;                                                       \
        selfattn_status st_ = (call);                                                              \
        if (st_ != SELFATTN_OK) {                                                                  \
            assert_int_equal(st_, SELFATTN_ERR_NOMEM);                                             \
            if ((out) != NULL)                                                                     \
                for (long i_ = 0; i_ < (long)(n_out); i_++)                                        \
                    assert_true(((float *)(out))[i_] == SENT);                                     \
            (*failed)++;                                                                           \
            sa_test_fail_allocation(0);                                                            \
            assert_int_equal((call), SELFATTN_OK);                                                 \
        }                                                                                          \
    } while (0)

/* Creates a layer; on failure checks the contract (*out unchanged) and retries without the
   failure. Counts failures seen in *failed. */
static selfattn_layer *create_layer(int *failed)
{
    selfattn_layer *l = NULL;
    const selfattn_status st = selfattn_layer_create(D, H, &l);
    if (st != SELFATTN_OK) {
        assert_int_equal(st, SELFATTN_ERR_NOMEM);
        assert_null(l); /* *out unchanged */
        (*failed)++;
        sa_test_fail_allocation(0);
        assert_int_equal(selfattn_layer_create(D, H, &l), SELFATTN_OK);
    }
    return l;
}

/* The same for a cache of B sequences of 2 * L positions. */
static selfattn_cache *create_cache(selfattn_layer *l, int *failed)
{
    selfattn_cache *c = NULL;
    const selfattn_status st = selfattn_cache_create(l, B, 2 * L, &c);
    if (st != SELFATTN_OK) {
        assert_int_equal(st, SELFATTN_ERR_NOMEM);
        assert_null(c); /* *out unchanged */
        (*failed)++;
        sa_test_fail_allocation(0);
        assert_int_equal(selfattn_cache_create(l, B, 2 * L, &c), SELFATTN_OK);
    }
    return c;
}

static void script(script_out *o, int *failed, int *create_failed)
{
    selfattn_layer *l = create_layer(create_failed);
    const int nkv = KV * (D / H);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_N_KV_HEADS, KV), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_CAUSAL, 1), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_THREADS, 2), SELFATTN_OK);
    const int64_t counts[8] = {D * D, nkv * D, nkv * D, D * D, D, nkv, nkv, D};
    for (int i = 0; i < 8; i++)
        STEP(selfattn_layer_set_weight(l, (selfattn_weight)(i + 1), w[i], counts[i]), NULL, 0);
    tu_rng r = {11};
    float x[B * L * D], q[B * L * D], k[B * L * D], v[B * L * D];
    tu_fill(&r, x, B * L * D, -1, 1);
    tu_fill(&r, q, B * L * D, -1, 1);
    tu_fill(&r, k, B * L * D, -1, 1);
    tu_fill(&r, v, B * L * D, -1, 1);
    const int32_t lens[B] = {L, 13};
    STEP(selfattn_forward(l, B, L, x, NULL, o->y1), o->y1, B * L * D);
    STEP(selfattn_forward(l, B, L, x, lens, o->y2), o->y2, B * L * D);
    STEP(selfattn_attend(l, B, L, L, q, k, v, lens, o->att), o->att, B * L * H * (D / H));

    /* 1.1: score options and extras */
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_WINDOW, 7), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_ALIBI, 1), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_ROPE, 1), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_float(l, SELFATTN_FOPT_SOFTCAP, 3.0), SELFATTN_OK);
    static float bias[L * KL];
    tu_fill(&r, bias, L * KL, -1, 1);
    selfattn_extras e = {sizeof e, bias, 0, 0, L, o->ex + B * L * D,
                         o->ex + B * L * D + B * H * L * L, NULL, 0};
    STEP(selfattn_forward_ex(l, B, L, x, lens, &e, o->ex), o->ex, EX_N);
    static float k2[B * KL * D], v2[B * KL * D];
    tu_fill(&r, k2, B * KL * D, -1, 1);
    tu_fill(&r, v2, B * KL * D, -1, 1);
    const int32_t klens[B] = {KL, 50};
    /* without the window, so that its score rows span all KL keys */
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_WINDOW, 0), SELFATTN_OK);
    selfattn_extras e2 = {sizeof e2, bias, 0, 0, KL, o->ex2 + B * L * D,
                          o->ex2 + B * L * D + B * H * L * KL, NULL, 0};
    STEP(selfattn_attend_ex(l, B, L, KL, q, k2, v2, klens, &e2, o->ex2), o->ex2, EX2_N);

    /* gradients, with RoPE, ALiBi and the softcap still on */
    float dy[B * L * D];
    tu_fill(&r, dy, B * L * D, -1, 1);
    const selfattn_grads g = script_grads(o->bw);
    STEP(selfattn_backward(l, B, L, x, lens, dy, o->bw, &g), o->bw, BW_N);
    STEP(selfattn_attend_backward(l, B, L, L, q, k, v, lens, dy, o->abw, o->abw + B * L * D,
                                  o->abw + B * L * D + B * L * NKV),
         o->abw, ABW_N);

    /* 1.2: the same gradients through a train state */
    static float train_state[16384];
    size_t state_bytes = 0;
    assert_int_equal(selfattn_train_state_size(l, B, L, &state_bytes), SELFATTN_OK);
    assert_true(state_bytes <= sizeof train_state);
    STEP(selfattn_forward_train(l, B, L, x, lens, o->ty, train_state, state_bytes), o->ty,
         B * L * D);
    const selfattn_grads tg = script_grads(o->tbw);
    STEP(selfattn_backward_train(l, B, L, x, lens, dy, o->tbw, &tg, train_state, state_bytes),
         o->tbw, BW_N);

    /* the cache: create (its allocations), a prompt and a step */
    selfattn_cache *c = create_cache(l, failed);
    STEP(selfattn_forward_cached(l, c, L, x, NULL, o->cached), o->cached, B * L * D);
    STEP(selfattn_forward_cached(l, c, 1, x, NULL, o->cached2), o->cached2, B * D);
    selfattn_cache_destroy(c);
    selfattn_layer_destroy(l);

    /* 1.3: bf16 weights (their own buffers, panels in the workspace) and an f16 cache */
    l = create_layer(failed);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_N_KV_HEADS, KV), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_CAUSAL, 1), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_THREADS, 2), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_WEIGHT_DTYPE, SELFATTN_DTYPE_BF16),
                     SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_KV_DTYPE, SELFATTN_DTYPE_F16),
                     SELFATTN_OK);
    for (int i = 0; i < 8; i++)
        STEP(selfattn_layer_set_weight_typed(l, (selfattn_weight)(i + 1), SELFATTN_DTYPE_F32, w[i],
                                             counts[i]),
             NULL, 0);
    STEP(selfattn_forward(l, B, L, x, lens, o->hy), o->hy, B * L * D);
    const selfattn_grads hg = script_grads(o->hbw);
    STEP(selfattn_backward(l, B, L, x, lens, dy, o->hbw, &hg), o->hbw, BW_N);
    c = create_cache(l, failed);
    STEP(selfattn_forward_cached(l, c, L, x, NULL, o->hcached), o->hcached, B * L * D);
    selfattn_cache_destroy(c);
    selfattn_layer_destroy(l);

    /* 1.3: value heads of their own width (W_V, W_O, the workspaces, the train state and the
       cache's V take dv) */
    l = create_layer(failed);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_N_KV_HEADS, KV), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_V_HEAD_DIM, DV), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_CAUSAL, 1), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_THREADS, 2), SELFATTN_OK);
    const int64_t vcounts[8] = {D * D, nkv * D, NKVV * D, D * NQV, D, nkv, NKVV, D};
    for (int i = 0; i < 8; i++)
        STEP(selfattn_layer_set_weight(l, (selfattn_weight)(i + 1),
                                       i == 2 || i == 3 || i == 6 ? wvo : w[i], vcounts[i]),
             NULL, 0);
    STEP(selfattn_forward(l, B, L, x, lens, o->vy), o->vy, B * L * D);
    STEP(selfattn_attend(l, B, L, L, q, k2, v2, lens, o->vatt), o->vatt, B * L * NQV);
    float *vp = o->vbw + B * L * D;
    const selfattn_grads vg = {sizeof vg,
                               vp,
                               vp + D * D,
                               vp + D * D + NKV * D,
                               vp + D * D + NKV * D + NKVV * D,
                               vp + D * D + NKV * D + NKVV * D + D * NQV,
                               vp + D * D + NKV * D + NKVV * D + D * NQV + D,
                               vp + D * D + NKV * D + NKVV * D + D * NQV + D + NKV,
                               vp + D * D + NKV * D + NKVV * D + D * NQV + D + NKV + NKVV};
    STEP(selfattn_backward(l, B, L, x, lens, dy, o->vbw, &vg), o->vbw, VBW_N);
    assert_int_equal(selfattn_train_state_size(l, B, L, &state_bytes), SELFATTN_OK);
    assert_true(state_bytes <= sizeof train_state);
    STEP(selfattn_forward_train(l, B, L, x, lens, o->vty, train_state, state_bytes), o->vty,
         B * L * D);
    c = create_cache(l, failed);
    STEP(selfattn_forward_cached(l, c, L, x, NULL, o->vcached), o->vcached, B * L * D);
    selfattn_cache_destroy(c);
    selfattn_layer_destroy(l);
}

static void test_every_allocation_fails_once(void **state)
{
    (void)state;
    tu_rng r = {1};
    for (int i = 0; i < 8; i++)
        tu_fill(&r, w[i], D * D, -0.3f, 0.3f);
    tu_fill(&r, wvo, D * NQV, -0.3f, 0.3f);
    static script_out clean, run;
    int failed = 0, create_failed = 0;
    sa_test_fail_allocation(0);
    script(&clean, &failed, &create_failed);
    assert_int_equal(failed + create_failed, 0);

    long n = 1;
    for (;; n++) {
        failed = create_failed = 0;
        sa_test_fail_allocation(n);
        script(&run, &failed, &create_failed);
        const long left = sa_test_fail_allocation(0);
        if (left > 0) { /* the n-th allocation never came: every site has been failed once */
            assert_int_equal(failed + create_failed, 0);
            break;
        }
        assert_int_equal(failed + create_failed, 1);
        assert_memory_equal(&run, &clean, sizeof run);
    }
    printf("  %ld allocations in the script, each made to fail once: NOMEM, outputs untouched, "
           "handle usable, same results\n",
           n - 1);
    /* create (the layer, its workspace cache), 4 weight/bias buffers, the first forward's
       workspace (the second forward, attend and forward_ex reuse it), the longer attend_ex's,
       the backward's (attend_backward reuses it), the cache's 4 (handle, lengths, K, V; its
       calls reuse the layer's workspace) */
    assert_true(n - 1 >= 12);
}

/* When helper threads cannot be started, the calling thread does all the tasks: the call still
   succeeds, with the same bits. */
static void test_thread_start_failure(void **state)
{
    (void)state;
    const tu_spec spec = {128, 4, 2, 0, 1, 1, 0, 1, 4, 0};
    tu_layer t;
    assert_int_equal(tu_layer_make(&spec, 3, &t), SELFATTN_OK);
    enum { LL = 300 };
    tu_rng r = {6};
    float *x = tu_random(&r, (size_t)2 * LL * 128, -1, 1);
    float *y1 = malloc(sizeof(float) * 2 * LL * 128), *y2 = malloc(sizeof(float) * 2 * LL * 128);
    /* First with every start failing: the pool must still be empty (this test runs before any
       other call in this process that wants helpers), so the caller does every task. */
    assert_int_equal(sa_pool_size(), 0);
    sa_test_fail_thread_starts(1);
    assert_int_equal(selfattn_forward(t.layer, 2, LL, x, NULL, y1), SELFATTN_OK);
    assert_int_equal(sa_pool_size(), 0);
    sa_test_fail_thread_starts(0);
    assert_int_equal(selfattn_forward(t.layer, 2, LL, x, NULL, y2), SELFATTN_OK);
    assert_true(sa_pool_size() >= 1); /* now the helpers exist and took part */
    assert_memory_equal(y1, y2, sizeof(float) * 2 * LL * 128);
    free(x);
    free(y1);
    free(y2);
    tu_layer_free(&t);
}

/* A second backward (and attend_backward, and the train state's pair) of the same or a smaller
   shape allocates nothing. */
static void test_backward_steady_state(void **state)
{
    (void)state;
    const tu_spec spec = {64, 4, 2, 0, 1, 1, 0, 1, 2, 0};
    tu_layer t;
    assert_int_equal(tu_layer_make(&spec, 5, &t), SELFATTN_OK);
    enum { LL = 300 };
    const size_t n = (size_t)2 * LL * 64;
    tu_rng r = {8};
    float *x = tu_random(&r, n, -1, 1), *dy = tu_random(&r, n, -1, 1), *dx = malloc(n * 4);
    static float gw[4][64 * 64], gb[4][64];
    const selfattn_grads g = {sizeof g, gw[0], gw[1], gw[2], gw[3], gb[0], gb[1], gb[2], gb[3]};
    const int32_t lens[2] = {LL, 100};
    assert_int_equal(selfattn_backward(t.layer, 2, LL, x, NULL, dy, dx, &g), SELFATTN_OK);
    sa_test_fail_allocation(1);
    assert_int_equal(selfattn_backward(t.layer, 2, LL, x, NULL, dy, dx, &g), SELFATTN_OK);
    assert_int_equal(selfattn_backward(t.layer, 2, LL, x, lens, dy, dx, &g), SELFATTN_OK);
    assert_int_equal(selfattn_backward(t.layer, 1, LL / 2, x, NULL, dy, dx, NULL), SELFATTN_OK);
    assert_true(sa_test_fail_allocation(0) > 0); /* the armed failure never came */
    /* attend_backward: q, k, v of 4 and 2 heads of 16 */
    float *dq = malloc(n * 4), *dk = malloc(n * 4), *dv = malloc(n * 4);
    assert_int_equal(selfattn_attend_backward(t.layer, 2, LL, LL, x, dy, dy, lens, x, dq, dk, dv),
                     SELFATTN_OK);
    sa_test_fail_allocation(1);
    assert_int_equal(selfattn_attend_backward(t.layer, 2, LL, LL, x, dy, dy, lens, x, dq, dk, dv),
                     SELFATTN_OK);
    assert_true(sa_test_fail_allocation(0) > 0);
    /* the train state's pair (1.2): after the first, nothing allocated */
    size_t bytes = 0;
    assert_int_equal(selfattn_train_state_size(t.layer, 2, LL, &bytes), SELFATTN_OK);
    void *st = malloc(bytes);
    assert_int_equal(selfattn_forward_train(t.layer, 2, LL, x, lens, dq, st, bytes), SELFATTN_OK);
    assert_int_equal(selfattn_backward_train(t.layer, 2, LL, x, lens, dy, dx, &g, st, bytes),
                     SELFATTN_OK);
    sa_test_fail_allocation(1);
    assert_int_equal(selfattn_forward_train(t.layer, 2, LL, x, lens, dq, st, bytes), SELFATTN_OK);
    assert_int_equal(selfattn_backward_train(t.layer, 2, LL, x, lens, dy, dx, &g, st, bytes),
                     SELFATTN_OK);
    assert_true(sa_test_fail_allocation(0) > 0);
    free(st);
    free(x);
    free(dy);
    free(dx);
    free(dq);
    free(dk);
    free(dv);
    tu_layer_free(&t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_thread_start_failure), /* first: before the pool has threads */
        cmocka_unit_test(test_every_allocation_fails_once),
        cmocka_unit_test(test_backward_steady_state),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
