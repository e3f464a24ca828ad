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

/* X(i, ...) for i = 0..11 or 0..15, the other arguments passed on */
#define FP_REP12(X, ...)                                                                           \
    X(0, __VA_ARGS__) X(1, __VA_ARGS__) X(2, __VA_ARGS__) X(3, __VA_ARGS__) X(4, __VA_ARGS__)      \
    X(5, __VA_ARGS__) X(6, __VA_ARGS__) X(7, __VA_ARGS__) X(8, __VA_ARGS__) X(9, __VA_ARGS__)      \
    X(10, __VA_ARGS__) X(11, __VA_ARGS__)
#define FP_REP16(X, ...)                                                                           \
    FP_REP12(X, __VA_ARGS__) X(12, __VA_ARGS__) X(13, __VA_ARGS__) X(14, __VA_ARGS__)              \
    X(15, __VA_ARGS__)

/* One loop: n_acc accumulators (rep: FP_REP12 or FP_REP16) of lanes floats, all in registers, of
   vector type V with the intrinsics of prefix P (_mm512, _mm256, _mm) and the update STEP (FP_FMA,
   or FP_MULADD where there is no FMA). Each loop below is still a function of its own with its
   own target attribute, so that it compiles with that ISA's instructions. */
#define FP_FMA(P, c) P##_fmadd_ps(c, a, b)
#define FP_MULADD(P, c) P##_add_ps(P##_mul_ps(c, a), b)
#define FP_DECL(i, V, P, STEP) V c##i = P##_set1_ps((float)(i));
#define FP_STEP(i, V, P, STEP) c##i = STEP(P, c##i);
#define FP_SUM(i, V, P, STEP) s = P##_add_ps(s, c##i);
#define FP_BODY(V, P, STEP, rep, n_acc, lanes)                                                     \
    const V a = P##_set1_ps(fp_a), b = P##_set1_ps(fp_b);                                          \
    rep(FP_DECL, V, P, STEP)                                                                       \
    for (int64_t it = 0; it < iters; it++) {                                                       \
        rep(FP_STEP, V, P, STEP)                                                                   \
    }                                                                                              \
    V s = P##_setzero_ps();                                                                        \
    rep(FP_SUM, V, P, STEP)                                                                        \
    float out[lanes];                                                                              \
    P##_storeu_ps(out, s);                                                                         \
    fp_sink = out[0];                                                                              \
    return (double)iters * (n_acc) * (lanes) * 2;

#ifdef FP_X86
/* 16 accumulators of 16 lanes (of AVX-512's 32 registers). */
__attribute__((target("avx512f"))) static double fp_loop_avx512(int64_t iters)
{
    FP_BODY(__m512, _mm512, FP_FMA, FP_REP16, 16, 16)
}

/* 12 accumulators of 8 lanes (of AVX2's 16 registers, a and b included). */
__attribute__((target("avx2,fma"))) static double fp_loop_avx2(int64_t iters)
{
    FP_BODY(__m256, _mm256, FP_FMA, FP_REP12, 12, 8)
}

/* SSE has no FMA: a multiply and an add, 12 accumulators of 4 lanes. */
__attribute__((target("sse2"))) static double fp_loop_sse(int64_t iters)
{
    FP_BODY(__m128, _mm, FP_MULADD, FP_REP12, 12, 4)
}
#endif

/* Elsewhere: scalar multiply-adds (what the compiler makes of them). */
#define FP_SDECL(i, V, P, STEP) float c##i = (float)(i);
#define FP_SSTEP(i, V, P, STEP) c##i = c##i * a + b;
#define FP_SSUM(i, V, P, STEP) s += c##i;
static double fp_loop_scalar(int64_t iters)
{
    const float a = fp_a, b = fp_b;
    FP_REP12(FP_SDECL, , , )
    for (int64_t it = 0; it < iters; it++) {
        FP_REP12(FP_SSTEP, , , )
    }
    float s = 0.0f;
    FP_REP12(FP_SSUM, , , )
    fp_sink = s;
    return (double)iters * 12 * 2;
}

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
