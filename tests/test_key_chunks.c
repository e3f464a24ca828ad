/* The online softmax over key chunks (the forward core's path for long rows) against the float64
 * reference, at small sizes: SELFATTN_KEY_CHUNK forces chunks of a few keys (set here before each
 * call; the library reads it when it plans a call), and one call crosses the automatic threshold
 * with the variable unset. Every option the core applies per key: causal alignments 1, 2 and 3,
 * a window, ALiBi, a softcap, an additive bias with -inf entries, kv_lengths, grouped-query
 * heads, a value width dv != head_dim, and large scores whose running maximum grows chunk after
 * chunk (the rescaling of the output rows). The calls ask for lse but not for weights (weights
 * take whole rows).
 *
 * Tolerances (the argument of test_masks.c): out max|o - o_ref| <= 1e-4 max|o_ref|; lse
 * |lse - lse_ref| <= 1e-4 (1 + |lse_ref|), -inf exactly where the reference has it; and the
 * chunked output within 1e-5 (1 + |o|) of the whole-row path's (SELFATTN_KEY_CHUNK=0). */
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

typedef struct kcase {
    int heads, kv_heads, dv, causal, window, alibi, lengths, bias, q_len, kv_len;
    double softcap;
    float q_amp; /* query entries in [-q_amp, q_amp]: large scores, a growing running maximum */
} kcase;

/* One attend_ex call (lse only) of case c with chunks of `chunk` keys ("0": whole rows, NULL:
   the automatic choice) into out and lse. */
static void kc_call(const tu_layer *t, const kcase *c, const char *chunk, const float *q,
                    const float *k, const float *v, const int32_t *lens, const float *bias,
                    float *out, float *lse)
{
    if (chunk != NULL)
        assert_int_equal(setenv("SELFATTN_KEY_CHUNK", chunk, 1), 0);
    else
        assert_int_equal(unsetenv("SELFATTN_KEY_CHUNK"), 0);
    selfattn_extras e;
    memset(&e, 0, sizeof e);
    e.struct_size = sizeof e;
    e.attn_bias = bias;
    e.bias_stride_batch = (int64_t)c->heads * c->q_len * c->kv_len;
    e.bias_stride_head = (int64_t)c->q_len * c->kv_len;
    e.bias_stride_row = c->kv_len;
    e.lse = lse;
    assert_int_equal(selfattn_attend_ex(t->layer, 2, c->q_len, c->kv_len, q, k, v, lens, &e, out),
                     SELFATTN_OK);
    assert_int_equal(unsetenv("SELFATTN_KEY_CHUNK"), 0);
}

static void kc_run(const kcase *c, const char *chunk, uint64_t seed)
{
    enum { B = 2, HD = 8 };
    const int H = c->heads, Q = c->q_len, K = c->kv_len;
    const tu_spec spec = {H * HD, H, c->kv_heads, HD, c->causal != 0, 1, 0, 1, 2, 0};
    tu_layer t;
    assert_int_equal(tu_layer_make_v(&spec, c->dv, seed, 0, &t), SELFATTN_OK);
    t.ref.causal = c->causal;
    assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_CAUSAL, c->causal), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_WINDOW, c->window), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set(t.layer, SELFATTN_OPT_ALIBI, c->alibi), SELFATTN_OK);
    assert_int_equal(selfattn_layer_set_float(t.layer, SELFATTN_FOPT_SOFTCAP, c->softcap),
                     SELFATTN_OK);
    const int dv = c->dv != 0 ? c->dv : HD;
    const size_t nq = (size_t)H * HD, nk = (size_t)c->kv_heads * HD;
    const size_t nv = (size_t)c->kv_heads * dv, no = (size_t)H * dv, nl = (size_t)B * H * Q;
    tu_rng r = {seed};
    float *q = tu_random(&r, B * Q * nq, -c->q_amp, c->q_amp);
    float *k = tu_random(&r, B * K * nk, -1.5f, 1.5f), *v = tu_random(&r, B * K * nv, -1, 1);
    if (c->q_amp > 2.0f) /* keys growing along the sequence: each chunk holds larger scores */
        for (int b = 0; b < B; b++)
            for (int j = 0; j < K; j++)
                for (size_t d = 0; d < nk; d++)
                    k[((size_t)b * K + j) * nk + d] = 0.2f + 1.5f * (float)j / (float)K;
    float *bias = NULL;
    if (c->bias) {
        const size_t n = (size_t)B * H * Q * K;
        bias = tu_random(&r, n, -2.0f, 2.0f);
        for (size_t i = 0; i < n; i++)
            if (tu_uniform(&r) < 0.1)
                bias[i] = -INFINITY;
        for (size_t i = 0; i + 40 <= n; i += (size_t)K * 3) /* runs of -inf longer than a chunk */
            for (size_t j = 0; j < 40; j++)
                bias[i + j] = -INFINITY;
    }
    /* the second sequence shorter than a couple of chunks, the first all but its last keys */
    const int32_t lens[B] = {K - 5, K / 3};
    const int32_t *lp = c->lengths ? lens : NULL;
    float *out = malloc(sizeof(float) * B * Q * no), *whole = malloc(sizeof(float) * B * Q * no);
    float *lse = malloc(sizeof(float) * nl), *lse_whole = malloc(sizeof(float) * nl);
    kc_call(&t, c, chunk, q, k, v, lp, bias, out, lse);
    kc_call(&t, c, "0", q, k, v, lp, bias, whole, lse_whole);

    double *yr = malloc(sizeof(double) * B * Q * no), *lr = malloc(sizeof(double) * nl);
    ref_opts o = {c->window,      c->alibi, c->softcap, bias, (int64_t)H * Q * K,
                  (int64_t)Q * K, K,        0,          0,    0};
    ref_attend_ex(&t.ref, &o, B, Q, K, q, k, v, lp, yr, NULL, lr);
    double err, mx;
    ref_max_err(out, yr, (size_t)B * Q * no, &err, &mx);
    if (!(mx == 0.0 ? err == 0.0 : err <= TOL * mx))
        print_error("chunk %s causal %d window %d alibi %d softcap %g bias %d lengths %d: "
                    "error %g of %g\n",
                    chunk ? chunk : "auto", c->causal, c->window, c->alibi, c->softcap, c->bias,
                    c->lengths, err, mx);
    assert_true(mx == 0.0 ? err == 0.0 : err <= TOL * mx);
    for (size_t i = 0; i < nl; i++) {
        if (isinf(lr[i]))
            assert_true(isinf(lse[i]) && lse[i] < 0);
        else
            assert_true(fabs((double)lse[i] - lr[i]) <= TOL * (1.0 + fabs(lr[i])));
        assert_true(fabsf(lse[i] - lse_whole[i]) <= 1e-5f * (1.0f + fabsf(lse[i])) ||
                    lse[i] == lse_whole[i]);
    }
    for (size_t i = 0; i < (size_t)B * Q * no; i++)
        assert_true(fabsf(out[i] - whole[i]) <= 1e-5f * (1.0f + fabsf(whole[i])));
    free(q);
    free(k);
    free(v);
    free(bias);
    free(out);
    free(whole);
    free(lse);
    free(lse_whole);
    free(yr);
    free(lr);
    tu_layer_free(&t);
}

/* Every option alone and combined, with chunks of 16, 24 (not a multiple of the 16-float row
   alignment) and 100 keys, q_len below, equal to and above kv_len. */
static void test_options(void **state)
{
    (void)state;
    static const char *chunks[] = {"16", "24", "100"};
    static const int shapes[][2] = {{150, 200}, {200, 200}, {230, 170}};
    uint64_t seed = 1;
    for (int s = 0; s < 3; s++)
        for (int causal = 0; causal <= 3; causal++)
            for (int opt = 0; opt < 7; opt++) {
                kcase c = {4, 2, 0, causal, 0, 0, 0, 0, shapes[s][0], shapes[s][1], 0.0, 1.5f};
                switch (opt) {
                case 1:
                    c.window = 37;
                    break;
                case 2:
                    c.alibi = 1;
                    break;
                case 3:
                    c.softcap = 5.0;
                    break;
                case 4:
                    c.bias = 1;
                    break;
                case 5:
                    c.lengths = 1;
                    c.dv = 12;
                    break;
                case 6: /* everything at once, large scores */
                    c.window = 61;
                    c.alibi = 1;
                    c.softcap = 30.0;
                    c.bias = 1;
                    c.lengths = 1;
                    c.dv = 5;
                    c.q_amp = 6.0f;
                    break;
                default:
                    break;
                }
                if (causal == 3)
                    c.lengths = 1; /* alignment 3 is to each sequence's own length */
                kc_run(&c, chunks[(s + causal + opt) % 3], seed++);
            }
}

/* Scores of a few hundred whose maximum grows with the key (the output rows rescaled chunk after
   chunk), with and without a softcap, and one head per K/V head. */
static void test_growing_max(void **state)
{
    (void)state;
    for (int causal = 0; causal <= 1; causal++)
        for (int cap = 0; cap <= 1; cap++) {
            const kcase c = {2, 2, 0, causal, 0, 0, 0, 0, 120, 300, cap ? 50.0 : 0.0, 12.0f};
            kc_run(&c, "16", 77 + (uint64_t)(2 * causal + cap));
        }
}

/* With SELFATTN_KEY_CHUNK unset, blocks whose score block passes the automatic threshold
   (256 query rows x over 4096 keys) take chunks; the result matches the reference all the same. */
static void test_automatic(void **state)
{
    (void)state;
    const kcase c = {1, 1, 0, 0, 0, 0, 0, 0, 260, 4200, 0.0, 1.5f};
    kc_run(&c, NULL, 99);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_options),
        cmocka_unit_test(test_growing_max),
        cmocka_unit_test(test_automatic),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
