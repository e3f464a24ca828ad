/* End-to-end benchmarks through the public API, and the sgemm ceiling on the same shapes in the
 * same binary:
 *   forward/B/L/D/H/KV/causal/threads    selfattn_forward, GFLOP/s of the work actually needed
 *   ceiling/...                          the bare cblas_sgemm calls that forward needs
 *   pair/...                             both, alternating within each iteration, with the
 *                                        medians of each and their ratio as counters: on a shared,
 *                                        noisy machine this is the ratio to quote
 *   peak_memory/65536/128/2/causal       resident-memory high-water mark of one long forward
 * Run with --smoke for a quick pass over the small shapes (CI), or through bench/report. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <selfattn/selfattn.h>

#include "ceiling.h"
#include "shim.h"

typedef struct fcfg {
    int batch, seq, dm, heads, kv_heads, causal, threads;
} fcfg;

static const int shapes[][5] = {
    {1, 128, 768, 12, 12}, {8, 128, 768, 12, 12}, {1, 512, 768, 12, 12},  {1, 2048, 768, 12, 12},
    {1, 4096, 512, 8, 8},  {1, 8192, 512, 8, 8},  {1, 2048, 1024, 16, 4},
};
#define N_SHAPES (sizeof shapes / sizeof shapes[0])
static fcfg cfgs[N_SHAPES * 4];

static ce_shape to_shape(const fcfg *c)
{
    ce_shape s = {c->batch,    c->seq,           c->dm,     c->heads,
                  c->kv_heads, c->dm / c->heads, c->causal, c->threads};
    return s;
}

static float *filled(size_t n, unsigned seed)
{
    float *p = malloc(n * sizeof *p);
    if (!p)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        p[i] = (float)((seed >> 9) & 0xffff) / 65536.0f - 0.5f;
    }
    return p;
}

/* A layer with random weights; NULL on failure. */
static selfattn_layer *make_layer(const fcfg *c)
{
    selfattn_layer *l = NULL;
    const int hd = c->dm / c->heads;
    const size_t nq = (size_t)c->heads * hd, nkv = (size_t)c->kv_heads * hd, dm = (size_t)c->dm;
    /* U(-1/sqrt(in), 1/sqrt(in)), the nn.Linear initialisation range (filled gives [-1/2, 1/2)) */
    float *w = filled((nq + 2 * nkv) * dm + dm * nq, 7);
    if (w) {
        for (size_t i = 0; i < (nq + 2 * nkv) * dm; i++)
            w[i] *= 2.0f / sqrtf((float)dm);
        for (size_t i = (nq + 2 * nkv) * dm; i < (nq + 2 * nkv) * dm + dm * nq; i++)
            w[i] *= 2.0f / sqrtf((float)nq);
    }
    int ok = w && selfattn_layer_create(c->dm, c->heads, &l) == SELFATTN_OK &&
             selfattn_layer_set(l, SELFATTN_OPT_N_KV_HEADS, c->kv_heads) == SELFATTN_OK &&
             selfattn_layer_set(l, SELFATTN_OPT_CAUSAL, c->causal) == SELFATTN_OK &&
             selfattn_layer_set(l, SELFATTN_OPT_THREADS, c->threads) == SELFATTN_OK &&
             selfattn_layer_set_weight(l, SELFATTN_W_Q, w, (int64_t)(nq * dm)) == SELFATTN_OK &&
             selfattn_layer_set_weight(l, SELFATTN_W_K, w + nq * dm, (int64_t)(nkv * dm)) ==
                 SELFATTN_OK &&
             selfattn_layer_set_weight(l, SELFATTN_W_V, w + (nq + nkv) * dm, (int64_t)(nkv * dm)) ==
                 SELFATTN_OK &&
             selfattn_layer_set_weight(l, SELFATTN_W_O, w + (nq + 2 * nkv) * dm,
                                       (int64_t)(dm * nq)) == SELFATTN_OK &&
             selfattn_layer_set_weight(l, SELFATTN_B_Q, w, (int64_t)nq) == SELFATTN_OK;
    free(w);
    if (!ok) {
        selfattn_layer_destroy(l);
        return NULL;
    }
    return l;
}

static void bm_forward(sb_state *s, const void *arg)
{
    const fcfg *c = arg;
    selfattn_layer *l = make_layer(c);
    const size_t n = (size_t)c->batch * c->seq * c->dm;
    float *x = filled(n, 3), *y = malloc(n * sizeof *y);
    if (!l || !x || !y) {
        sb_skip_with_error(s, "set-up failed");
    } else {
        selfattn_status st = selfattn_forward(l, c->batch, c->seq, x, NULL, y); /* warm-up */
        while (st == SELFATTN_OK && sb_keep_running(s))
            st = selfattn_forward(l, c->batch, c->seq, x, NULL, y);
        if (st != SELFATTN_OK)
            sb_skip_with_error(s, selfattn_status_string(st));
        const ce_shape sh = to_shape(c);
        sb_counter_rate(s, "GFLOPs", ce_forward_flops(&sh) * 1e-9 * (double)sb_iterations(s));
        sb_label(s, selfattn_kernel_name());
    }
    free(x);
    free(y);
    selfattn_layer_destroy(l);
}

static void bm_ceiling(sb_state *s, const void *arg)
{
    const fcfg *c = arg;
    const ce_shape sh = to_shape(c);
    ce_ctx *ce = ce_create(&sh);
    if (!ce) {
        sb_skip_with_error(s, "set-up failed");
        return;
    }
    ce_run(ce);
    while (sb_keep_running(s))
        ce_run(ce);
    sb_counter_rate(s, "GFLOPs", ce_forward_flops(&sh) * 1e-9 * (double)sb_iterations(s));
    ce_destroy(ce);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

#define PAIR_MAX 256

/* Forward and ceiling alternately (which goes first alternates too, so neither always runs on
   the other's warm caches); the ratio of the medians is read off one benchmark. */
static void bm_pair(sb_state *s, const void *arg)
{
    const fcfg *c = arg;
    const ce_shape sh = to_shape(c);
    selfattn_layer *l = make_layer(c);
    ce_ctx *ce = ce_create(&sh);
    const size_t n = (size_t)c->batch * c->seq * c->dm;
    float *x = filled(n, 3), *y = malloc(n * sizeof *y);
    static double tf[PAIR_MAX], tc[PAIR_MAX];
    int k = 0;
    selfattn_status st = SELFATTN_ERR_NOMEM;
    if (l && ce && x && y) {
        st = selfattn_forward(l, c->batch, c->seq, x, NULL, y); /* warm-up */
        ce_run(ce);
        while (st == SELFATTN_OK && sb_keep_running(s)) {
            double fwd, ceil;
            const double t0 = now_s();
            if (k % 2 == 0) {
                st = selfattn_forward(l, c->batch, c->seq, x, NULL, y);
                const double t1 = now_s();
                ce_run(ce);
                fwd = t1 - t0;
                ceil = now_s() - t1;
            } else {
                ce_run(ce);
                const double t1 = now_s();
                st = selfattn_forward(l, c->batch, c->seq, x, NULL, y);
                ceil = t1 - t0;
                fwd = now_s() - t1;
            }
            if (k < PAIR_MAX) {
                tf[k] = fwd;
                tc[k] = ceil;
            }
            k++;
        }
    }
    if (st != SELFATTN_OK || k == 0) {
        sb_skip_with_error(s, st != SELFATTN_OK ? selfattn_status_string(st) : "no iteration");
    } else {
        const int m = k < PAIR_MAX ? k : PAIR_MAX;
        const double f = median(tf, m), g = median(tc, m), flops = ce_forward_flops(&sh);
        sb_counter(s, "fwd_ms", f * 1e3);
        sb_counter(s, "ceil_ms", g * 1e3);
        sb_counter(s, "fwd_GFLOPs", flops / f * 1e-9);
        sb_counter(s, "ceil_GFLOPs", flops / g * 1e-9);
        sb_counter(s, "ratio", g / f);
    }
    free(x);
    free(y);
    ce_destroy(ce);
    selfattn_layer_destroy(l);
}

/* Resident high-water mark (VmHWM), after resetting it through /proc/self/clear_refs. */
static double vm_hwm_mib(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    double kib = -1;
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, "VmHWM:", 6) == 0)
            kib = strtod(line + 6, NULL);
    if (f)
        fclose(f);
    return kib / 1024.0;
}

static void reset_hwm(void)
{
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (f) {
        fputs("5", f);
        fclose(f);
    }
}

static const fcfg mem_cfg = {1, 65536, 128, 2, 2, 1, 1};

static void bm_peak_memory(sb_state *s, const void *arg)
{
    const fcfg *c = arg;
    const size_t n = (size_t)c->batch * c->seq * c->dm;
    selfattn_layer *l = make_layer(c);
    float *x = filled(n, 5), *y = calloc(n, sizeof *y);
    double base = 0, peak = 0;
    selfattn_status st = SELFATTN_ERR_NOMEM;
    if (l && x && y) {
        while (sb_keep_running(s)) {
            sb_pause(s);
            reset_hwm();
            base = vm_hwm_mib();
            sb_resume(s);
            st = selfattn_forward(l, c->batch, c->seq, x, NULL, y);
            sb_pause(s);
            peak = vm_hwm_mib();
            sb_resume(s);
        }
    }
    if (st != SELFATTN_OK)
        sb_skip_with_error(s, selfattn_status_string(st));
    sb_counter(s, "peak_MiB", peak);
    sb_counter(s, "before_MiB", base);
    /* what an L x L score matrix for all heads would take */
    sb_counter(s, "LxL_MiB", (double)c->seq * c->seq * c->heads * 4.0 / 1048576.0);
    free(x);
    free(y);
    selfattn_layer_destroy(l);
}

int main(int argc, char **argv)
{
    const int smoke = sb_smoke(argc, argv);
    static char names[N_SHAPES * 4][3][96];
    size_t k = 0;
    for (size_t i = 0; i < N_SHAPES; i++)
        for (int causal = 0; causal <= 1; causal++)
            for (int threads = 1; threads <= 2; threads++, k++) {
                fcfg *c = &cfgs[k];
                c->batch = shapes[i][0];
                c->seq = shapes[i][1];
                c->dm = shapes[i][2];
                c->heads = shapes[i][3];
                c->kv_heads = shapes[i][4];
                c->causal = causal;
                c->threads = threads;
                if (smoke && c->seq > 512)
                    continue;
                static const char *kinds[3] = {"forward", "ceiling", "pair"};
                static const sb_fn fns[3] = {bm_forward, bm_ceiling, bm_pair};
                /* pair: about 20 GFLOP of forward passes, 5 to 40 iterations */
                const ce_shape sh = to_shape(c);
                int64_t pair_iters = (int64_t)(20e9 / ce_forward_flops(&sh));
                pair_iters = pair_iters < 5 ? 5 : pair_iters > 40 ? 40 : pair_iters;
                for (int kind = 0; kind < 3; kind++) {
                    snprintf(names[k][kind], sizeof names[k][kind], "%s/%d/%d/%d/%d/%d/%s/%d",
                             kinds[kind], c->batch, c->seq, c->dm, c->heads, c->kv_heads,
                             causal ? "causal" : "full", threads);
                    sb_register(names[k][kind], fns[kind], c,
                                kind == 2 ? (smoke ? 1 : pair_iters) : 0);
                }
            }
    if (!smoke)
        sb_register("peak_memory/1/65536/128/2/2/causal/1", bm_peak_memory, &mem_cfg, 1);
    return sb_main(argc, argv);
}
