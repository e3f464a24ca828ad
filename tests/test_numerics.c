/* selfattn_forward and selfattn_attend against the float64 reference in reference.c.
 *
 * Tolerance: max |y - y_ref| <= 1e-4 * max |y_ref|. Each output element passes through float32
 * dot products of length K <= 1000 (Q/K/V projection, Q K^T, P V, output projection) and the
 * softmax kernel (<= 2e-6 relative, tested in test_kernels). A length-K float32 dot product has
 * the worst-case error bound K * u * sum|terms| (Higham, "Accuracy and Stability of Numerical
 * Algorithms", sec. 3.1) with u = 2^-24 = 6e-8, i.e. 6e-5 at K = 1000 in the worst case and about
 * sqrt(K) * u = 2e-6 typically; 1e-4 of the output's scale covers the chain with margin, while a
 * wrong mask, scale, head mapping or bias shows up as errors of order 1e-2 to 1. */
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

typedef struct fwd_case {
    const char *name;
    tu_spec spec;
    int batch, seq_len;
    int32_t lengths[4]; /* used when lengths[0] >= 0 ... up to batch entries; -1 = NULL */
} fwd_case;

static void run_forward_case(const fwd_case *c, uint64_t seed)
{
    tu_layer t;
    assert_int_equal(tu_layer_make(&c->spec, seed, &t), SELFATTN_OK);
    tu_rng rng = {seed * 7 + 1};
    const size_t n = (size_t)c->batch * c->seq_len * c->spec.d_model;
    float *x = tu_random(&rng, n, -1.0f, 1.0f);
    float *y = malloc(n * sizeof *y);
    for (size_t i = 0; i < n; i++)
        y[i] = 12345.0f; /* every element must be overwritten (padding with zeros) */
    double *yr = malloc(n * sizeof *yr);
    const int32_t *lengths = c->lengths[0] >= 0 ? c->lengths : NULL;

    assert_int_equal(selfattn_forward(t.layer, c->batch, c->seq_len, x, lengths, y), SELFATTN_OK);
    ref_forward(&t.ref, c->batch, c->seq_len, x, lengths, yr);
    double err, mx;
    ref_max_err(y, yr, n, &err, &mx);
    printf("  %-34s max|y|=%.3e  max err=%.3e  (%.2e relative)\n", c->name, mx, err,
           mx > 0 ? err / mx : err);
    if (mx == 0.0)
        assert_true(err == 0.0);
    else
        assert_true(err <= TOL * mx);
    /* padding rows are exact zeros */
    if (lengths != NULL)
        for (int b = 0; b < c->batch; b++)
            for (size_t i = (size_t)lengths[b] * c->spec.d_model;
                 i < (size_t)c->seq_len * c->spec.d_model; i++)
                assert_true(y[(size_t)b * c->seq_len * c->spec.d_model + i] == 0.0f);
    free(x);
    free(y);
    free(yr);
    tu_layer_free(&t);
}

/* d_model, heads, kv heads, head_dim, causal, out_proj, packed, biases, threads, scale */
static const fwd_case forward_cases[] = {
    {"b1 L1 d8 h1", {8, 1, 0, 0, 0, 1, 0, 1, 1, 0}, 1, 1, {-1}},
    {"b2 L2 d8 h2 causal", {8, 2, 0, 0, 1, 1, 0, 1, 2, 0}, 2, 2, {-1}},
    {"b3 L7 d24 h3 causal", {24, 3, 0, 0, 1, 1, 0, 1, 1, 0}, 3, 7, {-1}},
    {"b3 L64 d64 h4 lengths 0,1,64", {64, 4, 0, 0, 0, 1, 0, 1, 2, 0}, 3, 64, {0, 1, 64}},
    {"b3 L64 d64 h4 causal lengths", {64, 4, 0, 0, 1, 1, 0, 1, 3, 0}, 3, 64, {64, 0, 17}},
    {"b1 L65 d40 h5 causal", {40, 5, 0, 0, 1, 1, 0, 1, 2, 0}, 1, 65, {-1}},
    {"b2 L65 d100 h10", {100, 10, 0, 0, 0, 1, 0, 0, 2, 0}, 2, 65, {-1}},
    {"b2 L257 d96 h8/2 GQA causal", {96, 8, 2, 0, 1, 1, 0, 1, 2, 0}, 2, 257, {257, 100}},
    {"b1 L257 d128 h8/1 MQA", {128, 8, 1, 0, 0, 1, 0, 1, 2, 0}, 1, 257, {-1}},
    {"b2 L33 d48 h4 hd16 scale 0.3", {48, 4, 0, 16, 0, 1, 0, 1, 1, 0.3f}, 2, 33, {-1}},
    {"b1 L40 d30 h4 hd7 causal", {30, 4, 2, 7, 1, 1, 0, 1, 2, 0}, 1, 40, {-1}},
    {"b2 L31 d64 h4 no out proj", {64, 4, 0, 0, 1, 0, 0, 1, 2, 0}, 2, 31, {31, 5}},
    {"b2 L17 d32 h4 packed QKV", {32, 4, 0, 0, 0, 1, 1, 1, 1, 0}, 2, 17, {-1}},
    {"b3 L9 d16 h16 hd1 lengths", {16, 16, 0, 0, 1, 1, 0, 1, 2, 0}, 3, 9, {9, 1, 0}},
    {"b1 L1000 d512 h16", {512, 16, 0, 0, 0, 1, 0, 1, 2, 0}, 1, 1000, {-1}},
    {"b1 L1000 d256 h16/4 causal", {256, 16, 4, 0, 1, 1, 0, 1, 2, 0}, 1, 1000, {-1}},
};

static void test_forward_grid(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof forward_cases / sizeof forward_cases[0]; i++)
        run_forward_case(&forward_cases[i], 1000 + i);
}

/* The same layer at 1, 2 and 3 threads gives the same numbers (within TOL of the reference),
   and batch-size independence: sequence b's output does not depend on the other sequences. */
static void test_forward_batch_independence(void **state)
{
    (void)state;
    const tu_spec spec = {64, 4, 2, 0, 1, 1, 0, 1, 2, 0};
    tu_layer t;
    assert_int_equal(tu_layer_make(&spec, 77, &t), SELFATTN_OK);
    const int L = 50, dm = 64;
    tu_rng rng = {5};
    float *x = tu_random(&rng, (size_t)3 * L * dm, -1, 1);
    float *y3 = malloc(sizeof(float) * 3 * L * dm), *y1 = malloc(sizeof(float) * L * dm);
    const int32_t lens[3] = {50, 20, 33};
    assert_int_equal(selfattn_forward(t.layer, 3, L, x, lens, y3), SELFATTN_OK);
    for (int b = 0; b < 3; b++) {
        assert_int_equal(selfattn_forward(t.layer, 1, L, x + (size_t)b * L * dm, &lens[b], y1),
                         SELFATTN_OK);
        for (int i = 0; i < L * dm; i++)
            assert_float_equal(y1[i], y3[(size_t)b * L * dm + i], 1e-5);
    }
    free(x);
    free(y3);
    free(y1);
    tu_layer_free(&t);
}

typedef struct att_case {
    const char *name;
    tu_spec spec;
    int batch, q_len, kv_len;
    int32_t kv_lengths[3];
} att_case;

static const att_case attend_cases[] = {
    {"q5 kv9 h4/2 hd16 causal", {64, 4, 2, 16, 1, 1, 0, 0, 2, 0}, 2, 5, 9, {9, 3}},
    {"q9 kv4 causal (rows see nothing)", {32, 2, 0, 0, 1, 1, 0, 0, 1, 0}, 1, 9, 4, {-1}},
    {"q1 kv300 decode h8/1", {64, 8, 1, 0, 1, 1, 0, 0, 2, 0}, 3, 1, 300, {300, 0, 1}},
    {"q70 kv70 h3 scale -0.2", {48, 3, 0, 0, 0, 1, 0, 0, 2, -0.2f}, 1, 70, 70, {-1}},
    {"q130 kv200 h2 hd33 lengths", {66, 2, 0, 33, 0, 1, 0, 0, 2, 0}, 2, 130, 200, {150, 200}},
};

static void test_attend_grid(void **state)
{
    (void)state;
    for (size_t ci = 0; ci < sizeof attend_cases / sizeof attend_cases[0]; ci++) {
        const att_case *c = &attend_cases[ci];
        tu_layer t;
        /* attend needs no weights: build the layer without any by creating it directly */
        assert_int_equal(selfattn_layer_create(c->spec.d_model, c->spec.n_heads, &t.layer),
                         SELFATTN_OK);
        if (c->spec.n_kv_heads)
            assert_int_equal(
                selfattn_layer_set(t.layer, SELFATTN_OPT_N_KV_HEADS, c->spec.n_kv_heads),
                SELFATTN_OK);
        if (c->spec.head_dim)
            assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_HEAD_DIM, c->spec.head_dim),
                             SELFATTN_OK);
        assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_CAUSAL, c->spec.causal),
                         SELFATTN_OK);
        assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_THREADS, c->spec.threads),
                         SELFATTN_OK);
        assert_int_equal(selfattn_layer_set_scale(t.layer, c->spec.scale), SELFATTN_OK);
        const int hd = c->spec.head_dim ? c->spec.head_dim : c->spec.d_model / c->spec.n_heads;
        const int nkvh = c->spec.n_kv_heads ? c->spec.n_kv_heads : c->spec.n_heads;
        const size_t nq = (size_t)c->spec.n_heads * hd, nkv = (size_t)nkvh * hd;
        ref_layer r = {c->spec.d_model,
                       c->spec.n_heads,
                       nkvh,
                       hd,
                       c->spec.causal,
                       1,
                       c->spec.scale != 0 ? c->spec.scale : 1.0 / sqrt((double)hd),
                       NULL,
                       NULL,
                       NULL,
                       NULL,
                       NULL,
                       NULL,
                       NULL,
                       NULL,
                       0};
        tu_rng rng = {ci + 31};
        const size_t qn = (size_t)c->batch * c->q_len * nq, kn = (size_t)c->batch * c->kv_len * nkv;
        float *q = tu_random(&rng, qn, -2, 2), *k = tu_random(&rng, kn, -2, 2),
              *v = tu_random(&rng, kn, -1, 1), *out = malloc(qn * sizeof(float));
        for (size_t i = 0; i < qn; i++)
            out[i] = 999.0f;
        double *od = malloc(qn * sizeof(double));
        const int32_t *kvl = c->kv_lengths[0] >= 0 ? c->kv_lengths : NULL;
        assert_int_equal(selfattn_attend(t.layer, c->batch, c->q_len, c->kv_len, q, k, v, kvl, out),
                         SELFATTN_OK);
        ref_attend(&r, c->batch, c->q_len, c->kv_len, q, k, v, kvl, od);
        double err, mx;
        ref_max_err(out, od, qn, &err, &mx);
        printf("  attend %-30s max|y|=%.3e  max err=%.3e\n", c->name, mx, err);
        assert_true(err <= TOL * mx);
        for (size_t i = 0; i < qn; i++)
            if (od[i] == 0.0 && !(c->spec.causal == 0 && kvl == NULL))
                assert_true(out[i] == 0.0f || fabs(out[i]) <= TOL * mx);
        free(q);
        free(k);
        free(v);
        free(out);
        free(od);
        selfattn_layer_destroy(t.layer);
    }
}

/* Rows that see no key are exact zeros, never NaN: causal with q_len > kv_len, and length 0. */
static void test_fully_masked_rows_are_zero(void **state)
{
    (void)state;
    selfattn_layer *l;
    assert_int_equal(selfattn_layer_create(8, 2, &l), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(l, SELFATTN_OPT_CAUSAL, 1), SELFATTN_OK);
    tu_rng rng = {3};
    float *q = tu_random(&rng, 6 * 8, -1, 1), *k = tu_random(&rng, 2 * 8, -1, 1),
          *v = tu_random(&rng, 2 * 8, -1, 1), out[6 * 8];
    assert_int_equal(selfattn_attend(l, 1, 6, 2, q, k, v, NULL, out), SELFATTN_OK);
    for (int i = 0; i < 4 * 8; i++) /* query i sees keys j <= i - 4 */
        assert_true(out[i] == 0.0f);
    for (int i = 4 * 8; i < 6 * 8; i++)
        assert_true(out[i] == out[i] && out[i] != 0.0f);
    const int32_t zero = 0;
    assert_int_equal(selfattn_attend(l, 1, 6, 2, q, k, v, &zero, out), SELFATTN_OK);
    for (int i = 0; i < 6 * 8; i++)
        assert_true(out[i] == 0.0f);
    free(q);
    free(k);
    free(v);
    selfattn_layer_destroy(l);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_forward_grid),
        cmocka_unit_test(test_forward_batch_independence),
        cmocka_unit_test(test_attend_grid),
        cmocka_unit_test(test_fully_masked_rows_are_zero),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
