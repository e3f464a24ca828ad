/* The key/value cache: a prompt followed by single- and multi-token steps gives the rows of one
 * causal forward over all the tokens (checked against selfattn_forward_ex within 1e-5 of the
 * output's scale, and against the float64 reference in reference.c within 1e-4), for RoPE 0/1/2
 * and partial rotary dimensions, GQA and MQA, a window whose ring wraps several times, ALiBi,
 * softcap, and mixed n_new per sequence (0 included); truncate, copy, bad input (exact statuses,
 * the cache unchanged: later calls give the bits of a cache that never saw the failed call), NaN
 * isolation between sequences, and distinct caches of one layer used concurrently. */
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "testutil.h"

#define SELF_TOL 1e-5
#define REF_TOL 1e-4

typedef struct ccase {
    const char *name;
    int heads, kv_heads, rope, rope_dims, window, alibi;
    double softcap;
    int capacity;
} ccase;

static tu_layer make(const ccase *c, uint64_t seed)
{
    const tu_spec spec = {c->heads * 8, c->heads, c->kv_heads, 8, 1, 1, 0, 1, 2, 0};
    tu_layer t;
    assert_int_equal(tu_layer_make(&spec, seed, &t), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_ROPE, c->rope), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_ROPE_DIMS, c->rope_dims), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_WINDOW, c->window), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_ALIBI, c->alibi), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_float(t.layer, SELFATTN_FOPT_SOFTCAP, c->softcap),
                     SELFATTN_OK);
    return t;
}

/* Feeds the tokens of S sequences in steps (steps[k][s] new tokens of sequence s at step k,
   a prompt first), and compares every output row with one forward over all the tokens. */
static void run_case(const ccase *c, uint64_t seed)
{
    enum { S = 3, T = 29, STEPS = 10, MAX_STEPS = 40 };
    tu_layer t = make(c, seed);
    const int dm = c->heads * 8;
    tu_rng r = {seed};
    float *x = tu_random(&r, (size_t)S * T * dm, -1.5f, 1.5f);
    /* the step plan: a prompt of different lengths (0 for one sequence), then singles and
       multi-token steps, some sequences idle at times */
    int steps[MAX_STEPS][S];
    int fed[S] = {0, 0, 0}, n_steps = 0;
    for (int k = 0; k < MAX_STEPS; k++, n_steps++) {
        int left = 0;
        for (int s = 0; s < S; s++) {
            int n = k == 0       ? (s == 0 ? 7 : s == 1 ? 0 : 3)
                    : k < STEPS ? ((k + s) % 4 == 0 ? 0 : (k % 3 == 0 ? 3 : 1))
                                : 1; /* then single tokens until every sequence is done */
            if (fed[s] + n > T)
                n = T - fed[s];
            steps[k][s] = n;
            fed[s] += n;
            left += T - fed[s];
        }
        if (left == 0) {
            n_steps++;
            break;
        }
    }
    assert_true(fed[0] == T && fed[1] == T && fed[2] == T);
    selfattn_cache *cache;
    assert_int_equal(selfattn_cache_create(t.layer, S, c->capacity, &cache), SELFATTN_OK);
    float *y = malloc(sizeof(float) * S * T * dm);
    for (int s = 0; s < S; s++)
        fed[s] = 0;
    for (int k = 0; k < n_steps; k++) {
        int max_new = 1;
        for (int s = 0; s < S; s++)
            max_new = steps[k][s] > max_new ? steps[k][s] : max_new;
        float *xs = calloc((size_t)S * max_new * dm, sizeof(float));
        float *ys = malloc(sizeof(float) * S * max_new * dm);
        for (int i = 0; i < S * max_new * dm; i++)
            ys[i] = 99.0f;
        for (int s = 0; s < S; s++)
            memcpy(xs + (size_t)s * max_new * dm, x + ((size_t)s * T + fed[s]) * dm,
                   sizeof(float) * steps[k][s] * dm);
        assert_int_equal(selfattn_forward_cached(t.layer, cache, max_new, xs, steps[k], ys),
                         SELFATTN_OK);
        for (int s = 0; s < S; s++) {
            memcpy(y + ((size_t)s * T + fed[s]) * dm, ys + (size_t)s * max_new * dm,
                   sizeof(float) * steps[k][s] * dm);
            for (int i = steps[k][s] * dm; i < max_new * dm; i++)
                assert_true(ys[(size_t)s * max_new * dm + i] == 0.0f); /* rows past n_new */
            fed[s] += steps[k][s];
            int32_t len;
            assert_int_equal(selfattn_cache_length(cache, s, &len), SELFATTN_OK);
            assert_int_equal(len, fed[s]);
        }
        free(xs);
        free(ys);
    }
    float *yf = malloc(sizeof(float) * S * T * dm);
    double *yr = malloc(sizeof(double) * S * T * dm);
    assert_int_equal(selfattn_forward(t.layer, S, T, x, NULL, yf), SELFATTN_OK);
    ref_opts o = {c->window, c->alibi, c->softcap, NULL, 0, 0, 0, c->rope, c->rope_dims, 0};
    ref_forward_ex(&t.ref, &o, S, T, x, NULL, yr, NULL, NULL);
    double err_self = 0, mx = 0, err_ref, mx_ref;
    for (size_t i = 0; i < (size_t)S * T * dm; i++) {
        err_self = fmax(err_self, fabs((double)y[i] - yf[i]));
        mx = fmax(mx, fabs((double)yf[i]));
    }
    ref_max_err(y, yr, (size_t)S * T * dm, &err_ref, &mx_ref);
    printf("  %-28s vs forward %.1e, vs float64 %.1e (relative)\n", c->name, err_self / mx,
           err_ref / mx_ref);
    assert_true(err_self <= SELF_TOL * mx);
    assert_true(err_ref <= REF_TOL * mx_ref);
    selfattn_cache_destroy(cache);
    free(x);
    free(y);
    free(yf);
    free(yr);
    tu_layer_free(&t);
}

static void test_steps_equal_one_forward(void **state)
{
    (void)state;
    static const ccase cases[] = {
        {"plain", 4, 4, 0, 0, 0, 0, 0, 32},
        {"rope 1 (rotate-half)", 4, 4, 1, 0, 0, 0, 0, 29},
        {"rope 2 (adjacent), GQA", 4, 2, 2, 0, 0, 0, 0, 40},
        {"rope 1, 4 of 8 dims, MQA", 4, 1, 1, 4, 0, 0, 0, 29},
        {"window 5, ring of 9", 4, 2, 1, 0, 5, 0, 0, 9},
        {"window 3, ring of 7, ALiBi", 4, 4, 0, 0, 3, 1, 0, 7},
        {"ALiBi, softcap 2", 4, 4, 0, 0, 0, 1, 2.0, 29},
        {"window 6, rope 2, softcap", 4, 2, 2, 6, 6, 0, 1.0, 12},
        /* one-token sequences beside longer ones: a one-token task takes the whole group of 8
           heads, more rows than the longer sequences' blocks (found by the fuzzer) */
        {"MQA, 8 heads per K/V head", 8, 1, 1, 0, 0, 0, 0, 29},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        run_case(&cases[i], 70 + i);
}

/* Feeds n tokens of sequence s one call. */
static selfattn_status feed(tu_layer *t, selfattn_cache *c, int n_seqs, int s, const float *x, int n,
                            float *y)
{
    const int dm = t->ref.d_model;
    float *xs = calloc((size_t)n_seqs * n * dm, sizeof(float));
    float *ys = malloc(sizeof(float) * n_seqs * n * dm);
    int32_t nn[4] = {0, 0, 0, 0};
    nn[s] = n;
    memcpy(xs + (size_t)s * n * dm, x, sizeof(float) * n * dm);
    const selfattn_status st = selfattn_forward_cached(t->layer, c, n, xs, nn, ys);
    if (st == SELFATTN_OK && y != NULL)
        memcpy(y, ys + (size_t)s * n * dm, sizeof(float) * n * dm);
    free(xs);
    free(ys);
    return st;
}

/* Truncate then re-append equals never having appended; copy makes an independent sequence. */
static void test_truncate_and_copy(void **state)
{
    (void)state;
    for (int window = 0; window <= 6; window += 6) {
        const ccase c = {"", 4, 2, 1, 0, window, 0, 0, 16};
        tu_layer t = make(&c, 90);
        const int dm = 32;
        tu_rng r = {91};
        float *x = tu_random(&r, 40 * dm, -1, 1), *junk = tu_random(&r, 40 * dm, -1, 1);
        float ya[4 * 32], yb[4 * 32], yc[4 * 32];
        selfattn_cache *a, *b;
        assert_int_equal(selfattn_cache_create(t.layer, 2, 16, &a), SELFATTN_OK);
        assert_int_equal(selfattn_cache_create(t.layer, 2, 16, &b), SELFATTN_OK);
        /* a: 8 tokens, 3 junk tokens, truncate to 8, then 4 more; b: 8 tokens then the 4 */
        assert_int_equal(feed(&t, a, 2, 0, x, 8, NULL), SELFATTN_OK);
        assert_int_equal(feed(&t, a, 2, 0, junk, 3, NULL), SELFATTN_OK);
        assert_int_equal(selfattn_cache_truncate(a, 0, 8), SELFATTN_OK);
        assert_int_equal(feed(&t, a, 2, 0, x + 8 * dm, 4, ya), SELFATTN_OK);
        assert_int_equal(feed(&t, b, 2, 0, x, 8, NULL), SELFATTN_OK);
        assert_int_equal(feed(&t, b, 2, 0, x + 8 * dm, 4, yb), SELFATTN_OK);
        assert_memory_equal(ya, yb, sizeof ya);
        /* copy sequence 0 of b to 1, then grow them differently: 1 behaves as 0 would have */
        assert_int_equal(selfattn_cache_copy(b, 0, 1), SELFATTN_OK);
        assert_int_equal(feed(&t, b, 2, 1, junk, 4, yc), SELFATTN_OK); /* 1 diverges */
        assert_int_equal(feed(&t, b, 2, 0, x + 12 * dm, 4, yb), SELFATTN_OK);
        assert_int_equal(feed(&t, a, 2, 0, x + 12 * dm, 4, ya), SELFATTN_OK); /* 0 is unaffected */
        assert_memory_equal(ya, yb, sizeof ya);
        /* truncate to 0 resets; -1 leaves shorter sequences alone */
        assert_int_equal(selfattn_cache_truncate(b, 1, 12), SELFATTN_OK);
        assert_int_equal(selfattn_cache_truncate(b, -1, 14), SELFATTN_OK);
        int32_t l0, l1;
        assert_int_equal(selfattn_cache_length(b, 0, &l0), SELFATTN_OK);
        assert_int_equal(selfattn_cache_length(b, 1, &l1), SELFATTN_OK);
        assert_int_equal(l0, 14);
        assert_int_equal(l1, 12);
        assert_int_equal(selfattn_cache_truncate(b, -1, 0), SELFATTN_OK);
        assert_int_equal(selfattn_cache_length(b, 1, &l1), SELFATTN_OK);
        assert_int_equal(l1, 0);
        selfattn_cache_destroy(a);
        selfattn_cache_destroy(b);
        free(x);
        free(junk);
        tu_layer_free(&t);
    }
}

/* Bad input: exact statuses, and the cache as it was (same lengths; later calls give the bits of
   a twin cache that never saw the failed calls). */
static void test_bad_input(void **state)
{
    (void)state;
    const ccase c = {"", 4, 2, 1, 0, 0, 0, 0, 10};
    tu_layer t = make(&c, 95), other = make(&c, 96);
    const int dm = 32;
    tu_rng r = {97};
    float *x = tu_random(&r, 2 * 12 * dm, -1, 1), *y = malloc(sizeof(float) * 2 * 12 * dm);
    selfattn_cache *a, *twin, *c2;
    assert_int_equal(selfattn_cache_create(t.layer, 2, 10, &a), SELFATTN_OK);
    assert_int_equal(selfattn_cache_create(t.layer, 2, 10, &twin), SELFATTN_OK);
    assert_int_equal(feed(&t, a, 2, 0, x, 6, NULL), SELFATTN_OK);
    assert_int_equal(feed(&t, twin, 2, 0, x, 6, NULL), SELFATTN_OK);
    for (int i = 0; i < 2 * 12 * dm; i++)
        y[i] = 5.0f;

    /* capacity: 6 + 5 > 10 */
    int32_t n5[2] = {5, 0};
    assert_int_equal(selfattn_forward_cached(t.layer, a, 5, x, n5, y), SELFATTN_ERR_INVALID);
    int32_t bad_n[2] = {1, 3}; /* above max_new */
    assert_int_equal(selfattn_forward_cached(t.layer, a, 2, x, bad_n, y), SELFATTN_ERR_INVALID);
    bad_n[1] = -1;
    assert_int_equal(selfattn_forward_cached(t.layer, a, 2, x, bad_n, y), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_forward_cached(t.layer, a, 0, x, NULL, y), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_forward_cached(other.layer, a, 1, x, NULL, y), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_forward_cached(t.layer, NULL, 1, x, NULL, y), SELFATTN_ERR_NULL);
    assert_int_equal(selfattn_forward_cached(t.layer, a, 1, NULL, NULL, y), SELFATTN_ERR_NULL);
    /* options the cache recorded, and causality */
    assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_CAUSAL, 0), SELFATTN_OK);
    assert_int_equal(selfattn_forward_cached(t.layer, a, 1, x, NULL, y), SELFATTN_ERR_STATE);
    assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_CAUSAL, 1), SELFATTN_OK);
    const selfattn_option changed[] = {SELFATTN_OPT_WINDOW, SELFATTN_OPT_ROPE, SELFATTN_OPT_ROPE_DIMS};
    const int64_t values[] = {4, 2, 4};
    for (int i = 0; i < 3; i++) {
        int64_t old;
        assert_int_equal(selfattn_layer_get(t.layer, changed[i], &old), SELFATTN_OK);
        assert_int_equal(selfattn_layer_set(t.layer, changed[i], values[i]), SELFATTN_OK);
        assert_int_equal(selfattn_forward_cached(t.layer, a, 1, x, NULL, y), SELFATTN_ERR_STATE);
        assert_int_equal(selfattn_layer_set(t.layer, changed[i], i == 2 ? 0 : old), SELFATTN_OK);
    }
    assert_int_equal(selfattn_layer_set_float(t.layer, SELFATTN_FOPT_ROPE_THETA, 500.0), SELFATTN_OK);
    assert_int_equal(selfattn_forward_cached(t.layer, a, 1, x, NULL, y), SELFATTN_ERR_STATE);
    assert_int_equal(selfattn_layer_set_float(t.layer, SELFATTN_FOPT_ROPE_THETA, 0.0), SELFATTN_OK);
    for (int i = 0; i < 2 * 12 * dm; i++)
        assert_true(y[i] == 5.0f); /* never written */
    /* lengths, truncate, copy */
    int32_t len;
    assert_int_equal(selfattn_cache_length(a, 2, &len), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_cache_length(a, -1, &len), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_cache_length(NULL, 0, &len), SELFATTN_ERR_NULL);
    assert_int_equal(selfattn_cache_truncate(a, 0, 7), SELFATTN_ERR_INVALID); /* above 6 */
    assert_int_equal(selfattn_cache_truncate(a, 1, 1), SELFATTN_ERR_INVALID); /* above 0 */
    assert_int_equal(selfattn_cache_truncate(a, 2, 0), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_cache_truncate(a, 0, -1), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_cache_copy(a, 0, 2), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_cache_copy(a, -1, 0), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_cache_length(a, 0, &len), SELFATTN_OK);
    assert_int_equal(len, 6);
    /* create */
    assert_int_equal(selfattn_cache_create(t.layer, 0, 10, &c2), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_cache_create(t.layer, 1, 0, &c2), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_cache_create(NULL, 1, 1, &c2), SELFATTN_ERR_NULL);
    assert_int_equal(selfattn_cache_create(t.layer, INT32_MAX, INT32_MAX, &c2),
                     SELFATTN_ERR_OVERFLOW);
    /* the failed calls left no trace: a and its twin agree bit for bit */
    float ya[4 * 32], yb[4 * 32];
    assert_int_equal(feed(&t, a, 2, 0, x + 6 * dm, 4, ya), SELFATTN_OK);
    assert_int_equal(feed(&t, twin, 2, 0, x + 6 * dm, 4, yb), SELFATTN_OK);
    assert_memory_equal(ya, yb, sizeof ya);
    /* a window: a truncation whose next token needs overwritten positions */
    const ccase cw = {"", 4, 2, 0, 0, 4, 0, 0, 6};
    tu_layer tw = make(&cw, 98);
    selfattn_cache *w;
    assert_int_equal(selfattn_cache_create(tw.layer, 1, 6, &w), SELFATTN_OK);
    for (int i = 0; i < 12; i++)
        assert_int_equal(feed(&tw, w, 1, 0, x + i * dm, 1, NULL), SELFATTN_OK);
    /* positions 6..11 are kept; a next token at 5 would need 2..4 */
    assert_int_equal(selfattn_cache_truncate(w, 0, 5), SELFATTN_ERR_INVALID);
    assert_int_equal(selfattn_cache_truncate(w, 0, 9), SELFATTN_OK); /* needs 6..8: kept */
    /* a call too large for the ring: min(L, w - 1) + n = 3 + 4 > 6 */
    assert_int_equal(feed(&tw, w, 1, 0, x, 4, NULL), SELFATTN_ERR_INVALID);
    assert_int_equal(feed(&tw, w, 1, 0, x, 3, NULL), SELFATTN_OK);
    selfattn_cache_destroy(w);
    tu_layer_free(&tw);
    selfattn_cache_destroy(a);
    selfattn_cache_destroy(twin);
    selfattn_cache_destroy(NULL);
    free(x);
    free(y);
    tu_layer_free(&t);
    tu_layer_free(&other);
}

/* A NaN in one sequence's x reaches neither another sequence's output nor its cache. */
static void test_nan_isolated(void **state)
{
    (void)state;
    const ccase c = {"", 4, 2, 1, 0, 0, 0, 0, 16};
    tu_layer t = make(&c, 99);
    const int dm = 32;
    tu_rng r = {100};
    float *x = tu_random(&r, 2 * 4 * dm, -1, 1), y1[2 * 4 * 32], y2[2 * 4 * 32];
    selfattn_cache *a, *b;
    assert_int_equal(selfattn_cache_create(t.layer, 2, 16, &a), SELFATTN_OK);
    assert_int_equal(selfattn_cache_create(t.layer, 2, 16, &b), SELFATTN_OK);
    assert_int_equal(selfattn_forward_cached(t.layer, a, 4, x, NULL, y1), SELFATTN_OK);
    x[3] = NAN; /* sequence 0 */
    assert_int_equal(selfattn_forward_cached(t.layer, b, 4, x, NULL, y2), SELFATTN_OK);
    assert_true(isnan(y2[0]));
    assert_memory_equal(y1 + 4 * dm, y2 + 4 * dm, sizeof(float) * 4 * dm);
    /* and the next step of sequence 1 still matches */
    int32_t n[2] = {0, 1};
    assert_int_equal(selfattn_forward_cached(t.layer, a, 1, x, n, y1), SELFATTN_OK);
    assert_int_equal(selfattn_forward_cached(t.layer, b, 1, x, n, y2), SELFATTN_OK);
    assert_memory_equal(y1 + dm, y2 + dm, sizeof(float) * dm);
    selfattn_cache_destroy(a);
    selfattn_cache_destroy(b);
    free(x);
    tu_layer_free(&t);
}

typedef struct decoder {
    tu_layer *t;
    const float *x;
    float *y;
} decoder;

static void *decode_loop(void *p)
{
    decoder *d = p;
    selfattn_cache *c;
    if (selfattn_cache_create(d->t->layer, 2, 64, &c) != SELFATTN_OK)
        return NULL;
    int ok = selfattn_forward_cached(d->t->layer, c, 8, d->x, NULL, d->y) == SELFATTN_OK;
    for (int i = 0; i < 20 && ok; i++)
        ok = selfattn_forward_cached(d->t->layer, c, 1, d->x + (8 + i) * 32, NULL,
                                     d->y + 512 + (size_t)i * 2 * 32) == SELFATTN_OK;
    selfattn_cache_destroy(c);
    return ok ? d : NULL;
}

/* Distinct caches of one layer, used from several threads at once, give the serial bits. */
static void test_concurrent_caches(void **state)
{
    (void)state;
    const ccase c = {"", 4, 2, 1, 0, 0, 0, 0, 64};
    tu_layer t = make(&c, 101);
    tu_rng r = {102};
    float *x = tu_random(&r, 2 * 30 * 32, -1, 1);
    enum { N = 3 };
    float *y[N + 1];
    decoder d[N + 1];
    for (int i = 0; i <= N; i++) {
        y[i] = calloc(2 * 30 * 32, sizeof(float));
        d[i] = (decoder){&t, x, y[i]};
    }
    assert_non_null(decode_loop(&d[N])); /* serial */
    pthread_t tid[N];
    for (int i = 0; i < N; i++)
        assert_int_equal(pthread_create(&tid[i], NULL, decode_loop, &d[i]), 0);
    for (int i = 0; i < N; i++) {
        void *ret;
        pthread_join(tid[i], &ret);
        assert_non_null(ret);
        assert_memory_equal(y[i], y[N], sizeof(float) * 2 * 30 * 32);
    }
    for (int i = 0; i <= N; i++)
        free(y[i]);
    free(x);
    tu_layer_free(&t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_steps_equal_one_forward), cmocka_unit_test(test_truncate_and_copy),
        cmocka_unit_test(test_bad_input),               cmocka_unit_test(test_nan_isolated),
        cmocka_unit_test(test_concurrent_caches),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
