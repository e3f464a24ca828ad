/* The FMA peak (fmapeak.h): independent accumulators, enough to cover the FMA latency times the
   FMA units (4 cycles x 2 units on current x86 cores), each updated c = c * a + b with a just below
   1, so that the values settle near b / (1 - a) and never overflow or turn subnormal. */
#define _POSIX_C_SOURCE 200809L
#include "fmapeak.h"

#include <pthread.h>
#include <stdint.h>
#include <time.h>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define FP_X86 1
#include <immintrin.h>
#endif

/* Timed runs per thread, the best counting: short runs, many of them, so that one of them runs
   undisturbed on a machine shared with other work (on a loaded 2-core VM, 50 ms runs measured
   half of what 2 ms runs did). */
#define FP_RUNS 25

/* Read through volatile, so that the compiler cannot fold the loop away. */
static volatile float fp_a = 0.999999f, fp_b = 1e-6f;
static volatile float fp_sink;

static double fp_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Each loop runs iters iterations and returns the flops it did. */
typedef double (*fp_loop)(int64_t iters);

#define FP_REP12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define FP_REP16(X) FP_REP12(X) X(12) X(13) X(14) X(15)

/* One loop: n_acc accumulators (rep: FP_REP12 or FP_REP16) of lanes floats, all in registers,
   in the vector type FP_V with FP_V_SET1, FP_V_STEP (c * a + b), FP_V_ADD, FP_V_ZERO and
   FP_V_STORE, which each loop below defines for its ISA (the function keeps its own target
   attribute, so the loop compiles with that ISA's instructions). */
#define FP_DECL(i) FP_V c##i = FP_V_SET1((float)(i));
#define FP_STEP(i) c##i = FP_V_STEP(c##i);
#define FP_SUM(i) s = FP_V_ADD(s, c##i);
#define FP_BODY(rep, n_acc, lanes)                                                                 \
    const FP_V a = FP_V_SET1(fp_a), b = FP_V_SET1(fp_b);                                           \
    rep(FP_DECL)                                                                                   \
    for (int64_t it = 0; it < iters; it++) {                                                       \
        rep(FP_STEP)                                                                               \
    }                                                                                              \
    FP_V s = FP_V_ZERO();                                                                          \
    rep(FP_SUM)                                                                                    \
    float out[lanes];                                                                              \
    FP_V_STORE(out, s);                                                                            \
    fp_sink = out[0];                                                                              \
    return (double)iters * (n_acc) * (lanes) * 2;

#ifdef FP_X86
/* 16 accumulators of 16 lanes (of AVX-512's 32 registers). */
#define FP_V __m512
#define FP_V_SET1 _mm512_set1_ps
#define FP_V_STEP(c) _mm512_fmadd_ps(c, a, b)
#define FP_V_ADD _mm512_add_ps
#define FP_V_ZERO _mm512_setzero_ps
#define FP_V_STORE _mm512_storeu_ps
__attribute__((target("avx512f"))) static double fp_loop_avx512(int64_t iters)
{
    FP_BODY(FP_REP16, 16, 16)
}
#undef FP_V
#undef FP_V_SET1
#undef FP_V_STEP
#undef FP_V_ADD
#undef FP_V_ZERO
#undef FP_V_STORE

/* 12 accumulators of 8 lanes (of AVX2's 16 registers, a and b included). */
#define FP_V __m256
#define FP_V_SET1 _mm256_set1_ps
#define FP_V_STEP(c) _mm256_fmadd_ps(c, a, b)
#define FP_V_ADD _mm256_add_ps
#define FP_V_ZERO _mm256_setzero_ps
#define FP_V_STORE _mm256_storeu_ps
__attribute__((target("avx2,fma"))) static double fp_loop_avx2(int64_t iters)
{
    FP_BODY(FP_REP12, 12, 8)
}
#undef FP_V
#undef FP_V_SET1
#undef FP_V_STEP
#undef FP_V_ADD
#undef FP_V_ZERO
#undef FP_V_STORE

/* SSE has no FMA: a multiply and an add, 12 accumulators of 4 lanes. */
#define FP_V __m128
#define FP_V_SET1 _mm_set1_ps
#define FP_V_STEP(c) _mm_add_ps(_mm_mul_ps(c, a), b)
#define FP_V_ADD _mm_add_ps
#define FP_V_ZERO _mm_setzero_ps
#define FP_V_STORE _mm_storeu_ps
__attribute__((target("sse2"))) static double fp_loop_sse(int64_t iters)
{
    FP_BODY(FP_REP12, 12, 4)
}
#undef FP_V
#undef FP_V_SET1
#undef FP_V_STEP
#undef FP_V_ADD
#undef FP_V_ZERO
#undef FP_V_STORE
#endif

/* Elsewhere: scalar multiply-adds (what the compiler makes of them). */
#define FP_V float
#define FP_V_SET1(x) (x)
#define FP_V_STEP(c) ((c) * a + b)
#define FP_V_ADD(s, c) ((s) + (c))
#define FP_V_ZERO() 0.0f
#define FP_V_STORE(p, s) ((p)[0] = (s))
static double fp_loop_scalar(int64_t iters)
{
    FP_BODY(FP_REP12, 12, 1)
}
#undef FP_V
#undef FP_V_SET1
#undef FP_V_STEP
#undef FP_V_ADD
#undef FP_V_ZERO
#undef FP_V_STORE

static fp_loop fp_choose(const char **isa)
{
#ifdef FP_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
        *isa = "AVX-512F";
        return fp_loop_avx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        *isa = "AVX2+FMA";
        return fp_loop_avx2;
    }
    if (__builtin_cpu_supports("sse2")) {
        *isa = "SSE";
        return fp_loop_sse;
    }
#endif
    *isa = "scalar";
    return fp_loop_scalar;
}

/* The threads calibrate, then start their timed runs together (go = 1), or give up (go = -1). */
typedef struct fp_start {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int threads, ready, go;
} fp_start;

typedef struct fp_thread {
    fp_loop loop;
    double seconds, gflops;
    fp_start *start;
} fp_thread;

static void *fp_run(void *arg)
{
    fp_thread *t = arg;
    /* calibrate to about t->seconds per run (the clock frequency ramps up meanwhile) */
    int64_t iters = 1 << 14;
    for (;;) {
        const double t0 = fp_now();
        t->loop(iters);
        const double dt = fp_now() - t0;
        if (dt >= 0.2 * t->seconds || iters >= ((int64_t)1 << 40)) {
            const double want = (double)iters * t->seconds / (dt > 1e-9 ? dt : 1e-9);
            iters = want > 1.0 ? (int64_t)want : 1;
            break;
        }
        iters *= 4;
    }
    fp_start *st = t->start;
    pthread_mutex_lock(&st->mu);
    if (++st->ready == st->threads) { /* the last to arrive opens the start */
        st->go = 1;
        pthread_cond_broadcast(&st->cv);
    }
    while (st->go == 0)
        pthread_cond_wait(&st->cv, &st->mu);
    const int go = st->go;
    pthread_mutex_unlock(&st->mu);
    double best = 0.0;
    for (int r = 0; go > 0 && r < FP_RUNS; r++) {
        const double t0 = fp_now();
        const double flops = t->loop(iters);
        const double dt = fp_now() - t0;
        if (dt > 0.0 && flops / dt > best)
            best = flops / dt;
    }
    t->gflops = best * 1e-9;
    return NULL;
}

double fp_peak_gflops_per_thread(int threads, double seconds, const char **isa)
{
    enum { FP_MAX_THREADS = 256 };
    const char *name;
    const fp_loop loop = fp_choose(&name);
    if (isa != NULL)
        *isa = name;
    if (threads < 1)
        threads = 1;
    if (threads > FP_MAX_THREADS)
        threads = FP_MAX_THREADS;
    if (seconds <= 0.0)
        seconds = 0.002;
    fp_start st = {.threads = threads, .ready = 0, .go = 0};
    pthread_mutex_init(&st.mu, NULL);
    pthread_cond_init(&st.cv, NULL);
    fp_thread t[FP_MAX_THREADS];
    pthread_t id[FP_MAX_THREADS];
    for (int i = 0; i < threads; i++)
        t[i] = (fp_thread){.loop = loop, .seconds = seconds, .start = &st};
    int started = 1;
    while (started < threads && pthread_create(&id[started], NULL, fp_run, &t[started]) == 0)
        started++;
    double sum = 0.0;
    if (started < threads) { /* release those started; measure nothing */
        pthread_mutex_lock(&st.mu);
        st.go = -1;
        pthread_cond_broadcast(&st.cv);
        pthread_mutex_unlock(&st.mu);
    } else {
        fp_run(&t[0]); /* the caller is thread 0 */
    }
    for (int i = 1; i < started; i++)
        pthread_join(id[i], NULL);
    for (int i = 0; started == threads && i < threads; i++)
        sum += t[i].gflops;
    pthread_cond_destroy(&st.cv);
    pthread_mutex_destroy(&st.mu);
    return started == threads ? sum / threads : 0.0;
}
