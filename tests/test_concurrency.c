/* Four threads running selfattn_forward (and selfattn_attend) on one shared layer give results
 * bit-identical to a serial call. Each call itself uses 2 worker threads, so the calls also
 * overlap inside BLAS. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_concurrent_forward),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
