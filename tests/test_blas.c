/* The BLAS in use (1.3): selfattn_blas_info, selfattn_blas_mismatch and selfattn_blas_advice under
   different OPENBLAS_CORETYPE values, each in a fresh process (OpenBLAS reads the variable when it
   is loaded, so the test runs itself again with --report); and that no entry point changes
   OpenBLAS's thread count (read before and after every call, and polled by a second thread during
   the calls), with OpenBLAS at 2 threads and at 1, the results checked against the float64
   reference either way. Needs OpenBLAS for all but the first test (skipped otherwise), and a CPU
   with AVX2 for the mismatch tests. */
#define _GNU_SOURCE /* RTLD_DEFAULT */
#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <setjmp.h>

#include <cmocka.h>

#include "testutil.h"

/* OpenBLAS's thread count functions, found as the library finds them (NULL: not OpenBLAS). */
static int (*ob_get_threads)(void);
static void (*ob_set_threads)(int);

static void find_openblas(void)
{
    void *g = dlsym(RTLD_DEFAULT, "openblas_get_num_threads");
    void *s = dlsym(RTLD_DEFAULT, "openblas_set_num_threads");
    memcpy(&ob_get_threads, &g, sizeof g);
    memcpy(&ob_set_threads, &s, sizeof s);
}

/* ---- Info and mismatch, in fresh processes ---- */

/* The child: the three answers, one a line. */
static int report(void)
{
    printf("%s\n%d\n%s\n", selfattn_blas_info(), selfattn_blas_mismatch(), selfattn_blas_advice());
    return 0;
}

typedef struct blas_report {
    char info[256], advice[512];
    int mismatch;
} blas_report;

/* Runs this program with --report and OPENBLAS_CORETYPE=coretype; parses its three lines. */
static void report_under(const char *coretype, blas_report *r)
{
    int fd[2];
    assert_int_equal(pipe(fd), 0);
    fflush(stdout);
    const pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        dup2(fd[1], 1);
        close(fd[0]);
        close(fd[1]);
        setenv("OPENBLAS_CORETYPE", coretype, 1);
        char self[] = "test_blas", arg[] = "--report";
        char *argv[] = {self, arg, NULL};
        execv("/proc/self/exe", argv);
        _exit(127);
    }
    close(fd[1]);
    char buf[1024];
    size_t n = 0;
    ssize_t got;
    while (n < sizeof buf - 1 && (got = read(fd[0], buf + n, sizeof buf - 1 - n)) > 0)
        n += (size_t)got;
    buf[n] = '\0';
    close(fd[0]);
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    char *save = NULL, *line = strtok_r(buf, "\n", &save);
    assert_non_null(line);
    snprintf(r->info, sizeof r->info, "%s", line);
    line = strtok_r(NULL, "\n", &save);
    assert_non_null(line);
    r->mismatch = atoi(line);
    line = strtok_r(NULL, "\n", &save);
    snprintf(r->advice, sizeof r->advice, "%s", line != NULL ? line : "");
}

static int cpu_has_avx2(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

static int cpu_has_avx512f(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
#else
    return 0;
#endif
}

static void test_info_text(void **state)
{
    (void)state;
    const char *info = selfattn_blas_info();
    assert_non_null(info);
    assert_true(strlen(info) > 0);
    assert_ptr_equal(info, selfattn_blas_info()); /* static: the same text every time */
    assert_non_null(selfattn_blas_advice());
    const int m = selfattn_blas_mismatch();
    assert_true(m == 0 || m == 1);
    /* advice exactly when mismatched */
    assert_int_equal(selfattn_blas_advice()[0] != '\0', m);
    if (ob_get_threads != NULL)
        assert_true(strncmp(info, "OpenBLAS ", 9) == 0 && strstr(info, ", core ") != NULL);
    else
        assert_null(strstr(info, "OpenBLAS "));
}

static void skip_unless_openblas_avx2(void)
{
    if (ob_get_threads == NULL) {
        print_message("the BLAS is not OpenBLAS: skipped\n");
        skip();
    }
    if (!cpu_has_avx2()) {
        print_message("the CPU lacks AVX2 and FMA: skipped\n");
        skip();
    }
}

/* OpenBLAS's SSE3 kernels on an AVX2 CPU: the machine (it fell back to them silently). */
static void test_prescott_is_a_mismatch(void **state)
{
    (void)state;
    skip_unless_openblas_avx2();
    blas_report r;
    report_under("Prescott", &r);
    assert_non_null(strstr(r.info, "core Prescott"));
    assert_int_equal(r.mismatch, 1);
    const char *fix =
        cpu_has_avx512f() ? "OPENBLAS_CORETYPE=SkylakeX" : "OPENBLAS_CORETYPE=Haswell";
    if (cpu_has_avx512f() && strstr(r.advice, fix) == NULL)
        fix = "OPENBLAS_CORETYPE=Cooperlake"; /* CPUs with AVX512-BF16 */
    assert_non_null(strstr(r.advice, fix));
    assert_non_null(strstr(r.advice, "already sets OPENBLAS_CORETYPE=Prescott"));
}

/* The core that matches the CPU: SkylakeX on AVX-512F, Haswell on AVX2. */
static void test_matching_core_is_not(void **state)
{
    (void)state;
    skip_unless_openblas_avx2();
    const char *core = cpu_has_avx512f() ? "SkylakeX" : "Haswell";
    blas_report r;
    report_under(core, &r);
    char want[64];
    snprintf(want, sizeof want, "core %s", core);
    assert_non_null(strstr(r.info, want));
    assert_int_equal(r.mismatch, 0);
    assert_string_equal(r.advice, "");
}

/* Haswell on an AVX-512F CPU is below it too (as this project's machines run). */
static void test_haswell_on_avx512(void **state)
{
    (void)state;
    skip_unless_openblas_avx2();
    if (!cpu_has_avx512f()) {
        print_message("the CPU lacks AVX-512F: skipped\n");
        skip();
    }
    blas_report r;
    report_under("Haswell", &r);
    assert_non_null(strstr(r.info, "core Haswell"));
    assert_int_equal(r.mismatch, 1);
}

/* ---- The thread count is the caller's ---- */

typedef struct poller {
    pthread_t t;
    int expect;
    volatile int stop;
    long reads, changed;
} poller;

static void *poll_threads(void *arg)
{
    poller *p = arg;
    while (!__atomic_load_n(&p->stop, __ATOMIC_ACQUIRE)) {
        if (ob_get_threads() != p->expect)
            __atomic_add_fetch(&p->changed, 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&p->reads, 1, __ATOMIC_RELAXED);
    }
    return NULL;
}

/* Every entry point once, reading the thread count before and after each. */
#define CALL(expr)                                                                                 \
    do {                                                                                           \
        assert_int_equal(ob_get_threads(), want);                                                  \
        const selfattn_status st_ = (expr);                                                        \
        if (st_ != SELFATTN_OK)                                                                    \
            print_message("%s: %s\n", #expr, selfattn_last_error());                               \
        assert_int_equal(st_, SELFATTN_OK);                                                        \
        assert_int_equal(ob_get_threads(), want);                                                  \
    } while (0)

static void run_every_entry_point(int want)
{
    const int batch = 2, seq = 96, dm = 64, heads = 4;
    const tu_spec spec = {
        .d_model = dm, .n_heads = heads, .causal = 1, .biases = 1, .out_proj = 1, .threads = 2};
    tu_layer tl;
    assert_int_equal(tu_layer_make(&spec, 7, &tl), SELFATTN_OK);
    tu_rng rng = {11};
    const size_t n = (size_t)batch * seq * dm;
    float *x = tu_random(&rng, n, -1.0f, 1.0f), *dy = tu_random(&rng, n, -1.0f, 1.0f);
    float *y = calloc(n, sizeof *y), *y2 = calloc(n, sizeof *y2), *dx = calloc(n, sizeof *dx);
    float *q = tu_random(&rng, n, -1.0f, 1.0f), *k = tu_random(&rng, n, -1.0f, 1.0f);
    float *v = tu_random(&rng, n, -1.0f, 1.0f), *o = calloc(n, sizeof *o);
    float *dq = calloc(n, sizeof *dq), *dk = calloc(n, sizeof *dk), *dv = calloc(n, sizeof *dv);
    double *ref = malloc(n * sizeof *ref);
    assert_true(x && dy && y && y2 && dx && q && k && v && o && dq && dk && dv && ref);
    const selfattn_extras ex = {.struct_size = sizeof ex};
    const selfattn_grads g = {.struct_size = sizeof g};

    poller p = {.expect = want};
    assert_int_equal(pthread_create(&p.t, NULL, poll_threads, &p), 0);
    /* the poller is running before the first call (on a loaded machine it may start late) */
    while (__atomic_load_n(&p.reads, __ATOMIC_RELAXED) == 0)
        sched_yield();

    CALL(selfattn_forward(tl.layer, batch, seq, x, NULL, y));
    CALL(selfattn_forward_ex(tl.layer, batch, seq, x, NULL, &ex, y2));
    CALL(selfattn_attend(tl.layer, batch, seq, seq, q, k, v, NULL, o));
    CALL(selfattn_attend_ex(tl.layer, batch, seq, seq, q, k, v, NULL, &ex, o));
    CALL(selfattn_backward(tl.layer, batch, seq, x, NULL, dy, dx, &g));
    CALL(selfattn_attend_backward(tl.layer, batch, seq, seq, q, k, v, NULL, dy, dq, dk, dv));
    size_t bytes = 0;
    CALL(selfattn_train_state_size(tl.layer, batch, seq, &bytes));
    void *st = malloc(bytes);
    assert_non_null(st);
    CALL(selfattn_forward_train(tl.layer, batch, seq, x, NULL, y2, st, bytes));
    CALL(selfattn_backward_train(tl.layer, batch, seq, x, NULL, dy, dx, &g, st, bytes));
    selfattn_cache *cache;
    CALL(selfattn_cache_create(tl.layer, batch, seq, &cache));
    CALL(selfattn_forward_cached(tl.layer, cache, seq, x, NULL, y2));
    selfattn_cache_destroy(cache);

    __atomic_store_n(&p.stop, 1, __ATOMIC_RELEASE);
    pthread_join(p.t, NULL);
    assert_true(p.reads > 0);
    assert_int_equal(p.changed, 0);
    assert_int_equal(ob_get_threads(), want);

    /* whoever ran the products, the numbers are right (causal: a cache needs it) */
    double err, ymax;
    ref_forward(&tl.ref, batch, seq, x, NULL, ref);
    ref_max_err(y, ref, n, &err, &ymax);
    assert_true(err <= 1e-4 * ymax);
    ref_max_err(y2, ref, n, &err, &ymax); /* the cache's prompt is the same forward */
    assert_true(err <= 1e-4 * ymax);
    ref_attend(&tl.ref, batch, seq, seq, q, k, v, NULL, ref);
    ref_max_err(o, ref, n, &err, &ymax);
    assert_true(err <= 1e-4 * ymax);

    free(st);
    free(x);
    free(dy);
    free(y);
    free(y2);
    free(dx);
    free(q);
    free(k);
    free(v);
    free(o);
    free(dq);
    free(dk);
    free(dv);
    free(ref);
    tu_layer_free(&tl);
}

static void threads_unchanged_at(int n)
{
    if (ob_get_threads == NULL || ob_set_threads == NULL) {
        print_message("the BLAS is not OpenBLAS: skipped\n");
        skip();
    }
    const int before = ob_get_threads();
    ob_set_threads(n);
    if (ob_get_threads() != n) { /* an OpenBLAS built with fewer threads */
        ob_set_threads(before);
        print_message("OpenBLAS cannot run %d threads here: skipped\n", n);
        skip();
    }
    run_every_entry_point(n);
    ob_set_threads(before);
}

static void test_threads_unchanged_at_2(void **state)
{
    (void)state;
    threads_unchanged_at(2);
}

static void test_threads_unchanged_at_1(void **state)
{
    (void)state;
    threads_unchanged_at(1);
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--report") == 0)
        return report();
    find_openblas();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_info_text),
        cmocka_unit_test(test_prescott_is_a_mismatch),
        cmocka_unit_test(test_matching_core_is_not),
        cmocka_unit_test(test_haswell_on_avx512),
        cmocka_unit_test(test_threads_unchanged_at_2),
        cmocka_unit_test(test_threads_unchanged_at_1),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
