/* Every softmax kernel this CPU can run against a float64 softmax and against the scalar
 * reference kernel: row lengths 1..70 and large, unaligned starts, logits spanning +-80, extreme
 * and masked values, several scales; the masked tail must be zeroed and nothing past the row
 * touched.
 *
 * Measures, for p = row / sum (the normalised weights, computed here in double from the kernel's
 * float outputs) and p_ref = the float64 softmax of the scaled logits:
 *   normwise:    max |p - p_ref| / max p_ref            <= 2e-6
 *   elementwise: |p - p_ref| / p_ref, for p_ref >= 1e-6 max p_ref,  <= 2e-6
 * The elementwise bound is restricted because an exp argument t = x * scale - max of magnitude
 * |t| carries a float32 rounding error of up to |t| * 2^-24, i.e. a relative error of up to
 * |t| * 6e-8 in e^t: below 1e-6 of the maximum (|t| > 13.8) that alone may exceed 1e-6. */
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

#include "internal.h"
#include "kernels/exp-constants.h"
#include "testutil.h"

#define REL_TOL 2e-6
#define GUARD 8
#define SENTINEL 777.0f

typedef struct kstats {
    double norm_err, elem_err;
} kstats;

/* Runs kernel k on a copy of x[0..n_total) placed `offset` floats into a guarded buffer, checks
   tail and guards, and folds its error against float64 into st. Returns the normalised output
   (malloc'd) for cross-kernel comparison. */
static double *run_one(const sa_kernels *k, const float *x, size_t n_valid, size_t n_total,
                       float scale, size_t offset, kstats *st)
{
    float *buf = malloc(sizeof(float) * (n_total + offset + 2 * GUARD));
    for (size_t i = 0; i < n_total + offset + 2 * GUARD; i++)
        buf[i] = SENTINEL;
    float *row = buf + GUARD + offset;
    memcpy(row, x, sizeof(float) * n_total);
    float m_out = NAN;
    const float sum = k->softmax_exp(row, n_valid, n_total, scale, &m_out);

    for (size_t i = 0; i < GUARD + offset; i++)
        assert_true(buf[i] == SENTINEL);
    for (size_t i = 0; i < GUARD; i++)
        assert_true(row[n_total + i] == SENTINEL);
    for (size_t i = n_valid; i < n_total; i++)
        assert_true(row[i] == 0.0f);

    /* float64 reference */
    double mx = -INFINITY, ref_sum = 0.0;
    double *ref = malloc(sizeof(double) * n_valid), *p = malloc(sizeof(double) * n_valid);
    for (size_t i = 0; i < n_valid; i++)
        mx = fmax(mx, (double)x[i] * scale);
    /* the reported max is the largest scaled score, to float rounding (the log-sum-exp of a row
       is built from it) */
    assert_true(fabs((double)m_out - mx) <= 1e-6 * fabs(mx) + 1e-37);
    for (size_t i = 0; i < n_valid; i++)
        ref_sum += (ref[i] = exp((double)x[i] * scale - mx));
    double ref_max = 0.0;
    for (size_t i = 0; i < n_valid; i++) {
        ref[i] /= ref_sum;
        ref_max = fmax(ref_max, ref[i]);
        p[i] = (double)row[i] / (double)sum;
    }
    double s_check = 0.0;
    for (size_t i = 0; i < n_valid; i++)
        s_check += row[i];
    /* the returned sum is the sum of what was written */
    assert_true(fabs(s_check - sum) <= 1e-5 * s_check);
    for (size_t i = 0; i < n_valid; i++) {
        const double e = fabs(p[i] - ref[i]);
        st->norm_err = fmax(st->norm_err, e / ref_max);
        if (ref[i] >= 1e-6 * ref_max)
            st->elem_err = fmax(st->elem_err, e / ref[i]);
    }
    free(ref);
    free(buf);
    return p;
}

static void make_row(tu_rng *r, int kind, float *x, size_t n)
{
    switch (kind) {
    case 0: /* logits spanning +-80 */
        tu_fill(r, x, n, -80.0f, 80.0f);
        break;
    case 1: /* ordinary scores */
        tu_fill(r, x, n, -4.0f, 4.0f);
        break;
    case 2: /* all equal */
        for (size_t i = 0; i < n; i++)
            x[i] = 3.25f;
        break;
    case 3: /* one dominant value among very negative ones */
        for (size_t i = 0; i < n; i++)
            x[i] = -1e30f;
        x[(n * 7) / 11] = 1e30f;
        break;
    case 4: /* large magnitudes close together */
        tu_fill(r, x, n, 1e6f, 1e6f + 40.0f);
        break;
    default: /* scores near 1e29 (finite): the max is far above exp's range */
        tu_fill(r, x, n, -1e29f, 1e29f);
        break;
    }
}

static void check_kernel(const sa_kernels *k, const sa_kernels *ref_k)
{
    static const size_t big[] = {127, 128, 1000, 4097, 100003};
    static const float scales[] = {1.0f, 0.125f, -0.5f, 0.0883883476f, 1.7f};
    kstats st = {0, 0}, vs_scalar = {0, 0};
    tu_rng r = {12345};
    float *x = malloc(sizeof(float) * 100003);
    for (size_t li = 0; li < 70 + sizeof big / sizeof big[0]; li++) {
        const size_t n_total = li < 70 ? li + 1 : big[li - 70];
        for (int kind = 0; kind < 6; kind++)
            for (size_t si = 0; si < 5; si++) {
                const float scale = kind == 3 ? 1.0f : scales[si];
                make_row(&r, kind, x, n_total);
                /* every few rows leave a masked tail */
                const size_t n_valid = (li + si) % 3 == 0 && n_total > 1
                                           ? n_total - 1 - (li % (n_total - 1))
                                           : n_total;
                const size_t offset = (li + kind + si) % 4;
                double *p = run_one(k, x, n_valid, n_total, scale, offset, &st);
                kstats dummy = {0, 0};
                double *q = run_one(ref_k, x, n_valid, n_total, scale, 0, &dummy);
                for (size_t i = 0; i < n_valid; i++)
                    vs_scalar.norm_err = fmax(vs_scalar.norm_err, fabs(p[i] - q[i]));
                free(p);
                free(q);
            }
    }
    printf("  %-24s vs float64: normwise %.3e, elementwise %.3e; vs scalar: %.3e\n",
           k->softmax_name, st.norm_err, st.elem_err, vs_scalar.norm_err);
    assert_true(st.norm_err <= REL_TOL);
    assert_true(st.elem_err <= REL_TOL);
    assert_true(vs_scalar.norm_err <= REL_TOL);
    free(x);
}

static void test_isa(void **state)
{
    const sa_isa isa = (sa_isa)(intptr_t)*state;
    const sa_kernels *k = sa_kernels_for_isa(isa);
    if (k == NULL) {
        printf("  ISA %d not supported by this CPU or build: skipped\n", (int)isa);
        skip();
    }
    check_kernel(k, sa_kernels_for_isa(SA_ISA_SCALAR));
}

/* softmax_exp_above, the chunks of a long row: with a bound below the row's own maximum (or
   -inf) the same bits as softmax_exp; with a bound above it, m = the bound and row[i] =
   exp(x[i] scale - m) against float64 with that m (relative 1e-5 on the sum, 2e-6 normwise on
   the normalised row), the tail zeroed; on the exact-max path (|m| >= SA_EXP_EXACT_MAX_FROM,
   kind 4 at scale 1.7) too. */
static void test_above(void **state)
{
    const sa_isa isa = (sa_isa)(intptr_t)*state;
    const sa_kernels *k = sa_kernels_for_isa(isa);
    if (k == NULL)
        skip();
    static const size_t ns[] = {1, 2, 7, 8, 9, 16, 31, 33, 64, 65, 127, 1000, 4097};
    static const float scales[] = {1.0f, 0.125f, -0.5f, 1.7f};
    tu_rng r = {4242};
    float *x = malloc(sizeof(float) * 4097), *a = malloc(sizeof(float) * 4097),
          *b = malloc(sizeof(float) * 4097);
    double worst_sum = 0.0, worst_norm = 0.0;
    for (size_t in = 0; in < sizeof ns / sizeof ns[0]; in++)
        for (int kind = 0; kind < 6; kind++)
            for (size_t si = 0; si < 4; si++) {
                const size_t n_total = ns[in], n_valid = n_total > 2 ? n_total - in % 3 : n_total;
                const float scale = kind == 3 ? 1.0f : scales[si];
                make_row(&r, kind, x, n_total);
                float own;
                memcpy(a, x, n_total * sizeof(float));
                const float plain = k->softmax_exp(a, n_valid, n_total, scale, &own);
                /* a bound at or below the row's own maximum: the same bits */
                const float below[] = {-INFINITY, own - fabsf(own) * 0.5f - 3.0f};
                for (size_t bi = 0; bi < 2; bi++) {
                    float m;
                    memcpy(b, x, n_total * sizeof(float));
                    const float sum =
                        k->softmax_exp_above(b, n_valid, n_total, scale, below[bi], &m);
                    assert_true(m == own);
                    assert_true(memcmp(&sum, &plain, sizeof sum) == 0);
                    assert_memory_equal(a, b, n_total * sizeof(float));
                }
                if (kind == 3 || kind == 5)
                    continue; /* huge scores: a bound above them leaves only zeros, below */
                for (int up = 1; up <= 2; up++) {
                    const float bound =
                        own + (up == 1 ? 0.75f : 9.0f) * (1.0f + fabsf(own) * 1e-6f);
                    float m;
                    memcpy(b, x, n_total * sizeof(float));
                    const float sum = k->softmax_exp_above(b, n_valid, n_total, scale, bound, &m);
                    assert_true(m == bound);
                    for (size_t i = n_valid; i < n_total; i++)
                        assert_true(b[i] == 0.0f);
                    double ref_sum = 0.0, ref_max = 0.0, s_check = 0.0;
                    for (size_t i = 0; i < n_valid; i++) {
                        const double e = exp((double)x[i] * scale - (double)m);
                        ref_sum += e;
                        ref_max = fmax(ref_max, e);
                        s_check += b[i];
                        assert_true(b[i] <= 1.0f);
                    }
                    assert_true(fabs(s_check - sum) <= 1e-5 * s_check);
                    worst_sum = fmax(worst_sum, fabs(sum - ref_sum) / ref_sum);
                    for (size_t i = 0; i < n_valid; i++) {
                        const double e = exp((double)x[i] * scale - (double)m);
                        worst_norm = fmax(worst_norm, fabs((double)b[i] / sum - e / ref_sum) /
                                                          (ref_max / ref_sum));
                    }
                }
            }
    printf("  %-24s above a bound: sum %.3e relative, normwise %.3e\n", k->softmax_name, worst_sum,
           worst_norm);
    assert_true(worst_sum <= 1e-5);
    assert_true(worst_norm <= REL_TOL);
    free(x);
    free(a);
    free(b);
}

static int setup_scalar(void **s)
{
    *s = (void *)(intptr_t)SA_ISA_SCALAR;
    return 0;
}
static int setup_avx2(void **s)
{
    *s = (void *)(intptr_t)SA_ISA_AVX2;
    return 0;
}
static int setup_avx512(void **s)
{
    *s = (void *)(intptr_t)SA_ISA_AVX512;
    return 0;
}

/* The decoding and backward row kernels of one ISA against float64: small-M products
   (qkt, pv) for 1..8 rows, lengths around the vector widths, strided rows; the softmax
   backward's dot, dscores and expsub; the scores' softcap. Bounds: a float32 sum of n products errs
   by at most about n * 2^-24 * sum |terms| (Higham, sec. 3.1), so 1e-5 * sum |terms| holds for n <=
   ~160 and typical sums far beyond; the exp is the softmax kernels' (2e-6 relative). */
static void test_row_kernels(void **state)
{
    const sa_isa isa = (sa_isa)(intptr_t)*state;
    const sa_kernels *k = sa_kernels_for_isa(isa);
    if (k == NULL)
        skip();
    tu_rng r = {99 + (uint64_t)isa};
    static const size_t ns[] = {1, 3, 7, 8, 9, 15, 16, 17, 33, 64, 100, 128, 257};
    for (size_t m = 1; m <= SA_ROWS_MAX; m++)
        for (size_t in = 0; in < sizeof ns / sizeof ns[0]; in += 2)
            for (size_t id = 0; id < sizeof ns / sizeof ns[0]; id++) {
                const size_t n = ns[in], d = ns[id], ldq = d + 3, ldk = d + 5, lds = n + 2;
                float *q = tu_random(&r, m * ldq, -1, 1), *kk = tu_random(&r, n * ldk, -1, 1);
                float *sc = tu_random(&r, m * lds, -1, 1), *o = tu_random(&r, m * ldq, -1, 1);
                k->qkt(m, n, d, q, ldq, kk, ldk, sc, lds);
                k->pv(m, n, d, sc, lds, kk, ldk, o, ldq);
                for (size_t i = 0; i < m; i++) {
                    for (size_t j = 0; j < n; j++) {
                        double want = 0, mag = 0;
                        for (size_t c = 0; c < d; c++) {
                            want += (double)q[i * ldq + c] * kk[j * ldk + c];
                            mag += fabs((double)q[i * ldq + c] * kk[j * ldk + c]);
                        }
                        assert_true(fabs(sc[i * lds + j] - want) <= 1e-5 * mag + 1e-30);
                    }
                    for (size_t c = 0; c < d; c++) {
                        double want = 0, mag = 0;
                        for (size_t j = 0; j < n; j++) {
                            want += (double)sc[i * lds + j] * kk[j * ldk + c];
                            mag += fabs((double)sc[i * lds + j] * kk[j * ldk + c]);
                        }
                        assert_true(fabs(o[i * ldq + c] - want) <= 1e-5 * mag + 1e-30);
                    }
                }
                free(q);
                free(kk);
                free(sc);
                free(o);
            }
    for (size_t in = 0; in < sizeof ns / sizeof ns[0]; in++) {
        const size_t n = ns[in];
        float *a = tu_random(&r, n, -1, 1), *b = tu_random(&r, n, -1, 1);
        float *dp = tu_random(&r, n, -1, 1), *dc = tu_random(&r, n, 0, 1), *dp0 = malloc(n * 4);
        memcpy(dp0, dp, n * sizeof(float));
        double want = 0, mag = 0;
        for (size_t j = 0; j < n; j++) {
            want += (double)a[j] * b[j];
            mag += fabs((double)a[j] * b[j]);
        }
        assert_true(fabs(k->dot(a, b, n) - want) <= 1e-5 * mag);
        for (int with_dc = 0; with_dc <= 1; with_dc++) {
            memcpy(dp, dp0, n * sizeof(float));
            k->dscores(a, dp, with_dc ? dc : NULL, n, 0.25f, 0.125f);
            for (size_t j = 0; j < n; j++) {
                const double w = (double)a[j] * (dp0[j] - 0.25) * 0.125 * (with_dc ? dc[j] : 1.0);
                assert_true(fabs(dp[j] - w) <= 1e-6 * (fabs(w) + 1e-3));
            }
        }
        /* expsub: e^(x scale - sub) for sub at or above every x scale */
        const float scale = 0.3f, sub = 0.5f;
        memcpy(dp, a, n * sizeof(float));
        k->expsub(dp, n, scale, sub);
        for (size_t j = 0; j < n; j++) {
            const double w = exp((double)a[j] * scale - sub);
            assert_true(fabs(dp[j] - w) <= 2e-6 * w);
        }
        /* softcap: cap tanh(x scale / cap), x over +-20 (beyond the cap and near 0) */
        for (size_t j = 0; j < n; j++)
            dp[j] = a[j] * (j % 3 == 0 ? 20.0f : j % 3 == 1 ? 1.0f : 1e-3f);
        memcpy(dp0, dp, n * sizeof(float));
        k->softcap(dp, n, 0.7f, 5.0f);
        for (size_t j = 0; j < n; j++) {
            /* the exp's 1.3e-7, times at most 1.9 (f32-dsoftmax-avx2.c), plus float rounding */
            const double w = 5.0 * tanh((double)dp0[j] * 0.7 / 5.0);
            assert_true(fabs(dp[j] - w) <= 5e-7 * fabs(w) + 1e-12);
        }
        free(a);
        free(b);
        free(dp);
        free(dc);
        free(dp0);
    }
}

/* The chosen kernel is the best one the CPU supports unless SELFATTN_ISA lowers it. */
static void test_dispatch(void **state)
{
    (void)state;
    const sa_kernels *chosen = sa_kernels_get();
    assert_non_null(chosen);
    assert_string_equal(selfattn_kernel_name(), chosen->softmax_name);
    const char *env = getenv("SELFATTN_ISA");
    if (env == NULL) {
        for (int isa = SA_ISA_AVX512; isa > (int)chosen->isa; isa--)
            assert_null(sa_kernels_for_isa((sa_isa)isa));
    } else if (strcmp(env, "scalar") == 0) {
        assert_int_equal(chosen->isa, SA_ISA_SCALAR);
    }
    printf("  in use: %s\n", selfattn_kernel_name());
}

/* 16-bit storage kernels of one ISA: conversions against the test's own rounding (computed in
   double from the formats' widths) on special values, ties, subnormals and random bit patterns,
   and bit for bit against the scalar reference (NaN included); the small-M products over
   16-bit K and V against float64 on the widened values. */
static uint32_t bits_of(float f)
{
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    return x;
}

static float float_of(uint32_t x)
{
    float f;
    memcpy(&f, &x, sizeof f);
    return f;
}

static void test_x16_kernels(void **state)
{
    const sa_isa isa = (sa_isa)(intptr_t)*state;
    const sa_kernels *k = sa_kernels_for_isa(isa), *ref = sa_kernels_for_isa(SA_ISA_SCALAR);
    if (k == NULL)
        skip();
    enum { N = 4099 };
    float *src = malloc(N * sizeof(float)), *back = malloc(N * sizeof(float));
    float *back_ref = malloc(N * sizeof(float));
    uint16_t *h = malloc(N * sizeof(uint16_t)), *h_ref = malloc(N * sizeof(uint16_t));
    const float special[] = {0.0f, -0.0f, 1.0f, -1.0f, 65504.0f, 65519.99f, 65520.0f, -65520.0f,
                             1e5f, 5.9604645e-8f /* 2^-24 */, 2.9802322e-8f /* 2^-25: tie */,
                             8.940697e-8f /* 3 2^-25: tie to 2^-23 */, 6.1035156e-5f /* 2^-14 */,
                             1.0f + 4.8828125e-4f /* 1 + 2^-11: f16 tie */,
                             1.0f + 3.0f * 4.8828125e-4f, 1.0f + 3.90625e-3f /* 1 + 2^-8 */,
                             1.0f + 3.0f * 3.90625e-3f, FLT_MAX, -FLT_MAX, 1e-40f, -1e-45f,
                             INFINITY, -INFINITY, NAN, float_of(0x7F7F8000u), float_of(0x7F7F7FFFu),
                             float_of(0x7F800001u) /* signalling NaN */, float_of(0xFFC12345u)};
    const size_t n_special = sizeof special / sizeof special[0];
    tu_rng r = {5 + (uint64_t)isa};
    for (size_t i = 0; i < N; i++) {
        if (i < n_special)
            src[i] = special[i];
        else if (i % 2) /* any bit pattern */
            src[i] = float_of((uint32_t)(tu_uniform(&r) * 4294967296.0));
        else /* the range weights and activations live in */
            src[i] = (float)((tu_uniform(&r) - 0.5) * ldexp(1.0, (int)(tu_uniform(&r) * 40) - 20));
    }
    for (int t = 0; t < 2; t++) { /* 0: f16, 1: bf16 */
        k->from_f32[t](src, h, N);
        ref->from_f32[t](src, h_ref, N);
        k->to_f32[t](h, back, N);
        ref->to_f32[t](h, back_ref, N);
        for (size_t i = 0; i < N; i++) {
            assert_int_equal(h[i], h_ref[i]);
            assert_int_equal(bits_of(back[i]), bits_of(back_ref[i]));
            const float want = t == 0 ? tu_round_f16(src[i]) : tu_round_bf16(src[i]);
            if (isnan(want))
                assert_true(isnan(back[i]));
            else if (bits_of(back[i]) != bits_of(want)) {
                print_error("%s of %a (bits %08x): %a, want %a\n", t ? "bf16" : "f16",
                            (double)src[i], bits_of(src[i]), (double)back[i], (double)want);
                fail();
            }
        }
    }
    free(src);
    free(back);
    free(back_ref);
    free(h);
    free(h_ref);

    /* products over 16-bit K and V: 1..8 rows, lengths around the vector widths */
    static const size_t ns[] = {1, 7, 8, 9, 16, 17, 64, 100, 257};
    for (int t = 0; t < 2; t++)
        for (size_t m = 1; m <= SA_ROWS_MAX; m++)
            for (size_t in = 0; in < sizeof ns / sizeof ns[0]; in++) {
                const size_t n = ns[in], d = ns[(in * 3 + m) % 9], ldq = d + 3, ldk = d + 5;
                const size_t lds = n + 2;
                float *q = tu_random(&r, m * ldq, -1, 1), *kf = tu_random(&r, n * ldk, -2, 2);
                float *sc = tu_random(&r, m * lds, -1, 1), *o = tu_random(&r, m * ldq, -1, 1);
                uint16_t *kh = malloc(n * ldk * sizeof(uint16_t));
                ref->from_f32[t](kf, kh, n * ldk);
                ref->to_f32[t](kh, kf, n * ldk); /* kf: the widened stored values */
                k->qkt_x16[t](m, n, d, q, ldq, kh, ldk, sc, lds);
                k->pv_x16[t](m, n, d, sc, lds, kh, ldk, o, ldq);
                for (size_t i = 0; i < m; i++) {
                    for (size_t j = 0; j < n; j++) {
                        double want = 0, mag = 0;
                        for (size_t c = 0; c < d; c++) {
                            want += (double)q[i * ldq + c] * kf[j * ldk + c];
                            mag += fabs((double)q[i * ldq + c] * kf[j * ldk + c]);
                        }
                        assert_true(fabs(sc[i * lds + j] - want) <= 1e-5 * mag + 1e-30);
                    }
                    for (size_t c = 0; c < d; c++) {
                        double want = 0, mag = 0;
                        for (size_t j = 0; j < n; j++) {
                            want += (double)sc[i * lds + j] * kf[j * ldk + c];
                            mag += fabs((double)sc[i * lds + j] * kf[j * ldk + c]);
                        }
                        assert_true(fabs(o[i * ldq + c] - want) <= 1e-5 * mag + 1e-30);
                    }
                }
                free(q);
                free(kf);
                free(sc);
                free(o);
                free(kh);
            }
}

/* The small-M QK^T at the shape of a projection (a weight matrix of many rows, thousands of
   dimensions wide): several chunks of dimensions (each row of q in L1), several blocks of keys
   with the next block prefetched, and the tails of both, for 1..8 rows and each storage type.
   Bound: each dot product is a float32 sum of about d / 8 products in a lane plus the reduction
   of lanes and chunks, so n' 2^-24 sum |terms| with n' about 600 gives 4e-5 (Higham, sec. 3.1). */
static void test_wide_qkt(void **state)
{
    const sa_isa isa = (sa_isa)(intptr_t)*state;
    const sa_kernels *k = sa_kernels_for_isa(isa), *ref = sa_kernels_for_isa(SA_ISA_SCALAR);
    if (k == NULL)
        skip();
    tu_rng r = {4242 + (uint64_t)isa};
    const size_t n = 53, d = 4133, ldq = d + 3, ldk = d + 5, lds = n + 2;
    float *kf = tu_random(&r, n * ldk, -1, 1), *kw = malloc(n * ldk * sizeof(float));
    uint16_t *kh = malloc(n * ldk * sizeof(uint16_t));
    for (int t = -1; t < 2; t++) {
        if (t >= 0) { /* the stored values, and their widening for the reference */
            ref->from_f32[t](kf, kh, n * ldk);
            ref->to_f32[t](kh, kw, n * ldk);
        } else {
            memcpy(kw, kf, n * ldk * sizeof(float));
        }
        for (size_t m = 1; m <= SA_ROWS_MAX; m++) {
            float *q = tu_random(&r, m * ldq, -1, 1), *sc = tu_random(&r, m * lds, -1, 1);
            if (t >= 0)
                k->qkt_x16[t](m, n, d, q, ldq, kh, ldk, sc, lds);
            else
                k->qkt(m, n, d, q, ldq, kf, ldk, sc, lds);
            for (size_t i = 0; i < m; i++)
                for (size_t j = 0; j < n; j++) {
                    double want = 0, mag = 0;
                    for (size_t c = 0; c < d; c++) {
                        want += (double)q[i * ldq + c] * kw[j * ldk + c];
                        mag += fabs((double)q[i * ldq + c] * kw[j * ldk + c]);
                    }
                    assert_true(fabs(sc[i * lds + j] - want) <= 4e-5 * mag);
                }
            free(q);
            free(sc);
        }
    }
    free(kf);
    free(kw);
    free(kh);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_isa, setup_scalar),
        cmocka_unit_test_setup(test_isa, setup_avx2),
        cmocka_unit_test_setup(test_isa, setup_avx512),
        cmocka_unit_test_setup(test_above, setup_scalar),
        cmocka_unit_test_setup(test_above, setup_avx2),
        cmocka_unit_test_setup(test_above, setup_avx512),
        cmocka_unit_test_setup(test_row_kernels, setup_scalar),
        cmocka_unit_test_setup(test_row_kernels, setup_avx2),
        cmocka_unit_test_setup(test_row_kernels, setup_avx512),
        cmocka_unit_test_setup(test_x16_kernels, setup_scalar),
        cmocka_unit_test_setup(test_x16_kernels, setup_avx2),
        cmocka_unit_test_setup(test_x16_kernels, setup_avx512),
        cmocka_unit_test_setup(test_wide_qkt, setup_scalar),
        cmocka_unit_test_setup(test_wide_qkt, setup_avx2),
        cmocka_unit_test_setup(test_wide_qkt, setup_avx512),
        cmocka_unit_test(test_dispatch),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
