/* selfattn-run: one self-attention forward pass with seeded random weights, checked against a
 * float64 reference on a sample of rows, timed beside the sgemm ceiling: the fastest formulation
 * of the same FLOPs as bare BLAS calls (bench/ceiling.c, chosen by a short calibration), and beside
 * the cores' measured FMA peak (bench/fmapeak.c), which does not depend on the BLAS. It names the
 * BLAS in use and prints a WARNING with the fix when OpenBLAS runs kernels below the CPU's
 * instruction set. It sets OpenBLAS to one thread for itself (the library leaves the count to the
 * program), so that the library's own workers run the call.
 *
 *   selfattn-run [--batch N] [--seq N] [--d-model N] [--heads N] [--kv-heads N] [--causal]
 *                [--threads N] [--repeat N] [--check-rows N] [--seed N] [--help]
 *
 * Defaults: a BERT-base-sized layer (d_model 768, 12 heads) over 512 tokens, batch 1. */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include <selfattn/selfattn.h>

#include "args.h"

#include "ceiling.h"
#include "fmapeak.h"
#include "reference.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t rng_state;
static float rnd(float a) /* uniform in [-a, a) */
{
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return a * (float)((double)(rng_state >> 11) * (2.0 / 9007199254740992.0) - 1.0);
}

static float *rnd_array(size_t n, float a)
{
    float *p = malloc((n ? n : 1) * sizeof *p);
    if (!p) {
        fprintf(stderr, "selfattn-run: out of memory\n");
        exit(2);
    }
    for (size_t i = 0; i < n; i++)
        p[i] = rnd(a);
    return p;
}

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static const char usage_text[] =
    "usage: selfattn-run [--batch N] [--seq N] [--d-model N] [--heads N] [--kv-heads N]\n"
    "                    [--causal] [--threads N] [--repeat N] [--check-rows N] [--seed N]\n"
    "                    [--help]\n";

#define CHECK(call)                                                                                \
    do {                                                                                           \
        selfattn_status st_ = (call);                                                              \
        if (st_ != SELFATTN_OK) {                                                                  \
            fprintf(stderr, "selfattn-run: %s: %s (%s)\n", #call, selfattn_status_string(st_),     \
                    selfattn_last_error());                                                        \
            return 2;                                                                              \
        }                                                                                          \
    } while (0)

int main(int argc, char **argv)
{
    ex_prog = "selfattn-run";
    ex_usage_text = usage_text;
    int batch = 1, seq = 512, dm = 768, heads = 12, kv_heads = 0, causal = 0, threads = 0;
    int repeat = 7, check_rows = 8;
    unsigned long long seed = 42;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0)
            ex_usage(stdout, 0);
        else if (strcmp(a, "--causal") == 0)
            causal = 1;
        else if (strcmp(a, "--batch") == 0)
            batch = (int)ex_int_arg(argc, argv, &i, 1, INT_MAX);
        else if (strcmp(a, "--seq") == 0)
            seq = (int)ex_int_arg(argc, argv, &i, 1, INT_MAX);
        else if (strcmp(a, "--d-model") == 0)
            dm = (int)ex_int_arg(argc, argv, &i, 1, INT_MAX);
        else if (strcmp(a, "--heads") == 0)
            heads = (int)ex_int_arg(argc, argv, &i, 1, INT_MAX);
        else if (strcmp(a, "--kv-heads") == 0) /* 0: as many as --heads */
            kv_heads = (int)ex_int_arg(argc, argv, &i, 0, INT_MAX);
        else if (strcmp(a, "--threads") == 0) /* 0: the library's default */
            threads = (int)ex_int_arg(argc, argv, &i, 0, INT_MAX);
        else if (strcmp(a, "--repeat") == 0)
            repeat = (int)ex_int_arg(argc, argv, &i, 1, INT_MAX);
        else if (strcmp(a, "--check-rows") == 0)
            check_rows = (int)ex_int_arg(argc, argv, &i, 0, INT_MAX);
        else if (strcmp(a, "--seed") == 0)
            seed = (unsigned long long)ex_int_arg(argc, argv, &i, 0, LONG_MAX);
        else
            ex_bad_usage("unknown option '%s'", a);
    }
    if (dm % heads != 0)
        ex_bad_usage("--heads %d does not divide --d-model %d", heads, dm);
    if (kv_heads > 0 && heads % kv_heads != 0)
        ex_bad_usage("--kv-heads %d does not divide --heads %d", kv_heads, heads);
    rng_state = seed;

    const char *blas_threads = ex_blas_one_thread();

    selfattn_layer *layer;
    CHECK(selfattn_layer_create(dm, heads, &layer));
    CHECK(selfattn_layer_set(layer, SELFATTN_OPT_N_KV_HEADS, kv_heads));
    CHECK(selfattn_layer_set(layer, SELFATTN_OPT_CAUSAL, causal));
    CHECK(selfattn_layer_set(layer, SELFATTN_OPT_THREADS, threads));
    int64_t v;
    CHECK(selfattn_layer_get(layer, SELFATTN_OPT_N_KV_HEADS, &v));
    kv_heads = (int)v;
    CHECK(selfattn_layer_get(layer, SELFATTN_OPT_THREADS, &v));
    threads = (int)v;
    const int hd = dm / heads;
    const size_t nq = (size_t)heads * hd, nkv = (size_t)kv_heads * hd;

    /* PyTorch's nn.Linear initialisation range, U(-1/sqrt(in), 1/sqrt(in)) */
    const float a = 1.0f / sqrtf((float)dm);
    float *wq = rnd_array(nq * dm, a), *wk = rnd_array(nkv * dm, a), *wv = rnd_array(nkv * dm, a);
    float *wo = rnd_array((size_t)dm * nq, 1.0f / sqrtf((float)nq));
    float *bq = rnd_array(nq, a), *bk = rnd_array(nkv, a), *bv = rnd_array(nkv, a);
    float *bo = rnd_array((size_t)dm, a);
    CHECK(selfattn_layer_set_weight(layer, SELFATTN_W_Q, wq, (int64_t)(nq * dm)));
    CHECK(selfattn_layer_set_weight(layer, SELFATTN_W_K, wk, (int64_t)(nkv * dm)));
    CHECK(selfattn_layer_set_weight(layer, SELFATTN_W_V, wv, (int64_t)(nkv * dm)));
    CHECK(selfattn_layer_set_weight(layer, SELFATTN_W_O, wo, (int64_t)(dm * nq)));
    CHECK(selfattn_layer_set_weight(layer, SELFATTN_B_Q, bq, (int64_t)nq));
    CHECK(selfattn_layer_set_weight(layer, SELFATTN_B_K, bk, (int64_t)nkv));
    CHECK(selfattn_layer_set_weight(layer, SELFATTN_B_V, bv, (int64_t)nkv));
    CHECK(selfattn_layer_set_weight(layer, SELFATTN_B_O, bo, (int64_t)dm));

    const size_t n = (size_t)batch * seq * dm;
    float *x = rnd_array(n, 1.0f), *y = malloc(n * sizeof *y);
    if (!y)
        return 2;

    /* Then `repeat` rounds of forward and ceiling alternating (which goes first
       alternates too), so that load from elsewhere on a shared machine hits both alike;
       medians of each. */
    CHECK(selfattn_forward(layer, batch, seq, x, NULL, y));
    struct rusage ru; /* peak memory of the program up to here: the library's included */
    getrusage(RUSAGE_SELF, &ru);
    const double peak_mib = (double)ru.ru_maxrss / 1024.0;

    /* The sgemm ceiling: the same FLOPs as the fastest bare-BLAS formulation found by a short
       calibration here (its own layout, blocks and persistent threads, as many as the forward
       may use), independent of how the library does it. */
    const ce_shape shape = {batch, seq, dm, heads, kv_heads, hd, causal, threads};
    const double flops = ce_forward_flops(&shape);
    ce_ctx *ce = ce_create(&shape);
    if (ce)
        ce_run(ce);
    /* The cores' FMA peak, on as many threads as the forward may use. */
    const char *fma_isa = "?";
    const double fma_per_thread = fp_peak_gflops_per_thread(threads, 0.0, &fma_isa);
    const double fma_peak = fma_per_thread * threads;
    double *t = malloc(sizeof(double) * (size_t)repeat),
           *tc = malloc(sizeof(double) * (size_t)repeat);
    for (int r = 0; r < repeat; r++) {
        for (int k = 0; k < 2; k++) {
            const double t0 = now_s();
            if ((k == 0) == (r % 2 == 0)) {
                CHECK(selfattn_forward(layer, batch, seq, x, NULL, y));
                t[r] = now_s() - t0;
            } else {
                if (ce)
                    ce_run(ce);
                tc[r] = now_s() - t0;
            }
        }
    }
    qsort(t, (size_t)repeat, sizeof *t, cmp_double);
    qsort(tc, (size_t)repeat, sizeof *tc, cmp_double);
    const double t_fwd = t[repeat / 2], t_gemm = ce ? tc[repeat / 2] : NAN;
    char formulation[160];
    snprintf(formulation, sizeof formulation, "%s", ce ? ce_formulation(ce) : "(not available)");
    ce_destroy(ce);

    /* Self-check: sampled rows against the float64 reference. */
    ref_layer rl = {dm, heads, kv_heads, hd, causal, 1, 1.0 / sqrt((double)hd), wq, wk,
                    wv, wo,    bq,       bk, bv,     bo, 0};
    double err = 0.0, ymax = 0.0;
    double *yr = malloc(sizeof(double) * (size_t)dm);
    for (int c = 0; c < check_rows; c++) {
        const int b = (int)(((unsigned)c * 7919u) % (unsigned)batch);
        const int i = c == 0   ? 0
                      : c == 1 ? seq - 1
                               : (int)(((unsigned)c * 104729u) % (unsigned)seq);
        ref_forward_row(&rl, seq, x + (size_t)b * seq * dm, seq, i, yr);
        for (int j = 0; j < dm; j++) {
            const double d = fabs((double)y[((size_t)b * seq + i) * dm + j] - yr[j]);
            err = d > err || d != d ? d : err;
            ymax = fabs(yr[j]) > ymax ? fabs(yr[j]) : ymax;
        }
    }
    const int ok = check_rows == 0 || err <= 1e-4 * ymax;

    printf("libselfattn %s, softmax kernel %s, %d thread%s\n", selfattn_version_string(),
           selfattn_kernel_name(), threads, threads == 1 ? "" : "s");
    printf("blas:          %s (%s)\n", selfattn_blas_info(), blas_threads);
    if (selfattn_blas_mismatch())
        printf("WARNING: %s. Until then the forward and the sgemm ceiling below both run slow "
               "kernels; compare with the FMA peak.\n",
               selfattn_blas_advice());
    printf("shape: batch %d, seq_len %d, d_model %d, heads %d (kv %d, head_dim %d), %s\n", batch,
           seq, dm, heads, kv_heads, hd, causal ? "causal" : "not causal");
    printf("forward:       %9.3f ms  %7.1f GFLOP/s  (%.3f GFLOP needed)\n", t_fwd * 1e3,
           flops / t_fwd * 1e-9, flops * 1e-9);
    printf("sgemm ceiling: %9.3f ms  %7.1f GFLOP/s  -> forward at %.1f%% of the ceiling\n",
           t_gemm * 1e3, flops / t_gemm * 1e-9, 100.0 * t_gemm / t_fwd);
    printf("ceiling:       %s\n", formulation);
    printf("FMA peak:      %9.1f GFLOP/s per thread (%s) x %d = %.1f GFLOP/s  -> forward at "
           "%.1f%% of the peak, sgemm ceiling at %.1f%%\n",
           fma_per_thread, fma_isa, threads, fma_peak, 100.0 * flops / t_fwd * 1e-9 / fma_peak,
           100.0 * flops / t_gemm * 1e-9 / fma_peak);
    printf("peak memory:   %9.1f MiB resident (the program after one forward pass)\n", peak_mib);
    printf("y[0][0][0..3]: %.6f %.6f %.6f %.6f\n", y[0], y[dm > 1], y[dm > 2 ? 2 : 0],
           y[dm > 3 ? 3 : 0]);
    if (check_rows > 0)
        printf("check:         %d rows vs float64 reference: max err %.3e (max |y| %.3e): %s\n",
               check_rows, err, ymax, ok ? "PASS" : "FAIL");

    free(t);
    free(tc);
    free(yr);
    free(x);
    free(y);
    free(wq);
    free(wk);
    free(wv);
    free(wo);
    free(bq);
    free(bk);
    free(bv);
    free(bo);
    selfattn_layer_destroy(layer);
    return ok ? 0 : 1;
}
