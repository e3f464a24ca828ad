/* The API contract: every status code from the call that should give it, and on every failure
 * caller outputs and the handle left as they were. */
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "testutil.h"

#define D 16
#define H 4
#define L 5
#define SENT 31337.0f

static float wq[D * D], wk[D * D], wv[D * D], wo[D * D];

static void fill_weights(void)
{
    tu_rng r = {9};
    tu_fill(&r, wq, D * D, -0.3f, 0.3f);
    tu_fill(&r, wk, D * D, -0.3f, 0.3f);
    tu_fill(&r, wv, D * D, -0.3f, 0.3f);
    tu_fill(&r, wo, D * D, -0.3f, 0.3f);
}

static selfattn_layer *full_layer(void)
{
    selfattn_layer *l = NULL;
    assert_int_equal(selfattn_layer_create(D, H, &l), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_Q, wq, D * D), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_K, wk, D * D), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_V, wv, D * D), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_O, wo, D * D), SELFATTN_OK);
    return l;
}

static void fill_sentinel(float *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = SENT;
}

static void assert_sentinel(const float *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        assert_true(p[i] == SENT);
}

/* All options of a layer, to show that a failed call changed none of them. */
typedef struct snapshot {
    int64_t v[9];
    double f[3];
} snapshot;

static snapshot snap(const selfattn_layer *l)
{
    snapshot s;
    for (int o = 1; o <= 9; o++)
        assert_int_equal(selfattn_layer_get(l, (selfattn_option)o, &s.v[o - 1]), SELFATTN_OK);
    for (int o = 1; o <= 3; o++)
        assert_int_equal(selfattn_layer_get_float(l, (selfattn_float_option)o, &s.f[o - 1]),
                         SELFATTN_OK);
    return s;
}

static void assert_same(const selfattn_layer *l, snapshot s)
{
    snapshot t = snap(l);
    assert_memory_equal(&s, &t, sizeof s);
}

static void test_status_strings_and_version(void **state)
{
    (void)state;
    const char *seen[7];
    for (int s = 0; s <= 6; s++) {
        seen[s] = selfattn_status_string((selfattn_status)s);
        assert_non_null(seen[s]);
        for (int t = 0; t < s; t++)
            assert_string_not_equal(seen[s], seen[t]);
    }
    assert_non_null(selfattn_status_string((selfattn_status)999));
    assert_non_null(selfattn_status_string((selfattn_status)-1));
    assert_int_equal(selfattn_version_number(), SELFATTN_VERSION_NUMBER);
    assert_string_equal(selfattn_version_string(), SELFATTN_VERSION_STRING);
    assert_int_equal(SELFATTN_VERSION_NUMBER, SELFATTN_VERSION_MAJOR * 10000 +
                                                  SELFATTN_VERSION_MINOR * 100 +
                                                  SELFATTN_VERSION_PATCH);
    assert_non_null(selfattn_kernel_name());
}

static void test_create_destroy(void **state)
{
    (void)state;
    selfattn_layer *const marker = (selfattn_layer *)&marker;
    selfattn_layer *l = marker;
    assert_int_equal(selfattn_layer_create(D, H, NULL), SELFATTN_ERR_NULL);
    assert_int_equal(selfattn_layer_create(0, H, &l), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_create(-8, H, &l), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_create(D, 0, &l), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_create(D, -1, &l), SELFATTN_ERR_INVALID);
    /* 3 * 2^30 rows of weights do not fit the int dimensions of CBLAS */
    assert_int_equal(selfattn_layer_create(1 << 30, 1, &l), SELFATTN_ERR_OVERFLOW);
    /* n_heads * head_dim near 2^62 (found by the fuzzer: the sum of the row counts overflowed
       int64 before it was checked) */
    assert_int_equal(selfattn_layer_create(1, INT32_MAX, &l), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_HEAD_DIM, INT32_MAX),
                     SELFATTN_ERR_OVERFLOW);
    selfattn_layer_destroy(l);
    l = marker;
    assert_ptr_equal(l, marker);
    selfattn_layer_destroy(NULL);
    assert_int_equal(selfattn_layer_create(D, H, &l), SELFATTN_OK);
    assert_ptr_not_equal(l, marker);
    int64_t v = -1;
    assert_int_equal(selfattn_layer_get(l, SELFATTN_OPT_N_KV_HEADS, &v), SELFATTN_OK);
    assert_int_equal(v, H);
    assert_int_equal(selfattn_layer_get(l, SELFATTN_OPT_HEAD_DIM, &v), SELFATTN_OK);
    assert_int_equal(v, D / H);
    assert_int_equal(selfattn_layer_get(l, SELFATTN_OPT_CAUSAL, &v), SELFATTN_OK);
    assert_int_equal(v, 0);
    assert_int_equal(selfattn_layer_get(l, SELFATTN_OPT_OUT_PROJ, &v), SELFATTN_OK);
    assert_int_equal(v, 1);
    assert_int_equal(selfattn_layer_get(l, SELFATTN_OPT_THREADS, &v), SELFATTN_OK);
    assert_true(v >= 1 && v <= 64);
    selfattn_layer_destroy(l);
}

static void test_options(void **state)
{
    (void)state;
    selfattn_layer *l;
    assert_int_equal(selfattn_layer_create(D, H, &l), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(NULL, SELFATTN_OPT_CAUSAL, 1), SELFATTN_ERR_NULL);
    snapshot s = snap(l);
    static const struct {
        int opt;
        int64_t value;
        selfattn_status want;
    } bad[] = {
        {0, 1, SELFATTN_ERR_INVALID},
        {99, 1, SELFATTN_ERR_INVALID}, /* no such option (10 and 11 are the 1.3 dtypes) */
        {-3, 1, SELFATTN_ERR_INVALID},
        {SELFATTN_OPT_WEIGHT_DTYPE, 3, SELFATTN_ERR_INVALID},
        {SELFATTN_OPT_WEIGHT_DTYPE, -1, SELFATTN_ERR_INVALID},
        {SELFATTN_OPT_KV_DTYPE, 3, SELFATTN_ERR_INVALID},
        {SELFATTN_OPT_KV_DTYPE, INT64_MAX, SELFATTN_ERR_INVALID},
        {SELFATTN_OPT_WINDOW, -1, SELFATTN_ERR_INVALID},
        {SELFATTN_OPT_WINDOW, (int64_t)INT32_MAX + 1, SELFATTN_ERR_INVALID},
        {SELFATTN_OPT_ROPE, 3, SELFATTN_ERR_INVALID},
        {SELFATTN_OPT_ROPE, -1, SELFATTN_ERR_INVALID},
        {SELFATTN_OPT_ROPE_DIMS, 3, SELFATTN_ERR_INVALID},      /* odd */
        {SELFATTN_OPT_ROPE_DIMS, D / H + 2, SELFATTN_ERR_INVALID}, /* > head_dim */
        {SELFATTN_OPT_ROPE_DIMS, -2, SELFATTN_ERR_INVALID},
        {SELFATTN_OPT_ALIBI, 2, SELFATTN_ERR_INVALID},
        {SELFATTN_OPT_N_KV_HEADS, 3, SELFATTN_ERR_INVALID}, /* does not divide 4 */
        {SELFATTN_OPT_N_KV_HEADS, 8, SELFATTN_ERR_INVALID},
        {SELFATTN_OPT_N_KV_HEADS, -2, SELFATTN_ERR_INVALID},
        {SELFATTN_OPT_N_KV_HEADS, (int64_t)1 << 40, SELFATTN_ERR_INVALID},
        {SELFATTN_OPT_HEAD_DIM, -1, SELFATTN_ERR_INVALID},
        {SELFATTN_OPT_HEAD_DIM, (int64_t)INT32_MAX + 1, SELFATTN_ERR_INVALID},
        {SELFATTN_OPT_HEAD_DIM, INT32_MAX, SELFATTN_ERR_OVERFLOW},
        {SELFATTN_OPT_CAUSAL, 4, SELFATTN_ERR_INVALID}, /* 0..3 (1.3: 2 top-left, 3 per length) */
        {SELFATTN_OPT_CAUSAL, -1, SELFATTN_ERR_INVALID},
        {SELFATTN_OPT_OUT_PROJ, 2, SELFATTN_ERR_INVALID},
        {SELFATTN_OPT_THREADS, -1, SELFATTN_ERR_INVALID},
        {SELFATTN_OPT_THREADS, 65, SELFATTN_ERR_INVALID},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(selfattn_layer_set(l, (selfattn_option)bad[i].opt, bad[i].value),
                         bad[i].want);
        assert_same(l, s);
    }
    /* OUT_PROJ 0 needs n_heads * head_dim == d_model, and then HEAD_DIM must keep it so */
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_HEAD_DIM, 8), SELFATTN_OK);
    s = snap(l);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_OUT_PROJ, 0), SELFATTN_ERR_INVALID);
    assert_same(l, s);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_HEAD_DIM, 0), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_OUT_PROJ, 0), SELFATTN_OK);
    s = snap(l);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_HEAD_DIM, 8), SELFATTN_ERR_INVALID);
    assert_same(l, s);
    /* defaults: 0 restores them */
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_N_KV_HEADS, 2), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_N_KV_HEADS, 0), SELFATTN_OK);
    int64_t v;
    assert_int_equal(selfattn_layer_get(l, SELFATTN_OPT_N_KV_HEADS, &v), SELFATTN_OK);
    assert_int_equal(v, H);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_THREADS, 3), SELFATTN_OK);
    assert_int_equal(selfattn_layer_get(l, SELFATTN_OPT_THREADS, &v), SELFATTN_OK);
    assert_int_equal(v, 3);
    /* get: NULLs and unknown options leave *value alone */
    v = 1234;
    assert_int_equal(selfattn_layer_get(NULL, SELFATTN_OPT_CAUSAL, &v), SELFATTN_ERR_NULL);
    assert_int_equal(selfattn_layer_get(l, SELFATTN_OPT_CAUSAL, NULL), SELFATTN_ERR_NULL);
    assert_int_equal(selfattn_layer_get(l, (selfattn_option)42, &v), SELFATTN_ERR_INVALID);
    assert_int_equal(v, 1234);
    /* bounds */
    int64_t lo = 7, hi = 7;
    assert_int_equal(selfattn_option_bounds(SELFATTN_OPT_CAUSAL, NULL, &hi), SELFATTN_ERR_NULL);
    assert_int_equal(selfattn_option_bounds((selfattn_option)0, &lo, &hi), SELFATTN_ERR_INVALID);
    assert_true(lo == 7 && hi == 7);
    assert_int_equal(selfattn_option_bounds(SELFATTN_OPT_THREADS, &lo, &hi), SELFATTN_OK);
    assert_true(lo == 1 && hi == 64);
    assert_int_equal(selfattn_option_bounds(SELFATTN_OPT_CAUSAL, &lo, &hi), SELFATTN_OK);
    assert_true(lo == 0 && hi == 3);
    /* scale */
    assert_int_equal(selfattn_layer_set_scale(NULL, 1.0f), SELFATTN_ERR_NULL);
    assert_int_equal(selfattn_layer_set_scale(l, NAN), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_set_scale(l, INFINITY), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_set_scale(l, -INFINITY), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_set_scale(l, 0.0f), SELFATTN_OK);
    selfattn_layer_destroy(l);
}

static void test_weights(void **state)
{
    (void)state;
    selfattn_layer *l;
    assert_int_equal(selfattn_layer_create(D, H, &l), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_weight(NULL, SELFATTN_W_Q, wq, D * D), SELFATTN_ERR_NULL);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_Q, NULL, D * D), SELFATTN_ERR_NULL);
    assert_int_equal(selfattn_layer_set_weight(l, (selfattn_weight)0, wq, D * D),
                     SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_set_weight(l, (selfattn_weight)11, wq, D * D),
                     SELFATTN_ERR_INVALID);
    const int64_t wrong[] = {0, -1, D * D - 1, D * D + 1, (int64_t)1 << 62};
    for (size_t i = 0; i < sizeof wrong / sizeof wrong[0]; i++) {
        assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_Q, wq, wrong[i]),
                         SELFATTN_ERR_INVALID);
        assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_B_O, wq, D + wrong[i] - D * D),
                         wrong[i] == D * D ? SELFATTN_OK : SELFATTN_ERR_INVALID);
    }
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_QKV, wq, D * D), SELFATTN_ERR_INVALID);
    /* none of that set a weight: shape options are still free */
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_N_KV_HEADS, 2), SELFATTN_OK);
    /* packed weights need n_kv_heads == n_heads */
    static float big[3 * D * D];
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_QKV, big, 3 * D * D),
                     SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_B_QKV, big, 3 * D),
                     SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_K, wk, D * D / 2), SELFATTN_OK);
    /* the shape is now frozen */
    snapshot s = snap(l);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_N_KV_HEADS, 4), SELFATTN_ERR_STATE);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_HEAD_DIM, 2), SELFATTN_ERR_STATE);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_OUT_PROJ, 0), SELFATTN_ERR_STATE);
    assert_same(l, s);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_CAUSAL, 1), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_THREADS, 2), SELFATTN_OK);
    selfattn_layer_destroy(l);

    /* W_O is refused without the output projection */
    assert_int_equal(selfattn_layer_create(D, H, &l), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_OUT_PROJ, 0), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_O, wo, D * D), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_B_O, wo, D), SELFATTN_ERR_INVALID);
    selfattn_layer_destroy(l);

    /* head_dim undetermined (10 / 3) until HEAD_DIM is set */
    assert_int_equal(selfattn_layer_create(10, 3, &l), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_Q, wq, 30), SELFATTN_ERR_STATE);
    float q[30], k[30], v[30], out[30];
    fill_sentinel(out, 30);
    memset(q, 0, sizeof q);
    memset(k, 0, sizeof k);
    memset(v, 0, sizeof v);
    assert_int_equal(selfattn_attend(l, 1, 1, 1, q, k, v, NULL, out), SELFATTN_ERR_STATE);
    assert_sentinel(out, 30);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_HEAD_DIM, 4), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_Q, wq, 12 * 10), SELFATTN_OK);
    selfattn_layer_destroy(l);
}

static void test_forward_errors(void **state)
{
    (void)state;
    tu_rng r = {4};
    float x[2 * L * D], y[2 * L * D], y_ok[2 * L * D], y_again[2 * L * D];
    tu_fill(&r, x, 2 * L * D, -1, 1);
    const size_t ny = 2 * L * D;

    /* each required weight missing in turn */
    for (int missing = 1; missing <= 4; missing++) {
        selfattn_layer *l;
        assert_int_equal(selfattn_layer_create(D, H, &l), SELFATTN_OK);
        const float *w[5] = {NULL, wq, wk, wv, wo};
        for (int i = 1; i <= 4; i++)
            if (i != missing)
                assert_int_equal(selfattn_layer_set_weight(l, (selfattn_weight)i, w[i], D * D),
                                 SELFATTN_OK);
        fill_sentinel(y, ny);
        assert_int_equal(selfattn_forward(l, 2, L, x, NULL, y), SELFATTN_ERR_STATE);
        assert_sentinel(y, ny);
        if (missing == 4) { /* without the output projection W_O is not needed */
            selfattn_layer_destroy(l);
            assert_int_equal(selfattn_layer_create(D, H, &l), SELFATTN_OK);
            assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_OUT_PROJ, 0), SELFATTN_OK);
            for (int i = 1; i <= 3; i++)
                assert_int_equal(selfattn_layer_set_weight(l, (selfattn_weight)i, w[i], D * D),
                                 SELFATTN_OK);
            assert_int_equal(selfattn_forward(l, 2, L, x, NULL, y), SELFATTN_OK);
        }
        selfattn_layer_destroy(l);
    }

    selfattn_layer *l = full_layer();
    assert_int_equal(selfattn_forward(l, 2, L, x, NULL, y_ok), SELFATTN_OK);
    const int32_t bad_len_lo[2] = {L, -1}, bad_len_hi[2] = {L + 1, 0};
    struct {
        const selfattn_layer *layer;
        int32_t batch, seq;
        const float *x;
        const int32_t *len;
        int y_null;
        selfattn_status want;
    } cases[] = {
        {NULL, 2, L, x, NULL, 0, SELFATTN_ERR_NULL},
        {l, 2, L, NULL, NULL, 0, SELFATTN_ERR_NULL},
        {l, 2, L, x, NULL, 1, SELFATTN_ERR_NULL},
        {l, 0, L, x, NULL, 0, SELFATTN_ERR_INVALID},
        {l, -2, L, x, NULL, 0, SELFATTN_ERR_INVALID},
        {l, 2, 0, x, NULL, 0, SELFATTN_ERR_INVALID},
        {l, 2, -5, x, NULL, 0, SELFATTN_ERR_INVALID},
        {l, 2, L, x, bad_len_lo, 0, SELFATTN_ERR_INVALID},
        {l, 2, L, x, bad_len_hi, 0, SELFATTN_ERR_INVALID},
        /* 2^62 rows of 16 floats: the byte counts overflow */
        {l, INT32_MAX, INT32_MAX, x, NULL, 0, SELFATTN_ERR_OVERFLOW},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        fill_sentinel(y, ny);
        assert_int_equal(selfattn_forward(cases[i].layer, cases[i].batch, cases[i].seq, cases[i].x,
                                          cases[i].len, cases[i].y_null ? NULL : y),
                         cases[i].want);
        assert_sentinel(y, ny);
    }
    /* failed calls on the handle changed nothing: the same forward gives the same bits */
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_Q, wq, 3), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_HEAD_DIM, 8), SELFATTN_ERR_STATE);
    assert_int_equal(selfattn_forward(l, 2, L, x, NULL, y_again), SELFATTN_OK);
    assert_memory_equal(y_ok, y_again, sizeof y_ok);
    selfattn_layer_destroy(l);
}

/* Whether the kernel may refuse an impossible allocation (not overcommit mode 1, "always"):
   the NOMEM tests need it. */
static int may_refuse_allocations(void)
{
    FILE *f = fopen("/proc/sys/vm/overcommit_memory", "r");
    int mode = -1;
    if (f) {
        if (fscanf(f, "%d", &mode) != 1)
            mode = -1;
        fclose(f);
    }
    if (mode == 1)
        printf("  overcommit_memory=1: an impossible allocation would succeed; skipped\n");
    return mode != 1;
}

/* A request whose sizes fit but whose workspace cannot be had gives NOMEM, touching nothing.
   Needs the kernel to refuse the allocation: skipped under overcommit mode 1 ("always"). */
static void test_forward_nomem(void **state)
{
    (void)state;
    if (!may_refuse_allocations())
        skip();
    selfattn_layer *l = full_layer();
    float x[D], y[D];
    fill_sentinel(x, D);
    fill_sentinel(y, D);
    /* 2^30 rows: the workspace alone is about 260 GiB; x and y are never read or written
       because the call fails before touching them. */
    assert_int_equal(selfattn_forward(l, 1, 1 << 30, x, NULL, y), SELFATTN_ERR_NOMEM);
    assert_sentinel(y, D);
    selfattn_layer_destroy(l);
}

static void test_attend_errors(void **state)
{
    (void)state;
    selfattn_layer *l;
    assert_int_equal(selfattn_layer_create(D, H, &l), SELFATTN_OK);
    float q[2 * L * D], k[2 * L * D], v[2 * L * D], out[2 * L * D];
    tu_rng r = {8};
    tu_fill(&r, q, 2 * L * D, -1, 1);
    tu_fill(&r, k, 2 * L * D, -1, 1);
    tu_fill(&r, v, 2 * L * D, -1, 1);
    const int32_t bad[2] = {L + 1, 0}, neg[2] = {0, -1};
    struct {
        int32_t batch, ql, kl;
        int nul; /* which pointer is NULL: 1 layer 2 q 3 k 4 v 5 out */
        const int32_t *len;
        selfattn_status want;
    } cases[] = {
        {2, L, L, 1, NULL, SELFATTN_ERR_NULL},
        {2, L, L, 2, NULL, SELFATTN_ERR_NULL},
        {2, L, L, 3, NULL, SELFATTN_ERR_NULL},
        {2, L, L, 4, NULL, SELFATTN_ERR_NULL},
        {2, L, L, 5, NULL, SELFATTN_ERR_NULL},
        {0, L, L, 0, NULL, SELFATTN_ERR_INVALID},
        {2, 0, L, 0, NULL, SELFATTN_ERR_INVALID},
        {2, L, 0, 0, NULL, SELFATTN_ERR_INVALID},
        {2, L, -1, 0, NULL, SELFATTN_ERR_INVALID},
        {2, L, L, 0, bad, SELFATTN_ERR_INVALID},
        {2, L, L, 0, neg, SELFATTN_ERR_INVALID},
        {INT32_MAX, INT32_MAX, 1, 0, NULL, SELFATTN_ERR_OVERFLOW},
        {1, 1, INT32_MAX, 0, NULL, SELFATTN_ERR_OVERFLOW}, /* scores: block x 2^31 per task */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        fill_sentinel(out, 2 * L * D);
        const selfattn_status st = selfattn_attend(
            cases[i].nul == 1 ? NULL : l, cases[i].batch, cases[i].ql, cases[i].kl,
            cases[i].nul == 2 ? NULL : q, cases[i].nul == 3 ? NULL : k,
            cases[i].nul == 4 ? NULL : v, cases[i].len, cases[i].nul == 5 ? NULL : out);
        if (st != cases[i].want)
            printf("  case %zu: got %d want %d\n", i, (int)st, (int)cases[i].want);
        assert_int_equal(st, cases[i].want);
        assert_sentinel(out, 2 * L * D);
    }
    assert_int_equal(selfattn_attend(l, 2, L, L, q, k, v, NULL, out), SELFATTN_OK);
    selfattn_layer_destroy(l);
}

/* Every entry point that takes a count, at the extremes (INT32_MAX counts whose products need
   2^62 elements and more, INT64_MAX element counts, SIZE_MAX byte counts): an exact status, no
   output written, and (run under UBSan in CI) no signed overflow on the way. The buffers are
   small: each call must fail before it reads or writes them. */
static void test_extreme_sizes(void **state)
{
    (void)state;
    const int32_t M = INT32_MAX;
    selfattn_layer *l = full_layer();
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_CAUSAL, 1), SELFATTN_OK);
    float in[4 * D], out[4 * D], out2[4 * D], out3[4 * D];
    fill_sentinel(in, 4 * D);
    fill_sentinel(out, 4 * D);
    fill_sentinel(out2, 4 * D);
    fill_sentinel(out3, 4 * D);
    uint64_t st_buf[64];
    memset(st_buf, 0, sizeof st_buf);
    size_t bytes = 12345;
    selfattn_extras e;
    memset(&e, 0, sizeof e);
    e.struct_size = sizeof e;
    selfattn_cache *c = NULL, *const marker = (selfattn_cache *)&marker;

    /* layer shape and weights */
    selfattn_layer *l2 = NULL;
    assert_int_equal(selfattn_layer_create(M, 1, &l2), SELFATTN_ERR_OVERFLOW);
    assert_int_equal(selfattn_layer_create(M, M, &l2), SELFATTN_ERR_OVERFLOW);
    assert_null(l2);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_Q, wq, INT64_MAX),
                     SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_set_weight(l, SELFATTN_W_Q, wq, INT64_MIN),
                     SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_WINDOW, INT64_MAX), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_THREADS, INT64_MIN), SELFATTN_ERR_INVALID);

    /* whole-batch calls: rows * width overflows */
    assert_int_equal(selfattn_forward(l, M, M, in, NULL, out), SELFATTN_ERR_OVERFLOW);
    assert_int_equal(selfattn_forward_ex(l, M, M, in, NULL, &e, out), SELFATTN_ERR_OVERFLOW);
    assert_int_equal(selfattn_attend(l, M, M, M, in, in, in, NULL, out), SELFATTN_ERR_OVERFLOW);
    assert_int_equal(selfattn_attend_ex(l, M, M, M, in, in, in, NULL, &e, out),
                     SELFATTN_ERR_OVERFLOW);
    assert_int_equal(selfattn_attend_backward(l, M, M, M, in, in, in, NULL, in, out, out2, out3),
                     SELFATTN_ERR_OVERFLOW);
    /* one query over 2^31 - 1 keys: the score row does not fit a CBLAS int leading dimension */
    assert_int_equal(selfattn_attend_backward(l, 1, 1, M, in, in, in, NULL, in, out, out2, out3),
                     SELFATTN_ERR_OVERFLOW);
    assert_int_equal(selfattn_backward(l, M, M, in, NULL, in, out, NULL), SELFATTN_ERR_OVERFLOW);
    assert_int_equal(selfattn_train_state_size(l, M, M, &bytes), SELFATTN_ERR_OVERFLOW);
    assert_int_equal(bytes, 12345);
    assert_int_equal(selfattn_forward_train(l, M, M, in, NULL, out, st_buf, SIZE_MAX),
                     SELFATTN_ERR_OVERFLOW);
    assert_int_equal(selfattn_backward_train(l, M, M, in, NULL, in, out, NULL, st_buf, SIZE_MAX),
                     SELFATTN_ERR_OVERFLOW);

    /* the cache */
    c = marker;
    assert_int_equal(selfattn_cache_create(l, M, M, &c), SELFATTN_ERR_OVERFLOW);
    assert_ptr_equal(c, marker);
    assert_int_equal(selfattn_cache_create(l, 64, 1, &c), SELFATTN_OK);
    int32_t len = -7;
    assert_int_equal(selfattn_cache_length(c, M, &len), SELFATTN_ERR_INVALID);
    assert_int_equal(len, -7);
    assert_int_equal(selfattn_cache_truncate(c, M, 0), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_cache_truncate(c, 0, M), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_cache_copy(c, M, 0), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_cache_copy(c, 0, M), SELFATTN_ERR_INVALID);
    int32_t n_new[64];
    memset(n_new, 0, sizeof n_new);
    /* max_new 2^31 - 1 with no token taken: the core's task count (64 sequences x 4 heads x
       2^26 blocks) does not fit an int (it once overflowed computing ceil(max_new / 32)) */
    assert_int_equal(selfattn_forward_cached(l, c, M, in, n_new, out), SELFATTN_ERR_OVERFLOW);
    n_new[0] = M; /* past the capacity of 1 */
    assert_int_equal(selfattn_forward_cached(l, c, M, in, n_new, out), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_forward_cached(l, c, M, in, NULL, out), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_cache_length(c, 0, &len), SELFATTN_OK);
    assert_int_equal(len, 0);
    selfattn_cache_destroy(c);

    assert_sentinel(out, 4 * D);
    assert_sentinel(out2, 4 * D);
    assert_sentinel(out3, 4 * D);
    selfattn_layer_destroy(l);
}

/* One sequence with max_new 2^31 - 1 and no token taken: the sizes fit, the workspace cannot be
   had (NOMEM). The task count's ceil(max_new / 32) once overflowed int here (UBSan). Needs the
   kernel to refuse a ~400 GiB allocation: skipped under overcommit mode 1. */
static void test_cache_huge_max_new(void **state)
{
    (void)state;
    if (!may_refuse_allocations())
        skip();
    selfattn_layer *l = full_layer();
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_CAUSAL, 1), SELFATTN_OK);
    selfattn_cache *c;
    assert_int_equal(selfattn_cache_create(l, 1, 4, &c), SELFATTN_OK);
    float x[D], y[D];
    fill_sentinel(x, D);
    fill_sentinel(y, D);
    const int32_t n_new[1] = {0};
    assert_int_equal(selfattn_forward_cached(l, c, INT32_MAX, x, n_new, y), SELFATTN_ERR_NOMEM);
    assert_sentinel(y, D);
    selfattn_cache_destroy(c);
    selfattn_layer_destroy(l);
}

/* Float options are stored as float: a non-zero value that would narrow to 0 ("default" for
   SCALE, "off" for SOFTCAP) or past FLT_MAX is INVALID and changes nothing; a tiny value that
   survives (a subnormal float) is taken and read back as stored. */
static void test_float_option_narrowing(void **state)
{
    (void)state;
    selfattn_layer *l = full_layer();
    double v = 0;
    assert_int_equal(selfattn_layer_set_float(l, SELFATTN_FOPT_SCALE, 0.5), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_float(l, SELFATTN_FOPT_SOFTCAP, 2.0), SELFATTN_OK);
    const double bad[] = {1e-60, -1e-60, 1e-46, 1e39, -1e300};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(selfattn_layer_set_float(l, SELFATTN_FOPT_SCALE, bad[i]),
                         SELFATTN_ERR_INVALID);
        assert_int_equal(selfattn_layer_get_float(l, SELFATTN_FOPT_SCALE, &v), SELFATTN_OK);
        assert_true(v == 0.5);
        assert_int_equal(selfattn_layer_set_float(l, SELFATTN_FOPT_SOFTCAP, bad[i]),
                         SELFATTN_ERR_INVALID);
        assert_int_equal(selfattn_layer_get_float(l, SELFATTN_FOPT_SOFTCAP, &v), SELFATTN_OK);
        assert_true(v == 2.0);
    }
    const double tiny = 1e-40; /* a subnormal float, not 0 */
    assert_int_equal(selfattn_layer_set_float(l, SELFATTN_FOPT_SCALE, tiny), SELFATTN_OK);
    assert_int_equal(selfattn_layer_get_float(l, SELFATTN_FOPT_SCALE, &v), SELFATTN_OK);
    assert_true(v == (double)(float)tiny && v != 0.0);
    assert_int_equal(selfattn_layer_set_float(l, SELFATTN_FOPT_SOFTCAP, tiny), SELFATTN_OK);
    assert_int_equal(selfattn_layer_get_float(l, SELFATTN_FOPT_SOFTCAP, &v), SELFATTN_OK);
    assert_true(v == (double)(float)tiny && v != 0.0);
    selfattn_layer_destroy(l);
}

/* ---- selfattn_last_error (1.3) ---- */

static void *fresh_thread_message(void *arg)
{
    *(const char **)arg = selfattn_last_error();
    return NULL;
}

/* Asserts the status and that the message names the function and holds every given piece. */
static void expect_error(selfattn_status got, selfattn_status want, const char *fn,
                         const char *piece1, const char *piece2)
{
    const char *m = selfattn_last_error();
    if (got != want || strncmp(m, fn, strlen(fn)) != 0 || m[strlen(fn)] != ':' ||
        (piece1 && !strstr(m, piece1)) || (piece2 && !strstr(m, piece2))) {
        print_error("status %d (want %d), message \"%s\" (want \"%s: ...%s...%s...\")\n", (int)got,
                    (int)want, m, fn, piece1 ? piece1 : "", piece2 ? piece2 : "");
        fail();
    }
}

typedef struct thread_msg {
    char before[256], after[256];
} thread_msg;

static void *failing_thread(void *arg)
{
    thread_msg *t = arg;
    snprintf(t->before, sizeof t->before, "%s", selfattn_last_error());
    selfattn_layer *l = NULL;
    (void)selfattn_layer_create(-3, 2, &l);
    snprintf(t->after, sizeof t->after, "%s", selfattn_last_error());
    return NULL;
}

static void test_last_error(void **state)
{
    (void)state;
    /* a thread that has not failed yet: "" (never NULL) */
    const char *fresh = NULL;
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, fresh_thread_message, &fresh), 0);
    pthread_join(th, NULL);
    assert_non_null(fresh);
    assert_string_equal(fresh, "");

    float x[2 * 8 * D], y[2 * 8 * D], q[2 * 8 * D];
    tu_rng r = {21};
    tu_fill(&r, x, 2 * 8 * D, -1, 1);
    tu_fill(&r, q, 2 * 8 * D, -1, 1);
    selfattn_layer *l = full_layer(), *bare = NULL, *np = NULL;
    const int32_t len_big[2] = {9, 8}, len_neg[2] = {8, -1};

    /* the issue's own example, then each check of the entry points, with its argument */
    expect_error(selfattn_forward(l, 2, 8, x, len_big, y), SELFATTN_ERR_INVALID,
                 "selfattn_forward", "lengths[0] = 9 exceeds seq_len 8", NULL);
    expect_error(selfattn_forward(l, 2, 8, NULL, NULL, y), SELFATTN_ERR_NULL, "selfattn_forward",
                 "x is NULL", NULL);
    expect_error(selfattn_forward(l, 0, 8, x, NULL, y), SELFATTN_ERR_INVALID, "selfattn_forward",
                 "batch 0", NULL);
    expect_error(selfattn_forward(l, INT32_MAX, INT32_MAX, x, NULL, y), SELFATTN_ERR_OVERFLOW,
                 "selfattn_forward", "batch 2147483647 x seq_len 2147483647", "address range");
    selfattn_extras e;
    memset(&e, 0, sizeof e);
    e.struct_size = 4;
    expect_error(selfattn_forward_ex(l, 2, 8, x, NULL, &e, y), SELFATTN_ERR_INVALID,
                 "selfattn_forward_ex", "extras->struct_size 4", NULL);
    expect_error(selfattn_attend(l, 2, 8, 8, q, q, q, len_neg, y), SELFATTN_ERR_INVALID,
                 "selfattn_attend", "kv_lengths[1] = -1 is negative", NULL);
    expect_error(selfattn_attend_backward(l, 2, 8, 8, q, q, NULL, NULL, q, y, NULL, NULL),
                 SELFATTN_ERR_NULL, "selfattn_attend_backward", "v is NULL", NULL);
    assert_int_equal(selfattn_layer_create(D, H, &bare), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_weight(bare, SELFATTN_W_Q, wq, D * D), SELFATTN_OK);
    expect_error(selfattn_forward(bare, 2, 8, x, NULL, y), SELFATTN_ERR_STATE, "selfattn_forward",
                 "W_K, W_V, W_O not set", NULL);
    selfattn_grads g;
    memset(&g, 0, sizeof g);
    g.struct_size = sizeof g;
    g.w_o = y;
    assert_int_equal(selfattn_layer_create(D, H, &np), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(np, SELFATTN_OPT_OUT_PROJ, 0), SELFATTN_OK);
    for (int i = 1; i <= 3; i++)
        assert_int_equal(selfattn_layer_set_weight(np, (selfattn_weight)i, wq, D * D), SELFATTN_OK);
    expect_error(selfattn_backward(np, 2, 8, x, NULL, x, NULL, &g), SELFATTN_ERR_INVALID,
                 "selfattn_backward", "grads->w_o", NULL);
    expect_error(selfattn_layer_set_weight(l, SELFATTN_W_K, wk, 3), SELFATTN_ERR_INVALID,
                 "selfattn_layer_set_weight", "count 3", "256");
    expect_error(selfattn_layer_set(l, (selfattn_option)99, 1), SELFATTN_ERR_INVALID,
                 "selfattn_layer_set", "99 is not an option", NULL);
    expect_error(selfattn_layer_set(l, SELFATTN_OPT_HEAD_DIM, 8), SELFATTN_ERR_STATE,
                 "selfattn_layer_set", "once a weight is set", NULL);
    expect_error(selfattn_layer_set(l, SELFATTN_OPT_WINDOW, -4), SELFATTN_ERR_INVALID,
                 "selfattn_layer_set", "value -4", NULL);
    expect_error(selfattn_layer_set_float(l, SELFATTN_FOPT_SOFTCAP, 1e-60), SELFATTN_ERR_INVALID,
                 "selfattn_layer_set_float", "SOFTCAP", NULL);
    selfattn_layer *none = NULL;
    expect_error(selfattn_layer_create(0, H, &none), SELFATTN_ERR_INVALID,
                 "selfattn_layer_create", "d_model 0", NULL);
    selfattn_cache *c = NULL;
    expect_error(selfattn_cache_create(l, 0, 4, &c), SELFATTN_ERR_INVALID, "selfattn_cache_create",
                 "n_seqs 0", NULL);
    assert_int_equal(selfattn_cache_create(l, 2, 4, &c), SELFATTN_OK);
    expect_error(selfattn_forward_cached(l, c, 1, x, NULL, y), SELFATTN_ERR_STATE,
                 "selfattn_forward_cached", "not causal", NULL);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_CAUSAL, 1), SELFATTN_OK);
    const int32_t n_bad[2] = {5, 0}, n_ok[2] = {3, 0};
    expect_error(selfattn_forward_cached(l, c, 3, x, n_bad, y), SELFATTN_ERR_INVALID,
                 "selfattn_forward_cached", "n_new[0] = 5", NULL);
    assert_int_equal(selfattn_forward_cached(l, c, 3, x, n_ok, y), SELFATTN_OK);
    expect_error(selfattn_forward_cached(l, c, 3, x, n_ok, y), SELFATTN_ERR_INVALID,
                 "selfattn_forward_cached", "capacity 4", NULL);
    expect_error(selfattn_cache_truncate(c, 0, 7), SELFATTN_ERR_INVALID, "selfattn_cache_truncate",
                 "length 7", NULL);
    expect_error(selfattn_cache_copy(c, 0, 2), SELFATTN_ERR_INVALID, "selfattn_cache_copy",
                 "dst_seq 2", NULL);
    int32_t cl;
    expect_error(selfattn_cache_length(c, 5, &cl), SELFATTN_ERR_INVALID, "selfattn_cache_length",
                 "seq 5", NULL);
    uint64_t st_buf[8];
    expect_error(selfattn_forward_train(l, 2, 8, x, NULL, y, st_buf, sizeof st_buf),
                 SELFATTN_ERR_INVALID, "selfattn_forward_train", "state", NULL);

    /* a successful call leaves the message as it was */
    char kept[256];
    snprintf(kept, sizeof kept, "%s", selfattn_last_error());
    assert_int_equal(selfattn_forward(l, 2, 8, x, NULL, y), SELFATTN_OK);
    assert_int_equal(selfattn_cache_length(c, 0, &cl), SELFATTN_OK);
    assert_string_equal(selfattn_last_error(), kept);

    /* per thread: another thread's failure is its own */
    thread_msg tm;
    assert_int_equal(pthread_create(&th, NULL, failing_thread, &tm), 0);
    pthread_join(th, NULL);
    assert_string_equal(tm.before, "");
    assert_non_null(strstr(tm.after, "selfattn_layer_create: d_model -3"));
    assert_string_equal(selfattn_last_error(), kept);

    selfattn_cache_destroy(c);
    selfattn_layer_destroy(l);
    selfattn_layer_destroy(bare);
    selfattn_layer_destroy(np);
}

int main(void)
{
    fill_weights();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_status_strings_and_version),
        cmocka_unit_test(test_create_destroy),
        cmocka_unit_test(test_options),
        cmocka_unit_test(test_weights),
        cmocka_unit_test(test_forward_errors),
        cmocka_unit_test(test_forward_nomem),
        cmocka_unit_test(test_attend_errors),
        cmocka_unit_test(test_extreme_sizes),
        cmocka_unit_test(test_cache_huge_max_new),
        cmocka_unit_test(test_float_option_narrowing),
        cmocka_unit_test(test_last_error),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
