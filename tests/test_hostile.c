/* Numbers under hostile input: what NaN, infinity, huge and tiny values produce.
 *   - a NaN or infinity in one sequence never reaches another sequence of the batch;
 *   - within its own sequence it reaches the rows that attend to it (and may reach others);
 *   - padding positions of x are never read (NaN there changes nothing);
 *   - finite scores of any magnitude saturate the softmax without overflow (one-hot weights);
 *   - subnormal inputs give finite results matching the float64 reference. */
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

#define B 3
#define L 20
#define D 32

static int all_finite(const float *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(p[i]))
            return 0;
    return 1;
}

static void forward_one(const selfattn_layer *l, const float *x, int32_t len, float *y)
{
    assert_int_equal(selfattn_forward(l, 1, L, x, &len, y), SELFATTN_OK);
}

static void check_poison(float poison, int causal)
{
    const tu_spec spec = {D, 4, 2, 0, causal, 1, 0, 1, 2, 0};
    tu_layer t;
    assert_int_equal(tu_layer_make(&spec, 21, &t), SELFATTN_OK);
    tu_rng r = {3};
    float x[B * L * D], y[B * L * D], solo[L * D];
    tu_fill(&r, x, B * L * D, -1, 1);
    const int32_t lens[B] = {L, L, 12};
    x[(1 * L + 5) * D + 7] = poison;  /* sequence 1, position 5 */
    x[(2 * L + 15) * D + 3] = poison; /* sequence 2, a padding position */
    assert_int_equal(selfattn_forward(t.layer, B, L, x, lens, y), SELFATTN_OK);
    /* sequence 0: untouched by the others */
    assert_true(all_finite(y, L * D));
    forward_one(t.layer, x, L, solo);
    for (int i = 0; i < L * D; i++)
        assert_float_equal(y[i], solo[i], 1e-6);
    /* sequence 1: the poisoned row sees its own key and value. (Other rows of the sequence may
       be poisoned too, even under a causal mask: masked weights are zeros that multiply the
       poisoned value row, and 0 * NaN is NaN, as in PyTorch's math attention.) */
    const float *y1 = y + L * D;
    assert_false(all_finite(y1 + 5 * D, D));
    /* sequence 2: the poison sits in padding, which is never read */
    const float *y2 = y + 2 * L * D;
    assert_true(all_finite(y2, L * D));
    forward_one(t.layer, x + 2 * L * D, 12, solo);
    for (int i = 0; i < L * D; i++)
        assert_float_equal(y2[i], solo[i], 1e-6);
    for (int i = 12 * D; i < L * D; i++)
        assert_true(y2[i] == 0.0f);
    tu_layer_free(&t);
}

static void test_nan_stays_in_its_rows(void **state)
{
    (void)state;
    check_poison(NAN, 0);
    check_poison(NAN, 1);
}

static void test_inf_stays_in_its_rows(void **state)
{
    (void)state;
    check_poison(INFINITY, 0);
    check_poison(-INFINITY, 1);
}

/* Scores of magnitude ~1e30 (finite): the softmax saturates to the largest score's key, without
   overflow, and a query whose scores are all hugely negative still gets finite weights. */
static void test_huge_scores_saturate(void **state)
{
    (void)state;
    selfattn_layer *l;
    assert_int_equal(selfattn_layer_create(8, 1, &l), SELFATTN_OK);
    enum { KL = 5 };
    float q[2 * 8], k[KL * 8], v[KL * 8], out[2 * 8];
    for (int j = 0; j < KL; j++)
        for (int d = 0; d < 8; d++) {
            k[j * 8 + d] = (float)(j + 1) * 1e14f * (d == 0 ? 1.0f : 0.0f);
            v[j * 8 + d] = (float)(10 * j + d);
        }
    for (int d = 0; d < 8; d++) {
        q[d] = d == 0 ? 1e15f : 0.0f;      /* scores (j+1) * 1e29 / sqrt(8): key 4 wins */
        q[8 + d] = d == 0 ? -1e15f : 0.0f; /* scores -(j+1) * 1e29: key 0 wins */
    }
    assert_int_equal(selfattn_attend(l, 1, 2, KL, q, k, v, NULL, out), SELFATTN_OK);
    for (int d = 0; d < 8; d++) {
        assert_float_equal(out[d], v[4 * 8 + d], 1e-5);
        assert_float_equal(out[8 + d], v[0 * 8 + d], 1e-5);
    }
    /* a huge scale does the same */
    assert_int_equal(selfattn_layer_set_scale(l, 1e30f), SELFATTN_OK);
    for (int d = 0; d < 8; d++)
        q[d] = d == 0 ? 1.0f : 0.0f;
    for (int j = 0; j < KL; j++)
        k[j * 8] = (float)(j + 1);
    assert_int_equal(selfattn_attend(l, 1, 1, KL, q, k, v, NULL, out), SELFATTN_OK);
    for (int d = 0; d < 8; d++)
        assert_float_equal(out[d], v[4 * 8 + d], 1e-5);
    selfattn_layer_destroy(l);
}

/* Subnormal inputs: finite, and equal to the float64 reference. */
static void test_subnormal_inputs(void **state)
{
    (void)state;
    const tu_spec spec = {D, 4, 0, 0, 1, 1, 0, 1, 1, 0};
    tu_layer t;
    assert_int_equal(tu_layer_make(&spec, 8, &t), SELFATTN_OK);
    tu_rng r = {4};
    float x[L * D], y[L * D];
    double yr[L * D];
    tu_fill(&r, x, L * D, -1, 1);
    for (int i = 0; i < L * D; i += 3)
        x[i] *= FLT_MIN / 64.0f; /* subnormal */
    assert_int_equal(selfattn_forward(t.layer, 1, L, x, NULL, y), SELFATTN_OK);
    assert_true(all_finite(y, L * D));
    ref_forward(&t.ref, 1, L, x, NULL, yr);
    double err, mx;
    ref_max_err(y, yr, L * D, &err, &mx);
    assert_true(err <= 1e-4 * mx);
    tu_layer_free(&t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_nan_stays_in_its_rows),
        cmocka_unit_test(test_inf_stays_in_its_rows),
        cmocka_unit_test(test_huge_scores_saturate),
        cmocka_unit_test(test_subnormal_inputs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
