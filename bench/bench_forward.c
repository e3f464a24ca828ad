/* End-to-end benchmarks through the public API, and the sgemm ceiling (ceiling.h: the fastest
 * bare-BLAS formulation of the same FLOPs) in the same binary:
 *   forward/B/L/D/H/KV/mask/threads      selfattn_forward, GFLOP/s of the work actually needed
 *   ceiling/...                          the forward ceiling alone (label: its formulation)
 *   pair/...                             both, alternating within each iteration, with the
 *                                        medians of each and their ratio (ceiling time / forward
 *                                        time) as counters: on a shared, noisy machine this is
 *                                        the ratio to quote
 *   attend_pair/1/L/H/D/mask/threads     selfattn_attend vs the attention-only ceiling, the same
 *                                        way (ratio = ceiling time / attend time)
 *   decode_pair/1/1/E/H/threads          one token (batch 1, seq_len 1) through selfattn_forward
 *                                        vs its bare BLAS calls, in microseconds; here
 *                                        ratio = forward time / ceiling time (>= 1 is slower)
 *   peak_memory/1/65536/128/2/2/causal/1 resident-memory high-water mark of one long forward
 *   blas_threads_pair/1/L/D/H/full/2     the same forward (2 threads allowed) with OpenBLAS at 1
 *                                        thread (the library's 2 workers run it) and at 2 (one
 *                                        worker, OpenBLAS's threads run the products),
 *                                        alternating; ratio = 2-thread time / 1-thread time
 * The ceiling includes nothing from the library's sources and makes its own choices (layout,
 * blocks, threads): a ceiling that shared the library's choices would measure the library against
 * itself.
 * Run with --smoke for a quick pass over the small shapes (CI), or through bench/report. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <selfattn/selfattn.h>

#include "bench_util.h"
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
    return (ce_shape){.batch = c->batch,
                      .seq_len = c->seq,
                      .d_model = c->dm,
                      .n_heads = c->heads,
                      .n_kv_heads = c->kv_heads,
                      .head_dim = c->dm / c->heads,
                      .causal = c->causal,
                      .threads = c->threads};
}

/* The layer of a configuration (random weights and a B_Q bias). */
static selfattn_layer *layer_of(const fcfg *c)
{
    return sb_make_layer(&(sb_layer_opts){.d_model = c->dm,
                                          .n_heads = c->heads,
                                          .n_kv_heads = c->kv_heads,
                                          .causal = c->causal,
                                          .threads = c->threads,
                                          .biases = SB_BIAS_Q});
}

static void bm_forward(sb_state *s, const void *arg)
{
    const fcfg *c = arg;
    selfattn_layer *l = layer_of(c);
    const size_t n = (size_t)c->batch * c->seq * c->dm;
    float *x = sb_filled(n, 0.5f, 3), *y = malloc(n * sizeof *y);
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
    sb_label(s, ce_formulation(ce));
    ce_destroy(ce);
}

static int run_ceiling(void *ce)
{
    ce_run(ce);
    return 0;
}

/* The library call of a pair (returning its status) and the ceiling side by side (sb_alternate);
   medians in *t_lib and *t_ceil. Returns the library's status, or NOMEM when nothing ran. */
static selfattn_status pair_loop(sb_state *s, sb_call_fn lib, void *ctx, ce_ctx *ce, double *t_lib,
                                 double *t_ceil)
{
    const int st = sb_alternate(s, lib, ctx, run_ceiling, ce, t_lib, t_ceil);
    return st < 0 ? SELFATTN_ERR_NOMEM : (selfattn_status)st;
}

typedef struct fwd_call {
    const selfattn_layer *l;
    int batch, seq;
    const float *x;
    float *y;
} fwd_call;

static int call_forward(void *p)
{
    const fwd_call *f = p;
    return selfattn_forward(f->l, f->batch, f->seq, f->x, NULL, f->y);
}

/* pair/: forward and the forward ceiling; ratio = ceiling time / forward time (the fraction of
   the ceiling the forward reaches). */
static void bm_pair(sb_state *s, const void *arg)
{
    const fcfg *c = arg;
    const ce_shape sh = to_shape(c);
    selfattn_layer *l = layer_of(c);
    ce_ctx *ce = ce_create(&sh);
    const size_t n = (size_t)c->batch * c->seq * c->dm;
    float *x = sb_filled(n, 0.5f, 3), *y = malloc(n * sizeof *y);
    selfattn_status st = SELFATTN_ERR_NOMEM;
    double f = 0, g = 0;
    if (l && ce && x && y) {
        fwd_call call = {.l = l, .batch = c->batch, .seq = c->seq, .x = x, .y = y};
        st = pair_loop(s, call_forward, &call, ce, &f, &g);
    }
    if (st != SELFATTN_OK) {
        sb_skip_with_error(s, selfattn_status_string(st));
    } else {
        const double flops = ce_forward_flops(&sh);
        sb_counter(s, "fwd_ms", f * 1e3);
        sb_counter(s, "ceil_ms", g * 1e3);
        sb_counter(s, "fwd_GFLOPs", flops / f * 1e-9);
        sb_counter(s, "ceil_GFLOPs", flops / g * 1e-9);
        sb_counter(s, "ratio", g / f);
        sb_label(s, ce_formulation(ce));
    }
    free(x);
    free(y);
    ce_destroy(ce);
    selfattn_layer_destroy(l);
}

/* ---- blas_threads_pair: the library's workers against OpenBLAS's threads ------------------ */

static int call_forward_blas1(void *p)
{
    sb_blas_set_threads(1);
    return call_forward(p);
}

static int call_forward_blas2(void *p)
{
    sb_blas_set_threads(2);
    return call_forward(p);
}

static void bm_blas_threads_pair(sb_state *s, const void *arg)
{
    const fcfg *c = arg;
    if (!sb_blas_set_threads(1)) {
        sb_skip_with_error(s, "the BLAS is not OpenBLAS");
        return;
    }
    selfattn_layer *l = layer_of(c);
    const size_t n = (size_t)c->batch * c->seq * c->dm;
    float *x = sb_filled(n, 0.5f, 3), *y = malloc(n * sizeof *y);
    int st = SELFATTN_ERR_NOMEM;
    double t1 = 0, t2 = 0;
    if (l && x && y) {
        fwd_call call = {.l = l, .batch = c->batch, .seq = c->seq, .x = x, .y = y};
        st = sb_alternate(s, call_forward_blas1, &call, call_forward_blas2, &call, &t1, &t2);
        st = st < 0 ? SELFATTN_ERR_NOMEM : st;
    }
    sb_blas_set_threads(1); /* as the other benchmarks run */
    if (st != SELFATTN_OK) {
        sb_skip_with_error(s, selfattn_status_string((selfattn_status)st));
    } else {
        sb_counter(s, "blas1_ms", t1 * 1e3);
        sb_counter(s, "blas2_ms", t2 * 1e3);
        sb_counter(s, "ratio", t2 / t1);
    }
    free(x);
    free(y);
    selfattn_layer_destroy(l);
}

/* ---- attend_pair/1/L/H/D/mask/threads: selfattn_attend vs the attention-only ceiling ------- */

typedef struct acfg {
    int seq, heads, hd, causal, threads;
} acfg;

static const int attend_shapes[][3] = {{2048, 12, 64}, {4096, 12, 64}, {4096, 8, 64}};
static const int attend_smoke_shapes[][3] = {{512, 12, 64}};
#define N_ATTEND 3
static acfg acfgs[N_ATTEND * 4];

static ce_shape attend_shape(const acfg *c)
{
    return (ce_shape){.batch = 1,
                      .seq_len = c->seq,
                      .d_model = c->heads * c->hd,
                      .n_heads = c->heads,
                      .n_kv_heads = c->heads,
                      .head_dim = c->hd,
                      .causal = c->causal,
                      .threads = c->threads};
}

typedef struct att_call {
    const selfattn_layer *l;
    int seq;
    const float *q, *k, *v;
    float *out;
} att_call;

static int call_attend(void *p)
{
    const att_call *a = p;
    return selfattn_attend(a->l, 1, a->seq, a->seq, a->q, a->k, a->v, NULL, a->out);
}

/* ratio = ceiling time / attend time, as for pair/. */
static void bm_attend_pair(sb_state *s, const void *arg)
{
    const acfg *c = arg;
    const ce_shape sh = attend_shape(c);
    selfattn_layer *l = NULL;
    /* attend needs no weights: d_model = H * D gives head_dim D */
    int ok = selfattn_layer_create(c->heads * c->hd, c->heads, &l) == SELFATTN_OK &&
             selfattn_layer_set(l, SELFATTN_OPT_CAUSAL, c->causal) == SELFATTN_OK &&
             selfattn_layer_set(l, SELFATTN_OPT_THREADS, c->threads) == SELFATTN_OK;
    ce_ctx *ce = ok ? ce_create_attend(&sh) : NULL;
    const size_t n = (size_t)c->seq * c->heads * c->hd;
    float *q = sb_filled(n, 0.5f, 11), *k = sb_filled(n, 0.5f, 12), *v = sb_filled(n, 0.5f, 13);
    float *out = malloc(n * sizeof *out);
    selfattn_status st = SELFATTN_ERR_NOMEM;
    double f = 0, g = 0;
    if (ok && ce && q && k && v && out) {
        att_call call = {.l = l, .seq = c->seq, .q = q, .k = k, .v = v, .out = out};
        st = pair_loop(s, call_attend, &call, ce, &f, &g);
    }
    if (st != SELFATTN_OK) {
        sb_skip_with_error(s, selfattn_status_string(st));
    } else {
        const double flops = ce_attend_flops(&sh);
        sb_counter(s, "attend_ms", f * 1e3);
        sb_counter(s, "ceil_ms", g * 1e3);
        sb_counter(s, "attend_GFLOPs", flops / f * 1e-9);
        sb_counter(s, "ceil_GFLOPs", flops / g * 1e-9);
        sb_counter(s, "ratio", g / f);
        sb_label(s, ce_formulation(ce));
    }
    free(q);
    free(k);
    free(v);
    free(out);
    ce_destroy(ce);
    selfattn_layer_destroy(l);
}

/* ---- decode_pair/1/1/E/H/threads: one token through the whole layer ----------------------- */

static const int decode_shapes[][2] = {{768, 12}, {2048, 16}};
#define N_DECODE 2
static fcfg dcfgs[N_DECODE * 2];

/* Here ratio = forward time / ceiling time (how many times slower than its bare BLAS calls the
   forward is: 1.0 is the ceiling, larger is slower), since at this size the fixed costs of a
   call are the point. */
static void bm_decode_pair(sb_state *s, const void *arg)
{
    const fcfg *c = arg;
    const ce_shape sh = to_shape(c);
    selfattn_layer *l = layer_of(c);
    ce_ctx *ce = ce_create(&sh);
    float *x = sb_filled((size_t)c->dm, 0.5f, 3), *y = malloc((size_t)c->dm * sizeof *y);
    selfattn_status st = SELFATTN_ERR_NOMEM;
    double f = 0, g = 0;
    if (l && ce && x && y) {
        fwd_call call = {.l = l, .batch = 1, .seq = 1, .x = x, .y = y};
        st = pair_loop(s, call_forward, &call, ce, &f, &g);
    }
    if (st != SELFATTN_OK) {
        sb_skip_with_error(s, selfattn_status_string(st));
    } else {
        sb_counter(s, "fwd_us", f * 1e6);
        sb_counter(s, "ceil_us", g * 1e6);
        sb_counter(s, "ratio", f / g);
        sb_label(s, ce_formulation(ce));
    }
    free(x);
    free(y);
    ce_destroy(ce);
    selfattn_layer_destroy(l);
}

static const fcfg mem_cfg = {
    .batch = 1, .seq = 65536, .dm = 128, .heads = 2, .kv_heads = 2, .causal = 1, .threads = 1};

static void bm_peak_memory(sb_state *s, const void *arg)
{
    const fcfg *c = arg;
    const size_t n = (size_t)c->batch * c->seq * c->dm;
    selfattn_layer *l = layer_of(c);
    float *x = sb_filled(n, 0.5f, 5), *y = calloc(n, sizeof *y);
    double base = 0, peak = 0;
    selfattn_status st = SELFATTN_ERR_NOMEM;
    if (l && x && y) {
        while (sb_keep_running(s)) {
            sb_pause(s);
            sb_reset_peak_rss();
            base = sb_peak_rss_mib();
            sb_resume(s);
            st = selfattn_forward(l, c->batch, c->seq, x, NULL, y);
            sb_pause(s);
            peak = sb_peak_rss_mib();
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
    sb_blas_setup();
    const int smoke = sb_smoke(argc, argv);
    ce_quick_calibration(smoke);
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

    /* attention alone: the long sequences (512 only in --smoke) */
    static char anames[N_ATTEND * 4][96];
    const int n_att = smoke ? 1 : N_ATTEND;
    k = 0;
    for (int i = 0; i < n_att; i++)
        for (int causal = 0; causal <= 1; causal++)
            for (int threads = 1; threads <= 2; threads++, k++) {
                const int *a = smoke ? attend_smoke_shapes[i] : attend_shapes[i];
                acfg *c = &acfgs[k];
                c->seq = a[0];
                c->heads = a[1];
                c->hd = a[2];
                c->causal = causal;
                c->threads = threads;
                /* about 10 GFLOP of attention per side, 3 to 40 iterations */
                const ce_shape sh = attend_shape(c);
                int64_t iters = (int64_t)(10e9 / ce_attend_flops(&sh));
                iters = iters < 3 ? 3 : iters > 40 ? 40 : iters;
                snprintf(anames[k], sizeof anames[k], "attend_pair/1/%d/%d/%d/%s/%d", c->seq,
                         c->heads, c->hd, causal ? "causal" : "full", threads);
                sb_register(anames[k], bm_attend_pair, c, smoke ? 1 : iters);
            }

    /* decode: one token, where the fixed costs of a call dominate */
    static char dnames[N_DECODE * 2][96];
    k = 0;
    for (int i = 0; i < N_DECODE; i++)
        for (int threads = 1; threads <= 2; threads++, k++) {
            fcfg *c = &dcfgs[k];
            c->batch = 1;
            c->seq = 1;
            c->dm = decode_shapes[i][0];
            c->heads = c->kv_heads = decode_shapes[i][1];
            c->causal = 0;
            c->threads = threads;
            snprintf(dnames[k], sizeof dnames[k], "decode_pair/1/1/%d/%d/%d", c->dm, c->heads,
                     threads);
            sb_register(dnames[k], bm_decode_pair, c, smoke ? 20 : 2000);
        }

    if (!smoke)
        sb_register("peak_memory/1/65536/128/2/2/causal/1", bm_peak_memory, &mem_cfg, 1);

    static fcfg blas_cfg = {.batch = 1, .dm = 768, .heads = 12, .kv_heads = 12, .threads = 2};
    static char bname[96];
    blas_cfg.seq = smoke ? 256 : 2048;
    snprintf(bname, sizeof bname, "blas_threads_pair/1/%d/768/12/full/2", blas_cfg.seq);
    sb_register(bname, bm_blas_threads_pair, &blas_cfg, smoke ? 1 : 15);
    return sb_main(argc, argv);
}
