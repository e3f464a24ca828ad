/* Four threads running selfattn_forward (and selfattn_attend) on one shared layer give results
 * bit-identical to a serial call. Each call itself uses 2 worker threads, so the calls also
 * overlap inside BLAS. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include <cmocka.h>

#include "testutil.h"

#define THREADS 4
#define ROUNDS 3
#define BATCH 2
#define SEQ 256
#define DM 128

typedef struct job {
    const selfattn_layer *layer;
    const float *x;
    const int32_t *lengths;
    float *y;
    selfattn_status st[ROUNDS];
    int mismatches;
    const float *expected;
} job;

static void *run_job(void *p)
{
    job *j = p;
    const size_t n = (size_t)BATCH * SEQ * DM;
    for (int r = 0; r < ROUNDS; r++) {
        memset(j->y, 0, n * sizeof(float));
        j->st[r] = selfattn_forward(j->layer, BATCH, SEQ, j->x, j->lengths, j->y);
        if (memcmp(j->y, j->expected, n * sizeof(float)) != 0)
            j->mismatches++;
    }
    return NULL;
}

static void check_concurrent(const tu_spec *spec)
{
    tu_layer t;
    assert_int_equal(tu_layer_make(spec, 99, &t), SELFATTN_OK);
    tu_rng r = {17};
    const size_t n = (size_t)BATCH * SEQ * DM;
    float *x = tu_random(&r, n, -1, 1);
    const int32_t lengths[BATCH] = {SEQ, 190};
    float *serial = malloc(n * sizeof(float));
    assert_int_equal(selfattn_forward(t.layer, BATCH, SEQ, x, lengths, serial), SELFATTN_OK);

    job jobs[THREADS];
    pthread_t tid[THREADS];
    for (int i = 0; i < THREADS; i++) {
        memset(&jobs[i], 0, sizeof jobs[i]);
        jobs[i].layer = t.layer;
        jobs[i].x = x;
        jobs[i].lengths = lengths;
        jobs[i].y = malloc(n * sizeof(float));
        jobs[i].expected = serial;
        assert_int_equal(pthread_create(&tid[i], NULL, run_job, &jobs[i]), 0);
    }
    for (int i = 0; i < THREADS; i++) {
        pthread_join(tid[i], NULL);
        for (int k = 0; k < ROUNDS; k++)
            assert_int_equal(jobs[i].st[k], SELFATTN_OK);
        assert_int_equal(jobs[i].mismatches, 0);
        free(jobs[i].y);
    }
    free(serial);
    free(x);
    tu_layer_free(&t);
}

static void test_concurrent_forward(void **state)
{
    (void)state;
    const tu_spec plain = {DM, 4, 0, 0, 0, 1, 0, 1, 2, 0};
    const tu_spec gqa_causal = {DM, 8, 2, 0, 1, 1, 0, 1, 2, 0};
    check_concurrent(&plain);
    check_concurrent(&gqa_causal);
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + 1e-6 * (double)ru.ru_utime.tv_usec +
           (double)ru.ru_stime.tv_sec + 1e-6 * (double)ru.ru_stime.tv_usec;
}

static double wall_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* No more busy threads than SELFATTN_OPT_THREADS: the process's CPU time over a call cannot
   exceed threads x wall time (plus slack for start-up), whatever else the machine does. If
   OpenBLAS ran its own threads inside the library's workers this would fail on any machine
   with more than one core. Not a speed test: a loaded machine only lowers CPU/wall. */
static void test_thread_cap(void **state)
{
    (void)state;
    for (int threads = 1; threads <= 2; threads++) {
        const tu_spec spec = {256, 4, 0, 0, 0, 1, 0, 1, threads, 0};
        tu_layer t;
        assert_int_equal(tu_layer_make(&spec, 5, &t), SELFATTN_OK);
        const int L = 1024;
        tu_rng r = {2};
        float *x = tu_random(&r, (size_t)L * 256, -1, 1), *y = malloc(sizeof(float) * L * 256);
        /* Warm-up, untimed: after it is loaded (and after its thread count is set) OpenBLAS's
           idle pool threads spin for about 0.1 s before they sleep; that transient is
           OpenBLAS's own and is documented in the README. */
        const double warm_until = wall_seconds() + 0.3;
        while (wall_seconds() < warm_until)
            assert_int_equal(selfattn_forward(t.layer, 1, L, x, NULL, y), SELFATTN_OK);
        const double c0 = cpu_seconds(), w0 = wall_seconds();
        for (int i = 0; i < 10; i++)
            assert_int_equal(selfattn_forward(t.layer, 1, L, x, NULL, y), SELFATTN_OK);
        const double cpu = cpu_seconds() - c0, wall = wall_seconds() - w0;
        printf("  threads=%d: cpu %.3f s over wall %.3f s = %.2f busy threads\n", threads, cpu,
               wall, cpu / wall);
        assert_true(cpu <= threads * wall * 1.15 + 0.01);
        free(x);
        free(y);
        tu_layer_free(&t);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_concurrent_forward),
        cmocka_unit_test(test_thread_cap),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
