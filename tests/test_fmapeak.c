/* The FMA peak of bench/fmapeak.c, the ceiling selfattn-run and the benchmarks set beside the
   sgemm ceiling: positive, and not beaten by a measured sgemm (one thread, 512 x 512 x 512, warm,
   the median of several) by more than noise (15%). */
#define _GNU_SOURCE /* RTLD_DEFAULT */
#include <dlfcn.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <setjmp.h>

#include <cmocka.h>

#include <cblas.h>

#include "fmapeak.h"

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void test_peak_bounds_sgemm(void **state)
{
    (void)state;
    /* OpenBLAS at one thread (any other BLAS: as the environment has it) */
    void *set = dlsym(RTLD_DEFAULT, "openblas_set_num_threads");
    if (set != NULL) {
        void (*set_threads)(int);
        memcpy(&set_threads, &set, sizeof set);
        set_threads(1);
    }
    const char *isa = NULL;
    const double peak = fp_peak_gflops_per_thread(1, 0.0, &isa);
    assert_non_null(isa);
    assert_true(peak > 0.0);

    enum { N = 512, RUNS = 15 };
    float *a = malloc(sizeof(float) * N * N), *b = malloc(sizeof(float) * N * N);
    float *c = malloc(sizeof(float) * N * N);
    assert_true(a && b && c);
    for (int i = 0; i < N * N; i++) { /* values of no consequence, but not constant */
        a[i] = (float)(i % 7) * 0.25f - 0.75f;
        b[i] = (float)(i % 5) * 0.25f - 0.5f;
    }
    double t[RUNS];
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, N, N, 1.0f, a, N, b, N, 0.0f, c, N);
    for (int r = 0; r < RUNS; r++) {
        const double t0 = now_s();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, N, N, 1.0f, a, N, b, N, 0.0f, c,
                    N);
        t[r] = now_s() - t0;
    }
    qsort(t, RUNS, sizeof *t, cmp_double);
    const double sgemm = 2.0 * N * N * N / t[RUNS / 2] * 1e-9;
    /* c[0][0] = sum_k a[0][k] b[k][0], checked so that the timed calls did the product */
    double want = 0.0;
    for (int k = 0; k < N; k++)
        want += (double)a[k] * (double)b[(size_t)k * N];
    assert_true(c[0] - want < 1e-3 && want - c[0] < 1e-3);
    print_message("FMA peak (%s) %.1f GFLOP/s per thread; sgemm 512^3 one thread %.1f GFLOP/s "
                  "(%.0f%% of it)\n",
                  isa, peak, sgemm, 100.0 * sgemm / peak);
    assert_true(sgemm <= 1.15 * peak);
    free(a);
    free(b);
    free(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_peak_bounds_sgemm),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
