/* Benchmarks of the backward pass through the public API:
 *   bwd_pair/B/L/E/H/mask/threads   selfattn_backward (dx and every weight gradient) and
 *                                   selfattn_forward alternating within each iteration; medians
 *                                   of each and ratio = backward time / forward time
 *   bwd_ceiling/B/L/E/H/mask/threads  selfattn_backward against the bare sgemm calls a
 *                                   recomputing FlashAttention-2 backward needs, on warm buffers:
 *                                   in projection, dO = dY W_O, dW_O, dW_QKV, dX, and per head and
 *                                   query block S = Q K^T, O = S V (the forward), S = Q K^T,
 *                                   dP = dO V^T, dV += S^T dO, dK += dP^T Q, dQ = dP K, with no
 *                                   softmax or elementwise work, future blocks skipped under a
 *                                   causal mask; ratio = ceiling time / backward time (the
 *                                   fraction of the ceiling reached). The library's single pass
 *                                   does these same 7 attention products (each 2 L^2 H D FLOPs);
 *                                   shapes with fewer than 4 (sequence, key/value head) pairs take
 *                                   two passes and 8.
 *   bwd_train_pair/B/L/E/H/mask/threads   selfattn_backward_train and selfattn_forward_train (the
 *                                   kept-activation pair of 1.2) alternating; ratio = backward /
 *                                   forward, fwd_plain_ms a plain selfattn_forward in the same run
 *   bwd_train_ceiling/B/L/E/H/mask/threads  selfattn_backward_train against the bare sgemm calls
 *                                   of a backward that keeps Q, K, V, O and lse: the ceiling
 *                                   above without the input projection and the forward's two
 *                                   attention products (8 projection and 5 attention products)
 *   bwd_train_threads/B/L/E/H/mask/2   selfattn_backward_train on a 1-thread layer and on a
 *                                   2-thread layer (each with its own state, filled once)
 *                                   alternating; speedup = 1-thread time / 2-thread time (the
 *                                   process's BLAS is single-threaded: the library's workers call
 *                                   it each on their own shapes); cores_1t, cores_nt = process
 *                                   CPU time / wall time of each side, cpu_ratio = 2-thread /
 *                                   1-thread CPU time (medians)
 *   bwd_peak_memory/1/65536/128/2/causal/2   resident high-water mark of one causal backward
 *                                   and of one forward of the same shape, and their ratio
 * Run with --smoke for a quick pass (small shapes). --seq=N[,N...] replaces L = 2048 of the pair
 * and ceiling benchmarks by those lengths (for the backward/forward ratio against L that
 * bench/plot.py draws). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cblas.h>
#include <selfattn/selfattn.h>

#include "bench_util.h"
#include "shim.h"

typedef struct bcfg {
    int batch, seq, dm, heads, causal, threads;
    int kept; /* the 1.2 train state's pair instead of forward / backward */
} bcfg;

/* The layer of a configuration (random weights and all four biases, whose gradients are timed). */
static selfattn_layer *layer_of(const bcfg *c)
{
    return sb_make_layer(&(sb_layer_opts){.d_model = c->dm,
                                          .n_heads = c->heads,
                                          .causal = c->causal,
                                          .threads = c->threads,
                                          .biases = SB_BIAS_ALL});
}

/* Everything one backward call needs, allocated and touched once. */
typedef struct bwd_ctx {
    const bcfg *c;
    selfattn_layer *l;
    float *x, *y, *dy, *dx, *g[8];
    selfattn_grads grads;
    void *state; /* the train state, for the 1.2 pair */
    size_t state_bytes;
} bwd_ctx;

static int bwd_ctx_make(bwd_ctx *b, const bcfg *c)
{
    memset(b, 0, sizeof *b);
    b->c = c;
    const size_t n = (size_t)c->batch * c->seq * c->dm, dm = (size_t)c->dm;
    b->l = layer_of(c);
    b->x = sb_filled(n, 1.0f, 3);
    b->dy = sb_filled(n, 0.01f, 5);
    b->y = calloc(n, sizeof(float));
    b->dx = calloc(n, sizeof(float));
    int ok = b->l && b->x && b->dy && b->y && b->dx;
    for (int i = 0; i < 8; i++) {
        b->g[i] = calloc(i < 4 ? dm * dm : dm, sizeof(float));
        ok = ok && b->g[i];
    }
    b->grads = (selfattn_grads){.struct_size = sizeof(selfattn_grads),
                                .w_q = b->g[0],
                                .w_k = b->g[1],
                                .w_v = b->g[2],
                                .w_o = b->g[3],
                                .b_q = b->g[4],
                                .b_k = b->g[5],
                                .b_v = b->g[6],
                                .b_o = b->g[7]};
    if (ok && selfattn_train_state_size(b->l, c->batch, c->seq, &b->state_bytes) == SELFATTN_OK)
        b->state = calloc(1, b->state_bytes);
    return ok && b->state != NULL;
}

static void bwd_ctx_free(bwd_ctx *b)
{
    selfattn_layer_destroy(b->l);
    free(b->x);
    free(b->y);
    free(b->dy);
    free(b->dx);
    free(b->state);
    for (int i = 0; i < 8; i++)
        free(b->g[i]);
}

static selfattn_status run_backward(const bwd_ctx *b)
{
    return selfattn_backward(b->l, b->c->batch, b->c->seq, b->x, NULL, b->dy, b->dx, &b->grads);
}

static selfattn_status run_forward(const bwd_ctx *b)
{
    return selfattn_forward(b->l, b->c->batch, b->c->seq, b->x, NULL, b->y);
}

static selfattn_status run_forward_train(const bwd_ctx *b)
{
    return selfattn_forward_train(b->l, b->c->batch, b->c->seq, b->x, NULL, b->y, b->state,
                                  b->state_bytes);
}

static selfattn_status run_backward_train(const bwd_ctx *b)
{
    return selfattn_backward_train(b->l, b->c->batch, b->c->seq, b->x, NULL, b->dy, b->dx,
                                   &b->grads, b->state, b->state_bytes);
}

/* FLOPs of one attention product: 2 L^2 H D (an L x L x D product per head), halved (plus the
   diagonal) under a causal mask. */
static double attn_unit(const bcfg *c)
{
    const double pairs = c->causal ? 0.5 * c->seq * (c->seq + 1.0) : (double)c->seq * c->seq;
    return 2.0 * c->batch * pairs * c->dm;
}

/* The projections of a backward: QKV = X W^T, dO = dY W_O, dW_O, dW_QKV, dX. */
static double proj_flops(const bcfg *c)
{
    const double rows = (double)c->batch * c->seq, dm = c->dm;
    return 2.0 * rows * dm * dm * (3 + 1 + 1 + 3 + 3);
}

/* ---- The bare-sgemm ceiling ---- */
typedef struct ceil_ctx {
    const bcfg *c;
    int hd, bq;
    int kept; /* Q, K, V, O and lse kept from the forward: no input projection, no S V */
    float *x, *w, *qkv, *dqkv, *dy, *wo, *dwo, *dwqkv, *dx, *attn, *dattn;
    float *q, *k, *v, *o, *dout, *dq, *dk, *dv; /* per head [H][L][hd] */
    float *s, *dp;                             /* one block: bq x L */
} ceil_ctx;

static int ceil_make(ceil_ctx *e, const bcfg *c)
{
    memset(e, 0, sizeof *e);
    e->c = c;
    e->hd = c->dm / c->heads;
    e->bq = 256;
    const size_t L = (size_t)c->seq, dm = (size_t)c->dm, hl = (size_t)c->heads * L * e->hd;
    float **bufs[] = {&e->x, &e->w, &e->qkv, &e->dqkv, &e->dy, &e->wo, &e->dwo, &e->dwqkv, &e->dx,
                      &e->attn, &e->dattn, &e->q, &e->k, &e->v, &e->o, &e->dout, &e->dq, &e->dk,
                      &e->dv, &e->s, &e->dp};
    const size_t sizes[] = {L * dm, 3 * dm * dm, L * 3 * dm, L * 3 * dm, L * dm, dm * dm, dm * dm,
                            3 * dm * dm, L * dm, L * dm, L * dm, hl, hl, hl, hl, hl, hl, hl, hl,
                            (size_t)e->bq * L, (size_t)e->bq * L};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        *bufs[i] = sb_filled(sizes[i], 0.05f, 11 + (unsigned)i);
        if (!*bufs[i])
            return 0;
    }
    return 1;
}

static void ceil_free(ceil_ctx *e)
{
    float *bufs[] = {e->x,    e->w,     e->qkv, e->dqkv, e->dy, e->wo, e->dwo,
                     e->dwqkv, e->dx,   e->attn, e->dattn, e->q, e->k,  e->v,
                     e->o,    e->dout, e->dq,  e->dk,   e->dv, e->s,  e->dp};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        free(bufs[i]);
}

static void ceil_run(const ceil_ctx *e)
{
    const int L = e->c->seq, dm = e->c->dm, hd = e->hd;
    const CBLAS_LAYOUT R = CblasRowMajor;
    const CBLAS_TRANSPOSE N = CblasNoTrans, T = CblasTrans;
    if (!e->kept)
        cblas_sgemm(R, N, T, L, 3 * dm, dm, 1, e->x, dm, e->w, dm, 0, e->qkv, 3 * dm);
    cblas_sgemm(R, N, N, L, dm, dm, 1, e->dy, dm, e->wo, dm, 0, e->dattn, dm);
    for (int h = 0; h < e->c->heads; h++) {
        const size_t off = (size_t)h * L * hd;
        const float *q = e->q + off, *k = e->k + off, *v = e->v + off, *go = e->dout + off;
        float *o = e->o + off, *dq = e->dq + off, *dk = e->dk + off, *dv = e->dv + off;
        for (int i0 = 0; i0 < L; i0 += e->bq) {
            const int mb = L - i0 < e->bq ? L - i0 : e->bq;
            const int nk = e->c->causal ? i0 + mb : L;
            const float *qb = q + (size_t)i0 * hd, *gb = go + (size_t)i0 * hd;
            if (!e->kept) {
                cblas_sgemm(R, N, T, mb, nk, hd, 1, qb, hd, k, hd, 0, e->s, nk);
                cblas_sgemm(R, N, N, mb, hd, nk, 1, e->s, nk, v, hd, 0, o + (size_t)i0 * hd, hd);
            }
            cblas_sgemm(R, N, T, mb, nk, hd, 1, qb, hd, k, hd, 0, e->s, nk);
            cblas_sgemm(R, N, T, mb, nk, hd, 1, gb, hd, v, hd, 0, e->dp, nk);
            cblas_sgemm(R, T, N, nk, hd, mb, 1, e->s, nk, gb, hd, i0 > 0, dv, hd);
            cblas_sgemm(R, T, N, nk, hd, mb, 1, e->dp, nk, qb, hd, i0 > 0, dk, hd);
            cblas_sgemm(R, N, N, mb, hd, nk, 1, e->dp, nk, k, hd, 0, dq + (size_t)i0 * hd, hd);
        }
    }
    cblas_sgemm(R, T, N, dm, dm, L, 1, e->dy, dm, e->attn, dm, 0, e->dwo, dm);
    cblas_sgemm(R, T, N, 3 * dm, dm, L, 1, e->dqkv, 3 * dm, e->x, dm, 0, e->dwqkv, dm);
    cblas_sgemm(R, N, N, L, dm, 3 * dm, 1, e->dqkv, 3 * dm, e->w, dm, 0, e->dx, dm);
}

/* Each side of a pair, for sb_alternate: a call's status (0: SELFATTN_OK). */
static int side_backward(void *ctx)
{
    return (int)run_backward(ctx);
}

static int side_forward(void *ctx)
{
    return (int)run_forward(ctx);
}

static int side_backward_train(void *ctx)
{
    return (int)run_backward_train(ctx);
}

static int side_forward_train(void *ctx)
{
    return (int)run_forward_train(ctx);
}

static int side_ceiling(void *ctx)
{
    ceil_run(ctx);
    return 0;
}

/* The library's status of a pair (NOMEM when nothing ran). */
static selfattn_status alternate(sb_state *s, sb_call_fn fa, void *ca, sb_call_fn fb, void *cb,
                                 double *ta, double *tb)
{
    const int st = sb_alternate(s, fa, ca, fb, cb, ta, tb);
    return st < 0 ? SELFATTN_ERR_NOMEM : (selfattn_status)st;
}

/* The attention and projection FLOPs of the backward c describes: with kept activations no input
   projection (8 of the 11 projection products) and no forward (5 of the 7 attention products). */
static double bwd_flops(const bcfg *c)
{
    return c->kept ? proj_flops(c) * 8.0 / 11.0 + 5 * attn_unit(c)
                   : proj_flops(c) + 7 * attn_unit(c);
}

/* The backward and its own forward alternating: selfattn_backward and selfattn_forward, or (kept)
   selfattn_backward_train and selfattn_forward_train, the forward refilling the state the backward
   reads as a training loop does, and then a plain forward for reference (median of 7 calls). */
static void bm_pair(sb_state *s, const void *arg)
{
    const bcfg *c = arg;
    bwd_ctx b;
    double tb = 0, tf = 0, tp = 0;
    selfattn_status st = SELFATTN_ERR_NOMEM;
    if (bwd_ctx_make(&b, c) && run_forward_train(&b) == SELFATTN_OK) { /* a state to start */
        st = alternate(s, c->kept ? side_backward_train : side_backward, &b,
                       c->kept ? side_forward_train : side_forward, &b, &tb, &tf);
        double t[7];
        for (int i = 0; i < 7 && st == SELFATTN_OK && c->kept; i++) {
            const double t0 = sb_now_s();
            st = run_forward(&b);
            t[i] = sb_now_s() - t0;
        }
        if (st == SELFATTN_OK && c->kept)
            tp = sb_median(t, 7);
    }
    if (st != SELFATTN_OK) {
        sb_skip_with_error(s, selfattn_status_string(st));
    } else {
        sb_counter(s, "bwd_ms", tb * 1e3);
        sb_counter(s, c->kept ? "fwd_train_ms" : "fwd_ms", tf * 1e3);
        if (c->kept)
            sb_counter(s, "fwd_plain_ms", tp * 1e3);
        sb_counter(s, "ratio", tb / tf);
        sb_counter(s, "bwd_GFLOPs", bwd_flops(c) / tb * 1e-9);
        sb_label(s, c->kept ? "ratio = backward_train / forward_train"
                            : "ratio = backward / forward");
    }
    bwd_ctx_free(&b);
}

static void bm_ceiling(sb_state *s, const void *arg)
{
    const bcfg *c = arg;
    bwd_ctx b;
    ceil_ctx e;
    double tb = 0, tc = 0;
    selfattn_status st = SELFATTN_ERR_NOMEM;
    const int ok = bwd_ctx_make(&b, c) && ceil_make(&e, c) && run_forward_train(&b) == SELFATTN_OK;
    e.kept = c->kept;
    if (ok)
        st = alternate(s, c->kept ? side_backward_train : side_backward, &b, side_ceiling, &e, &tb,
                       &tc);
    if (st != SELFATTN_OK) {
        sb_skip_with_error(s, selfattn_status_string(st));
    } else {
        sb_counter(s, "bwd_ms", tb * 1e3);
        sb_counter(s, "ceil_ms", tc * 1e3);
        sb_counter(s, "ratio", tc / tb);
        sb_counter(s, "ceil_GFLOPs", bwd_flops(c) / tc * 1e-9);
        sb_label(s, "ratio = ceiling / backward");
    }
    bwd_ctx_free(&b);
    ceil_free(&e);
}

/* One side of bwd_train_threads: the process's CPU time of each call (all its threads), so that
   CPU time / wall time tells how many cores the call actually got. */
typedef struct thr_side {
    bwd_ctx *b;
    int n;
    double cpu[512];
} thr_side;

static double process_cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int side_backward_train_cpu(void *ctx)
{
    thr_side *t = ctx;
    const double c0 = process_cpu_s();
    const int st = side_backward_train(t->b);
    if (t->n < (int)(sizeof t->cpu / sizeof t->cpu[0]))
        t->cpu[t->n++] = process_cpu_s() - c0;
    return st;
}

/* The same kept-activation backward on 1 and on c->threads threads, alternating. Besides the
   speed-up, the CPU time of each side: cores_* = CPU time / wall time (on a machine shared with
   other sessions the n-thread side may get no more than one core's worth: the kernel's autogroup
   scheduling shares CPU between sessions, not threads) and cpu_ratio = n-thread / 1-thread CPU
   time, the work the extra threads add; speed-up with n free cores is at most n / cpu_ratio. */
static void bm_threads(sb_state *s, const void *arg)
{
    const bcfg *c = arg;
    bcfg c1 = *c;
    c1.threads = 1;
    bwd_ctx b1, bn;
    static thr_side s1, sn;
    double t1 = 0, tn = 0;
    selfattn_status st = SELFATTN_ERR_NOMEM;
    const int ok1 = bwd_ctx_make(&b1, &c1), okn = bwd_ctx_make(&bn, c);
    s1 = (thr_side){.b = &b1};
    sn = (thr_side){.b = &bn};
    if (ok1 && okn && run_forward_train(&b1) == SELFATTN_OK &&
        run_forward_train(&bn) == SELFATTN_OK)
        st = alternate(s, side_backward_train_cpu, &s1, side_backward_train_cpu, &sn, &t1, &tn);
    if (st != SELFATTN_OK) {
        sb_skip_with_error(s, selfattn_status_string(st));
    } else {
        const double cpu1 = sb_median(s1.cpu, s1.n), cpun = sb_median(sn.cpu, sn.n);
        sb_counter(s, "bwd_1t_ms", t1 * 1e3);
        sb_counter(s, "bwd_nt_ms", tn * 1e3);
        sb_counter(s, "speedup", t1 / tn);
        sb_counter(s, "cores_1t", cpu1 / t1);
        sb_counter(s, "cores_nt", cpun / tn);
        sb_counter(s, "cpu_ratio", cpun / cpu1);
        sb_label(s, "speedup = 1-thread / n-thread backward_train wall time");
    }
    bwd_ctx_free(&b1);
    bwd_ctx_free(&bn);
}

static const bcfg mem_cfg = {
    .batch = 1, .seq = 65536, .dm = 128, .heads = 2, .causal = 1, .threads = 2, .kept = 0};

static void bm_peak_memory(sb_state *s, const void *arg)
{
    const bcfg *c = arg;
    bwd_ctx b;
    double base = 0, fwd = 0, bwd = 0;
    selfattn_status st = SELFATTN_ERR_NOMEM;
    if (bwd_ctx_make(&b, c)) {
        while (sb_keep_running(s)) {
            sb_pause(s);
            sb_reset_peak_rss();
            base = sb_peak_rss_mib();
            st = run_forward(&b);
            fwd = sb_peak_rss_mib();
            /* a fresh layer: the forward's cached workspace does not count for the backward */
            selfattn_layer_destroy(b.l);
            b.l = layer_of(c);
            sb_reset_peak_rss();
            sb_resume(s);
            if (st == SELFATTN_OK)
                st = b.l != NULL ? run_backward(&b) : SELFATTN_ERR_NOMEM;
            sb_pause(s);
            bwd = sb_peak_rss_mib();
            sb_resume(s);
        }
    }
    if (st != SELFATTN_OK)
        sb_skip_with_error(s, selfattn_status_string(st));
    sb_counter(s, "inputs_MiB", base);
    sb_counter(s, "fwd_peak_MiB", fwd);
    sb_counter(s, "bwd_peak_MiB", bwd);
    sb_counter(s, "fwd_extra_MiB", fwd - base);
    sb_counter(s, "bwd_extra_MiB", bwd - base);
    sb_counter(s, "ratio", (bwd - base) / (fwd - base));
    sb_counter(s, "LxL_MiB", (double)c->seq * c->seq * c->heads * 4.0 / 1048576.0);
    bwd_ctx_free(&b);
}

enum { MAX_SEQS = 8 };
static bcfg cfgs[4 * MAX_SEQS];
static bcfg thread_cfgs[2 * MAX_SEQS];

int main(int argc, char **argv)
{
    sb_blas_setup();
    const int smoke = sb_smoke(argc, argv);
    int seqs[MAX_SEQS] = {smoke ? 256 : 2048};
    const int n_seqs = sb_int_list(argc, argv, "--seq=", seqs, MAX_SEQS);
    static char names[10 * MAX_SEQS][96];
    int k = 0;
    for (int i = 0; i < 4 * (n_seqs ? n_seqs : 1); i++) {
        const int causal = i % 2, kept = i / 2 % 2;
        bcfg *c = &cfgs[i];
        *c = (bcfg){.batch = 1,
                    .seq = seqs[i / 4],
                    .dm = 768,
                    .heads = 12,
                    .causal = causal,
                    .threads = 1,
                    .kept = kept};
        const char *mask = causal ? "causal" : "full", *kind = kept ? "bwd_train" : "bwd";
        snprintf(names[k], sizeof names[k], "%s_pair/1/%d/768/12/%s/1", kind, c->seq, mask);
        sb_register(names[k++], bm_pair, c, smoke ? 1 : 15);
        snprintf(names[k], sizeof names[k], "%s_ceiling/1/%d/768/12/%s/1", kind, c->seq, mask);
        sb_register(names[k++], bm_ceiling, c, smoke ? 1 : 15);
    }
    for (int i = 0; i < 2 * (n_seqs ? n_seqs : 1); i++) {
        bcfg *c = &thread_cfgs[i];
        *c = (bcfg){.batch = 1,
                    .seq = seqs[i / 2],
                    .dm = 768,
                    .heads = 12,
                    .causal = i % 2,
                    .threads = 2,
                    .kept = 1};
        snprintf(names[k], sizeof names[k], "bwd_train_threads/1/%d/768/12/%s/2", c->seq,
                 c->causal ? "causal" : "full");
        sb_register(names[k++], bm_threads, c, smoke ? 1 : 15);
    }
    if (!smoke)
        sb_register("bwd_peak_memory/1/65536/128/2/causal/2", bm_peak_memory, &mem_cfg, 1);
    return sb_main(argc, argv);
}
