/* Incremental decoding through the public API (selfattn_forward_cached):
 *   decode/E/H/KV/ctx/threads[/2/1]
 *                                  one token of one sequence against ctx cached positions (float32,
 *                                  or with /2/1 bf16 weights and an f16 cache), alternating with a
 *                                  plain vectorised read (below: not a BLAS routine, on as many
 *                                  threads as the step) of as many bytes as the step must read:
 *                                  the weights (W_Q, W_K, W_V, W_O) and the cached K/V. Counters:
 *                                  step_us, read_us, step_GBs, read_GBs, ratio = step / read time.
 *   decode_batch/E/H/KV/ctx        8 sequences x 1 token against 1 sequence x 1 token, both at ctx
 *                                  cached positions, each after sb_evict_caches (a 256 MB read), so
 *                                  that both start from memory as in a model of many layers:
 *                                  ratio = time(8) / time(1), one_us, eight_us. The library's helper
 *                                  threads have slept through the read, as after other work between
 *                                  two calls (a model's MLP); the same pair with the helpers awake,
 *                                  as when layers' calls follow each other (a small call just
 *                                  before): awake_ratio, awake_one_us, awake_eight_us.
 *   prefill/E/H/KV/L               a prompt of L tokens through the cache against one causal
 *                                  selfattn_forward of the same tokens: ratio = prefill / forward.
 *   dtype_decode/E/H/KV/ctx/threads/W/KV
 *                                  1.3 half precision: the same step with W-stored weights and a
 *                                  KV-stored cache (f32, f16, bf16), alternating with the float32
 *                                  step and a plain vectorised read (a 4-way integer sum, not a
 *                                  BLAS routine, on as many threads as the step) of the bytes the
 *                                  typed step must read. Counters:
 *                                  f32_us, step_us, read_us, vs_f32 = step / float32 step,
 *                                  read_frac = read / step (1: the step reads at memory speed).
 *   dtype_prefill/E/H/KV/L/W/KV    a prompt of L tokens into a KV-stored cache with W-stored
 *                                  weights against the float32 prefill: vs_f32.
 *   dtype_forward/E/H/KV/L/W       a causal selfattn_forward with W-stored weights against the
 *                                  float32 forward: vs_f32.
 *   dtype_memory/E/H/KV/ctx        resident bytes (VmRSS growth) of a layer with bf16 weights and
 *                                  of a cache of ctx positions in f16 (filled), each against the
 *                                  float32 one: layer_vs_f32, cache_vs_f32.
 * Medians of alternating runs. Run with --smoke for a quick pass (small shapes).
 * --ctx=N[,N...] adds decode/ benchmarks (1 and 2 threads) at those cached positions, for a curve
 * of step time against positions (bench/plot.py draws it). */
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <selfattn/selfattn.h>

#include "bench_util.h"
#include "shim.h"

typedef struct dcfg {
    int E, H, KV, ctx, threads, n_seqs;
    int wdt, kvdt; /* dtype_ benchmarks: the weights' and the cache's storage (0 f32, 1 f16,
                      2 bf16) */
} dcfg;

/* The layer of a configuration: causal, with RoPE and random weights; threads 0 leaves the
   library's default. */
static selfattn_layer *layer_typed(const dcfg *c, int threads, int wdt, int kvdt)
{
    return sb_make_layer(&(sb_layer_opts){.d_model = c->E,
                                          .n_heads = c->H,
                                          .n_kv_heads = c->KV,
                                          .causal = 1,
                                          .rope = 1,
                                          .threads = threads,
                                          .weight_dtype = wdt,
                                          .kv_dtype = kvdt});
}

static selfattn_layer *layer_of(const dcfg *c, int threads)
{
    return layer_typed(c, threads, 0, 0);
}

/* A cache of n_seqs sequences holding ctx positions each (a prompt run through the cache). */
static selfattn_cache *filled_cache(selfattn_layer *l, const dcfg *c, int n_seqs)
{
    selfattn_cache *cache = NULL;
    if (selfattn_cache_create(l, n_seqs, c->ctx + 16, &cache) != SELFATTN_OK)
        return NULL;
    const size_t n = (size_t)n_seqs * c->ctx * c->E;
    float *x = sb_filled(n, 1.0f, 5), *y = malloc(n * sizeof(float));
    const int ok = x && y && selfattn_forward_cached(l, cache, c->ctx, x, NULL, y) == SELFATTN_OK;
    free(x);
    free(y);
    if (!ok) {
        selfattn_cache_destroy(cache);
        return NULL;
    }
    return cache;
}

#define MAX_RUNS 512

static void bm_decode_batch(sb_state *s, const void *arg)
{
    const dcfg *c = arg;
    selfattn_layer *l = layer_of(c, 0);
    selfattn_cache *c1 = l ? filled_cache(l, c, 1) : NULL, *c8 = l ? filled_cache(l, c, 8) : NULL;
    float *x = sb_filled((size_t)8 * c->E, 1.0f, 3), *y = malloc(sizeof(float) * 8 * c->E);
    /* the waking call: a forward of 64 tokens through a small layer, on as many threads */
    selfattn_layer *wl = sb_make_layer(&(sb_layer_opts){.d_model = 256, .n_heads = 4});
    float *wx = sb_filled((size_t)64 * 256, 1.0f, 7), *wy = malloc(sizeof(float) * 64 * 256);
    static double t1s[MAX_RUNS], t8s[MAX_RUNS], a1s[MAX_RUNS], a8s[MAX_RUNS];
    /* Each timed call starts from memory (sb_evict_caches). Before, a 64 MB read (cblas_sasum)
       left part of the weights (42 MB at E 2048) cached on the 2-vCPU EPYC VM, whose caches reach
       past 64 MB (bench_util.h): in one set of runs the one-sequence step took 760-830 us after
       it against 1010-1260 us after a 256 MB read, ratios 2.40-2.47 against 2.06-2.11. */
    int k = 0;
    if (!c1 || !c8 || !x || !y || !wl || !wx || !wy) {
        sb_skip_with_error(s, "set-up failed");
    } else {
        selfattn_cache *const cs[2] = {c1, c8};
        double *const ts[4] = {t1s, t8s, a1s, a8s};
        selfattn_status st = SELFATTN_OK;
        while (st == SELFATTN_OK && sb_keep_running(s)) {
            double t[4];
            for (int i = 0; i < 4 && st == SELFATTN_OK; i++) { /* asleep 1, 8; awake 1, 8 */
                sb_evict_caches();
                if (i >= 2)
                    st = selfattn_forward(wl, 1, 64, wx, NULL, wy);
                const double t0 = sb_now_s();
                if (st == SELFATTN_OK)
                    st = selfattn_forward_cached(l, cs[i & 1], 1, x, NULL, y);
                t[i] = sb_now_s() - t0;
                selfattn_cache_truncate(cs[i & 1], -1, c->ctx);
            }
            if (st != SELFATTN_OK) {
                sb_skip_with_error(s, selfattn_status_string(st));
            } else if (k < MAX_RUNS) {
                for (int i = 0; i < 4; i++)
                    ts[i][k] = t[i];
                k++;
            }
        }
        if (st == SELFATTN_OK && k > 0) {
            const double a = sb_median(t1s, k), b = sb_median(t8s, k);
            const double aa = sb_median(a1s, k), ab = sb_median(a8s, k);
            sb_counter(s, "one_us", a * 1e6);
            sb_counter(s, "eight_us", b * 1e6);
            sb_counter(s, "ratio", b / a);
            sb_counter(s, "awake_one_us", aa * 1e6);
            sb_counter(s, "awake_eight_us", ab * 1e6);
            sb_counter(s, "awake_ratio", ab / aa);
        }
    }
    free(wx);
    free(wy);
    selfattn_layer_destroy(wl);
    free(x);
    free(y);
    selfattn_cache_destroy(c1);
    selfattn_cache_destroy(c8);
    selfattn_layer_destroy(l);
}

static void bm_prefill(sb_state *s, const void *arg)
{
    const dcfg *c = arg;
    selfattn_layer *l = layer_of(c, 0);
    selfattn_cache *cache = NULL;
    const size_t n = (size_t)c->ctx * c->E;
    float *x = sb_filled(n, 1.0f, 3), *y = malloc(n * sizeof(float));
    static double tp[MAX_RUNS], tf[MAX_RUNS];
    int k = 0;
    if (!l || selfattn_cache_create(l, 1, c->ctx, &cache) != SELFATTN_OK || !x || !y) {
        sb_skip_with_error(s, "set-up failed");
    } else {
        selfattn_forward(l, 1, c->ctx, x, NULL, y); /* warm-up */
        while (sb_keep_running(s)) {
            selfattn_cache_truncate(cache, 0, 0);
            const int first = k % 2; /* which goes first alternates */
            double t[2];
            selfattn_status st = SELFATTN_OK;
            for (int i = 0; i < 2; i++) {
                const double t0 = sb_now_s();
                if ((i == 0) == (first == 0))
                    st |= selfattn_forward_cached(l, cache, c->ctx, x, NULL, y);
                else
                    st |= selfattn_forward(l, 1, c->ctx, x, NULL, y);
                t[(i == 0) == (first == 0) ? 0 : 1] = sb_now_s() - t0;
            }
            if (st != SELFATTN_OK) {
                sb_skip_with_error(s, "call failed");
                break;
            }
            if (k < MAX_RUNS) {
                tp[k] = t[0];
                tf[k] = t[1];
                k++;
            }
        }
        if (k > 0) {
            const double a = sb_median(tp, k), b = sb_median(tf, k);
            sb_counter(s, "prefill_ms", a * 1e3);
            sb_counter(s, "forward_ms", b * 1e3);
            sb_counter(s, "ratio", a / b);
        }
    }
    free(x);
    free(y);
    selfattn_cache_destroy(cache);
    selfattn_layer_destroy(l);
}

/* sb_plain_read on as many threads as the step it is compared with: the calling thread reads the
   first part, threads - 1 helpers parked on a barrier (created once, as the library's workers
   are) read the others, each a contiguous part of 4 KiB pages. */
#define READ_THREADS_MAX 64
typedef struct reader {
    int threads, quit;
    const uint64_t *p;
    size_t n;
    uint64_t sum[READ_THREADS_MAX];
    pthread_t helper[READ_THREADS_MAX];
    pthread_barrier_t go, done;
} reader;

static void reader_part(reader *r, int t)
{
    const size_t per = (r->n / (size_t)r->threads + 511) / 512 * 512; /* whole pages */
    const size_t i0 = per * (size_t)t < r->n ? per * (size_t)t : r->n;
    const size_t i1 = i0 + per < r->n ? i0 + per : r->n;
    r->sum[t] = sb_plain_read(r->p + i0, i1 - i0);
}

typedef struct reader_arg {
    reader *r;
    int t;
} reader_arg;

static void *reader_main(void *arg)
{
    reader_arg *a = arg;
    for (;;) {
        pthread_barrier_wait(&a->r->go);
        if (a->r->quit)
            break;
        reader_part(a->r, a->t);
        pthread_barrier_wait(&a->r->done);
    }
    free(a);
    return NULL;
}

/* 0 on success; threads is clamped to [1, READ_THREADS_MAX]. */
static int reader_start(reader *r, int threads)
{
    memset(r, 0, sizeof *r);
    r->threads = threads < 1 ? 1 : threads > READ_THREADS_MAX ? READ_THREADS_MAX : threads;
    if (r->threads == 1)
        return 0;
    if (pthread_barrier_init(&r->go, NULL, (unsigned)r->threads) != 0)
        return -1;
    if (pthread_barrier_init(&r->done, NULL, (unsigned)r->threads) != 0) {
        pthread_barrier_destroy(&r->go);
        return -1;
    }
    for (int t = 1; t < r->threads; t++) {
        reader_arg *a = malloc(sizeof *a);
        if (a != NULL)
            *a = (reader_arg){r, t};
        if (a == NULL || pthread_create(&r->helper[t], NULL, reader_main, a) != 0) {
            /* no helper can be left waiting: abort rather than hang the benchmark */
            fprintf(stderr, "bench_decode: cannot start the reader threads\n");
            abort();
        }
    }
    return 0;
}

static uint64_t reader_read(reader *r, const uint64_t *p, size_t n)
{
    r->p = p;
    r->n = n;
    if (r->threads == 1)
        return sb_plain_read(p, n);
    pthread_barrier_wait(&r->go);
    reader_part(r, 0);
    pthread_barrier_wait(&r->done);
    uint64_t s = 0;
    for (int t = 0; t < r->threads; t++)
        s += r->sum[t];
    return s;
}

static void reader_stop(reader *r)
{
    if (r->threads == 1)
        return;
    r->quit = 1;
    pthread_barrier_wait(&r->go);
    for (int t = 1; t < r->threads; t++)
        pthread_join(r->helper[t], NULL);
    pthread_barrier_destroy(&r->go);
    pthread_barrier_destroy(&r->done);
}

static size_t dtype_bytes(int dt)
{
    return dt == 0 ? 4 : 2;
}

/* What a step of configuration c must read: the weights (W_Q, W_K, W_V, W_O) in their storage
   and the cached K and V (plus the new row) in theirs. */
static size_t step_bytes(const dcfg *c)
{
    const size_t hd = (size_t)(c->E / c->H), nq = (size_t)c->H * hd, nkv = (size_t)c->KV * hd;
    return dtype_bytes(c->wdt) * ((nq + 2 * nkv) * c->E + (size_t)c->E * nq) +
           dtype_bytes(c->kvdt) * 2 * nkv * ((size_t)c->ctx + 1);
}

/* One decoding step of configuration c (weights and cache stored as c->wdt, c->kvdt) against a
   plain read of the bytes it must read, on as many threads as the step, alternating; with vs_f32
   the float32 step of the same shape too, first in each round. decode/ (without) and
   dtype_decode/ (with) are this one benchmark. */
static void decode_vs_read(sb_state *s, const dcfg *c, int vs_f32)
{
    selfattn_layer *l32 = vs_f32 ? layer_of(c, c->threads) : NULL;
    selfattn_layer *lt = layer_typed(c, c->threads, c->wdt, c->kvdt);
    selfattn_cache *c32 = l32 ? filled_cache(l32, c, 1) : NULL;
    selfattn_cache *ct = lt ? filled_cache(lt, c, 1) : NULL;
    const size_t bytes = step_bytes(c);
    const size_t words = bytes / 8;
    uint64_t *big = calloc(words, 8);
    float *x = sb_filled((size_t)c->E, 1.0f, 3), *y = malloc(sizeof(float) * c->E);
    static double tf[MAX_RUNS], tt[MAX_RUNS], tr[MAX_RUNS];
    static reader rd;
    int k = 0;
    if ((vs_f32 && !c32) || !ct || !big || !x || !y || reader_start(&rd, c->threads) != 0) {
        sb_skip_with_error(s, "set-up failed");
    } else {
        for (size_t i = 0; i < words; i++)
            big[i] = i * 0x9E3779B97F4A7C15ull;
        volatile uint64_t sink = 0;
        while (sb_keep_running(s)) {
            const double t0 = sb_now_s();
            selfattn_status st = vs_f32 ? selfattn_forward_cached(l32, c32, 1, x, NULL, y)
                                        : SELFATTN_OK;
            const double t1 = sb_now_s();
            if (st == SELFATTN_OK)
                st = selfattn_forward_cached(lt, ct, 1, x, NULL, y);
            const double t2 = sb_now_s();
            sink += reader_read(&rd, big, words);
            const double t3 = sb_now_s();
            if (vs_f32) /* the same length every step */
                selfattn_cache_truncate(c32, 0, c->ctx);
            selfattn_cache_truncate(ct, 0, c->ctx);
            if (st != SELFATTN_OK) {
                sb_skip_with_error(s, selfattn_status_string(st));
                break;
            }
            if (k < MAX_RUNS) {
                tf[k] = t1 - t0;
                tt[k] = t2 - t1;
                tr[k] = t3 - t2;
                k++;
            }
        }
        (void)sink;
        if (k > 0) {
            const double f = sb_median(tf, k), t = sb_median(tt, k), r = sb_median(tr, k);
            sb_counter(s, "step_us", t * 1e6);
            sb_counter(s, "read_us", r * 1e6);
            sb_counter(s, "MB", (double)bytes / 1e6);
            if (vs_f32) {
                sb_counter(s, "f32_us", f * 1e6);
                sb_counter(s, "vs_f32", t / f);
                sb_counter(s, "read_frac", r / t);
            } else {
                sb_counter(s, "step_GBs", (double)bytes / t * 1e-9);
                sb_counter(s, "read_GBs", (double)bytes / r * 1e-9);
                sb_counter(s, "ratio", t / r);
            }
        }
        reader_stop(&rd);
    }
    free(big);
    free(x);
    free(y);
    selfattn_cache_destroy(c32);
    selfattn_cache_destroy(ct);
    selfattn_layer_destroy(l32);
    selfattn_layer_destroy(lt);
}

static void bm_decode(sb_state *s, const void *arg)
{
    decode_vs_read(s, arg, 0);
}

static void bm_dtype_decode(sb_state *s, const void *arg)
{
    decode_vs_read(s, arg, 1);
}

/* n_seqs 0: a causal forward of ctx tokens; else a prompt of ctx tokens into a fresh cache. */
static void bm_dtype_pair(sb_state *s, const void *arg)
{
    const dcfg *c = arg;
    selfattn_layer *l[2] = {layer_of(c, c->threads), layer_typed(c, c->threads, c->wdt, c->kvdt)};
    selfattn_cache *cache[2] = {NULL, NULL};
    const size_t n = (size_t)c->ctx * c->E;
    float *x = sb_filled(n, 1.0f, 3), *y = malloc(n * sizeof(float));
    static double t[2][MAX_RUNS];
    int k = 0, ok = l[0] && l[1] && x && y;
    for (int i = 0; ok && c->n_seqs && i < 2; i++)
        ok = selfattn_cache_create(l[i], 1, c->ctx, &cache[i]) == SELFATTN_OK;
    if (!ok) {
        sb_skip_with_error(s, "set-up failed");
    } else {
        for (int i = 0; i < 2; i++) /* warm-up */
            selfattn_forward(l[i], 1, c->ctx, x, NULL, y);
        while (sb_keep_running(s)) {
            selfattn_status st = SELFATTN_OK;
            for (int j = 0; j < 2; j++) {
                const int i = (k + j) % 2; /* which goes first alternates */
                if (cache[i])
                    selfattn_cache_truncate(cache[i], 0, 0);
                const double t0 = sb_now_s();
                st |= cache[i] ? selfattn_forward_cached(l[i], cache[i], c->ctx, x, NULL, y)
                               : selfattn_forward(l[i], 1, c->ctx, x, NULL, y);
                if (k < MAX_RUNS)
                    t[i][k] = sb_now_s() - t0;
            }
            if (st != SELFATTN_OK) {
                sb_skip_with_error(s, "call failed");
                break;
            }
            k += k < MAX_RUNS;
        }
        if (k > 0) {
            const double a = sb_median(t[0], k), b = sb_median(t[1], k);
            sb_counter(s, "f32_ms", a * 1e3);
            sb_counter(s, "typed_ms", b * 1e3);
            sb_counter(s, "vs_f32", b / a);
        }
    }
    free(x);
    free(y);
    for (int i = 0; i < 2; i++) {
        selfattn_cache_destroy(cache[i]);
        selfattn_layer_destroy(l[i]);
    }
}

/* The process's resident set now, in bytes (/proc/self/statm: pages). */
static double rss_bytes(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    long pages = 0, res = 0;
    if (f) {
        if (fscanf(f, "%ld %ld", &pages, &res) != 2)
            res = 0;
        fclose(f);
    }
    return (double)res * 4096.0;
}

/* Resident bytes of a layer (weights set, before any call) with weight dtype wdt, and of a
   cache of ctx positions in kvdt, filled by prompts of 512 tokens: what destroying each returns.
   With a fixed mmap threshold the large blocks are mapped apart, so freeing them shrinks the
   resident set by their size; but when earlier benchmarks in the process left large free blocks
   in the heap, glibc serves the blocks from there, and freeing them returns nothing (the layer
   then measured 0 bytes after dtype_prefill had run): malloc_trim(0) after each destroy hands
   the freed heap pages back as well. */
static void memory_of(const dcfg *c, int wdt, int kvdt, double *layer_b, double *cache_b)
{
    /* a fresh layer with its weights set, measured by what destroying it returns */
    selfattn_layer *l = layer_typed(c, 1, wdt, kvdt);
    const double r0 = rss_bytes();
    selfattn_layer_destroy(l);
    malloc_trim(0);
    *layer_b = r0 - rss_bytes();
    l = layer_typed(c, 1, wdt, kvdt);
    *cache_b = 0;
    selfattn_cache *cache = NULL;
    const int chunk = c->ctx < 512 ? c->ctx : 512;
    float *x = sb_filled((size_t)chunk * c->E, 1.0f, 3), *y = malloc(sizeof(float) * chunk * c->E);
    if (l && x && y && selfattn_cache_create(l, 1, c->ctx, &cache) == SELFATTN_OK) {
        for (int t = 0; t + chunk <= c->ctx; t += chunk) /* every row of K and V written */
            selfattn_forward_cached(l, cache, chunk, x, NULL, y);
        const double r1 = rss_bytes();
        selfattn_cache_destroy(cache);
        malloc_trim(0);
        *cache_b = r1 - rss_bytes();
    }
    free(x);
    free(y);
    selfattn_layer_destroy(l);
}

static void bm_dtype_memory(sb_state *s, const void *arg)
{
    const dcfg *c = arg;
    /* a fixed mmap threshold: every large block is mapped on its own and returned when freed
       (glibc otherwise raises the threshold after a free, and reuses resident heap memory) */
    mallopt(M_MMAP_THRESHOLD, 128 * 1024);
    double l32 = 0, c32 = 0, lt = 0, ct = 0;
    while (sb_keep_running(s)) {
        memory_of(c, 0, 0, &l32, &c32);
        memory_of(c, 2, 1, &lt, &ct);
    }
    sb_counter(s, "layer_f32_MB", l32 / 1e6);
    sb_counter(s, "layer_bf16_MB", lt / 1e6);
    sb_counter(s, "layer_vs_f32", lt / l32);
    sb_counter(s, "cache_f32_MB", c32 / 1e6);
    sb_counter(s, "cache_f16_MB", ct / 1e6);
    sb_counter(s, "cache_vs_f32", ct / c32);
}

/* decode/E/H/KV/ctx/threads for c (float32) and decode/E/H/KV/ctx/threads/2/1, the same step
   with bf16 weights and an f16 cache. */
static void register_decode(const dcfg *c, int smoke)
{
    static dcfg typed[40];
    static char names[80][96];
    static int n;
    if (n + 2 > 80)
        return;
    snprintf(names[n], sizeof names[n], "decode/%d/%d/%d/%d/%d", c->E, c->H, c->KV, c->ctx,
             c->threads);
    sb_register(names[n++], bm_decode, c, smoke ? 3 : 41);
    dcfg *d = &typed[n / 2];
    *d = *c;
    d->wdt = 2;
    d->kvdt = 1;
    snprintf(names[n], sizeof names[n], "decode/%d/%d/%d/%d/%d/2/1", c->E, c->H, c->KV, c->ctx,
             c->threads);
    sb_register(names[n++], bm_decode, d, smoke ? 3 : 41);
}

int main(int argc, char **argv)
{
    sb_blas_setup();
    const int smoke = sb_smoke(argc, argv);
    int more_ctx[8];
    const int n_more = sb_int_list(argc, argv, "--ctx=", more_ctx, 8);
    static dcfg dec[8], batch[2], pre[2];
    static char names[12][96];
    int nd = 0, nn = 0;
    const int ctxs[2] = {smoke ? 256 : 4096, smoke ? 512 : 16384};
    for (int i = 0; i < 2; i++)
        for (int t = 1; t <= 2; t++) {
            dec[nd] = (dcfg){.E = smoke ? 256 : 2048,
                             .H = 16,
                             .KV = 4,
                             .ctx = ctxs[i],
                             .threads = t,
                             .n_seqs = 1};
            register_decode(&dec[nd++], smoke);
        }
    static dcfg more[16];
    for (int i = 0; i < n_more; i++) {
        if (more_ctx[i] == ctxs[0] || more_ctx[i] == ctxs[1])
            continue;
        for (int t = 1; t <= 2; t++) {
            const int m = 2 * i + t - 1;
            more[m] = dec[t - 1];
            more[m].ctx = more_ctx[i];
            register_decode(&more[m], smoke);
        }
    }
    batch[0] = (dcfg){.E = smoke ? 256 : 2048,
                      .H = 16,
                      .KV = 4,
                      .ctx = smoke ? 128 : 1024,
                      .threads = 1,
                      .n_seqs = 8};
    snprintf(names[nn], sizeof names[nn], "decode_batch/%d/16/4/%d", batch[0].E, batch[0].ctx);
    sb_register(names[nn++], bm_decode_batch, &batch[0], smoke ? 3 : 41);
    pre[0] = (dcfg){.E = smoke ? 256 : 2048,
                    .H = 16,
                    .KV = 4,
                    .ctx = smoke ? 128 : 2048,
                    .threads = 1,
                    .n_seqs = 1};
    snprintf(names[nn], sizeof names[nn], "prefill/%d/16/4/%d", pre[0].E, pre[0].ctx);
    sb_register(names[nn++], bm_prefill, &pre[0], smoke ? 2 : 6);

    /* 1.3 half precision: bf16 weights with an f16 cache (llama.cpp's default cache), and each
       alone, against float32 */
    static dcfg typed[16];
    static char tnames[16][96];
    static const int pairs[3][2] = {{2, 1}, {2, 0}, {0, 1}};
    int nt = 0;
    for (int i = 0; i < 2; i++)
        for (int t = 1; t <= 2; t++)
            for (int p = 0; p < (i == 0 && t == 1 ? 3 : 1); p++) {
                typed[nt] = dec[i * 2 + t - 1];
                typed[nt].wdt = pairs[p][0];
                typed[nt].kvdt = pairs[p][1];
                snprintf(tnames[nt], sizeof tnames[nt], "dtype_decode/%d/16/4/%d/%d/%d/%d",
                         typed[nt].E, typed[nt].ctx, t, typed[nt].wdt, typed[nt].kvdt);
                sb_register(tnames[nt], bm_dtype_decode, &typed[nt], smoke ? 3 : 41);
                nt++;
            }
    typed[nt] = pre[0];
    typed[nt].wdt = 2;
    typed[nt].kvdt = 1;
    snprintf(tnames[nt], sizeof tnames[nt], "dtype_prefill/%d/16/4/%d/2/1", pre[0].E, pre[0].ctx);
    sb_register(tnames[nt], bm_dtype_pair, &typed[nt], smoke ? 2 : 6);
    nt++;
    typed[nt] = pre[0];
    typed[nt].n_seqs = 0;
    typed[nt].wdt = 2;
    snprintf(tnames[nt], sizeof tnames[nt], "dtype_forward/%d/16/4/%d/2", pre[0].E, pre[0].ctx);
    sb_register(tnames[nt], bm_dtype_pair, &typed[nt], smoke ? 2 : 6);
    nt++;
    typed[nt] = dec[2]; /* E 2048, 16384 positions */
    snprintf(tnames[nt], sizeof tnames[nt], "dtype_memory/%d/16/4/%d", typed[nt].E, typed[nt].ctx);
    sb_register(tnames[nt], bm_dtype_memory, &typed[nt], 1);
    return sb_main(argc, argv);
}
