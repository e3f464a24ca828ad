/* The attention backward (selfattn_attend_backward, and the layer's backward in backward.c):
 * gradients, FlashAttention-2 style, with memory linear in the sequence length and results that do
 * not depend on the thread count.
 *
 * The probabilities are recomputed block by block with the forward's own core (attention.c),
 * unless a training state gives O and the log-sum-exp. Every task's outputs are disjoint from every
 * other's, so no two workers ever add into the same float and each output is summed in one fixed
 * order. Two schemes, chosen by the shapes alone (never by the thread count):
 *   single pass (at least BW_ONEPASS_MIN_TASKS (sequence, key/value head) pairs): the forward
 *      core writes O and each row's log-sum-exp; then one task per (sequence, key/value head)
 *      takes D = rowsum(dO o O) of its rows and walks its key blocks in order: for every query
 *      head of the GQA group and every chunk of the query rows that see the block, P of the tile
 *      from the row's lse (sa_attn_tile_probs), dV += P^T dO, dP = dO V^T,
 *      dS = P o (dP - D) (times the softcap's derivative and the scale), dK += dS^T Q and
 *      dQ += dS K. The task owns its heads' dQ, so dQ is summed over key blocks in their order:
 *      7 attention products of L^2 D per head, as a recomputing FlashAttention-2 backward.
 *   two passes (fewer pairs, where one task per pair would leave workers idle):
 *   A. one task per (sequence, query head, query block), as the forward: P over every key the
 *      block sees (sa_attn_probs), each row's log-sum-exp, O = P V (the layer only: dW_O
 *      needs it), dP = dO V^T, D = rowsum(P o dP) (which is rowsum(dO o O), taken from the same
 *      dP), dS and dQ = dS K;
 *   B. one task per (sequence, key/value head, key block): the single pass's work on one key
 *      block without dQ. 8 attention products (4 per pass).
 * ALiBi and masks add constants to the scores: no gradient flows through them.
 *
 * The elementwise work runs through the kernel table's row kernels (dot, dscores, expsub: SIMD
 * where the CPU has it): pass A applies 1/sum to its products rather than normalising its score
 * block, and takes each row's D and dS while the row is in L1; tiles get their probabilities with
 * one exp per score from the stored log-sum-exp. */
#include <math.h>
#include <string.h>

#include <cblas.h>

#include "internal.h"

/* Pass B's tiles: 256 keys x 512 query rows measured a few % faster than 128 keys (wider
   products; the scratch is nbuf x 512 x 256 floats per worker, at most 1.5 MiB). */
#define BW_KEY_BLOCK 256 /* keys per task of pass B */
#define BW_Q_CHUNK 512   /* query rows per tile of pass B */
/* The single pass has one task per (sequence, key/value head): used when there are at least this
   many, a rule on the shapes alone, so the thread count never changes which pass runs. */
#define BW_ONEPASS_MIN_TASKS 4

static size_t bw_round(size_t n)
{
    return (n + SA_ALIGN_FLOATS - 1) / SA_ALIGN_FLOATS * SA_ALIGN_FLOATS;
}

/* Blocking and scratch of an attention backward whose a is filled in. */
selfattn_status sa_attn_bwd_plan(sa_attn_bwd *w)
{
    const sa_attn *a = &w->a;
    w->a.whole_rows = 1; /* pass A's score blocks hold every key a block sees */
    selfattn_status st = sa_attn_plan_make(a, &w->plan);
    SA_CHECK(st == SELFATTN_OK, st);
    w->nbuf = a->softcap > 0.0f ? 3 : 2;
    w->kblock = a->kv_len < BW_KEY_BLOCK ? a->kv_len : BW_KEY_BLOCK;
    w->n_kblocks = (int32_t)(((int64_t)a->kv_len + w->kblock - 1) / w->kblock);
    w->qchunk = a->q_len < BW_Q_CHUNK ? a->q_len : BW_Q_CHUNK;
    w->ld_t = bw_round((size_t)w->kblock);
    size_t pa, pb;
    if (!sa_mul_size((size_t)w->plan.block, w->plan.ld_s, &pa) ||
        !sa_mul_size(pa, (size_t)w->nbuf, &pa) || !sa_add_size(pa, 2 * (size_t)w->plan.block, &pa))
        return SELFATTN_ERR_OVERFLOW;
    pb = (size_t)w->nbuf * (size_t)w->qchunk * w->ld_t; /* <= 3 * 512 * 256 */
    w->per_worker = bw_round(pa > pb ? pa : pb);
    const int64_t tasks = (int64_t)a->batch * (a->n_heads / a->group) * w->n_kblocks;
    SA_CHECK(tasks <= INT32_MAX, SELFATTN_ERR_OVERFLOW);
    w->tasks_b = (int)tasks;
    w->tasks_kv = a->batch * (a->n_heads / a->group); /* <= tasks */
    w->onepass = w->tasks_kv >= BW_ONEPASS_MIN_TASKS;
    return SELFATTN_OK;
}

/* dS = P o (dP - D) o dcap * scale in place of dP over each row's visible keys of [k0, k0 + nk),
   0 elsewhere (a masked key's dP is never used, even when V holds a NaN there). p holds the
   normalised probabilities, or with inv non-NULL the unnormalised ones of sa_attn_probs whose
   row r is scaled by inv[r] here (saving a pass over the block to normalise it). */
/* p, dp and dsum are rows of a worker's scratch, never NULL (said so for static analysis) */
__attribute__((nonnull(7, 8, 11))) static void bw_dscores(const sa_attn *a, int32_t b, int32_t i0,
                                                          int32_t mb, int32_t k0, int32_t nk,
                                                          const float *p, float *dp,
                                                          const float *dc, size_t ld,
                                                          const float *dsum, const float *inv)
{
    const sa_f32_dscores_fn dscores = sa_kernels_get()->dscores;
    for (int32_t r = 0; r < mb; r++) {
        const float *pr = p + (size_t)r * ld, *cr = dc != NULL ? dc + (size_t)r * ld : NULL;
        float *dr = dp + (size_t)r * ld;
        int32_t lo, hi;
        sa_attn_row_keys(a, b, i0 + r, &lo, &hi);
        lo = (lo > k0 ? lo : k0) - k0;
        hi = (hi < k0 + nk ? hi : k0 + nk) - k0;
        if (hi <= lo || (inv != NULL && inv[r] == 0.0f)) {
            memset(dr, 0, (size_t)nk * sizeof(float));
            continue;
        }
        const float mul = inv != NULL ? inv[r] * a->scale : a->scale;
        dscores(pr + lo, dr + lo, cr != NULL ? cr + lo : NULL, (size_t)(hi - lo), dsum[r], mul);
        memset(dr, 0, (size_t)lo * sizeof(float));
        memset(dr + hi, 0, (size_t)(nk - hi) * sizeof(float));
    }
}

/* Pass A: one (sequence, head, query block). */
static void bw_pass_a(void *arg, int worker, int task)
{
    const sa_attn_bwd *w = arg;
    const sa_attn *a = &w->a;
    const sa_attn_plan *p = &w->plan;
    const sa_attn_task_tile tile = sa_attn_tile_of(a, p, a->n_heads, task);
    const int32_t b = tile.b, h = tile.unit, hd = a->head_dim, i0 = tile.i0, mb = tile.valid;
    const int32_t dv = sa_attn_dv(a); /* O, dO and V heads */
    if (mb == 0)                      /* padding rows: nothing is read or needed there */
        return;
    const size_t hr = ((size_t)b * a->n_heads + h) * a->q_len + (size_t)i0;
    const size_t row0 = (size_t)b * a->q_len + (size_t)i0;
    float *ob = a->out != NULL ? a->out + row0 * a->ldo + (size_t)h * dv : NULL;
    const float *dob = w->dout != NULL ? w->dout + row0 * w->lddo + (size_t)h * dv : NULL;
    float *dqb = w->dq != NULL ? w->dq + row0 * w->lddq + (size_t)h * hd : NULL;
    float *lse_out = w->lse + hr, *dsum = w->dsum + hr;

    int32_t klo;
    const int32_t nk = sa_attn_block_keys(a, b, i0, mb, &klo);
    if (nk == 0) { /* no row of the block sees a key */
        for (int32_t r = 0; r < mb; r++) {
            if (ob != NULL)
                memset(ob + (size_t)r * a->ldo, 0, (size_t)dv * sizeof(float));
            if (dqb != NULL)
                memset(dqb + (size_t)r * w->lddq, 0, (size_t)hd * sizeof(float));
            lse_out[r] = -INFINITY;
            dsum[r] = 0.0f;
        }
        return;
    }
    const size_t area = (size_t)p->block * p->ld_s;
    float *s = w->scratch + (size_t)worker * w->per_worker, *dp = s + area;
    float *dc = w->nbuf == 3 ? dp + area : NULL;
    float *inv = s + (size_t)w->nbuf * area, *lse = inv + p->block;
    /* s: exp(score - m), unnormalised; P = s inv, the factor applied to the (much smaller)
       products instead of to s, as the forward does */
    sa_attn_probs(a, p, b, h, i0, mb, klo, nk, s, inv, lse, dc);
    const size_t g = (size_t)(h / a->group);
    const float *vh = a->v + ((size_t)b * a->kv_len + klo) * a->ldv + g * (size_t)dv;
    const float *kh = a->k + ((size_t)b * a->kv_len + klo) * a->ldk + g * (size_t)hd;
    if (ob != NULL) /* O: the layer's dW_O needs it */
        sa_attn_pv(a, b, h / a->group, klo, mb, nk, s, p->ld_s, inv, ob, a->ldo, NULL);
    for (int32_t r = 0; r < mb; r++)
        lse_out[r] = lse[r];
    if (dob == NULL)
        return;
    /* D = rowsum(P o dP), which is rowsum(dO o O), from the very dP that dS subtracts it from:
       a row whose weight is all on one key gets dS = 0 exactly, not a cancellation residue.
       Each row's D and dS are computed back to back while the row is in L1. */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mb, nk, dv, 1.0f, dob, (int)w->lddo, vh,
                (int)a->ldv, 0.0f, dp, (int)p->ld_s);
    const sa_f32_dot_fn dot = sa_kernels_get()->dot;
    for (int32_t r = 0; r < mb; r++) {
        int32_t lo, hi;
        sa_attn_row_keys(a, b, i0 + r, &lo, &hi);
        float d = 0.0f;
        if (inv[r] != 0.0f && hi > lo)
            d = inv[r] * dot(s + (size_t)r * p->ld_s + (lo - klo),
                             dp + (size_t)r * p->ld_s + (lo - klo), (size_t)(hi - lo));
        dsum[r] = d;
        if (dqb != NULL)
            bw_dscores(a, b, i0 + r, 1, klo, nk, s + (size_t)r * p->ld_s, dp + (size_t)r * p->ld_s,
                       dc != NULL ? dc + (size_t)r * p->ld_s : NULL, p->ld_s, dsum + r, inv + r);
    }
    if (dqb == NULL)
        return;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, mb, hd, nk, 1.0f, dp, (int)p->ld_s, kh,
                (int)a->ldk, 0.0f, dqb, (int)w->lddq);
    for (int32_t r = 0; r < mb; r++)
        if (inv[r] == 0.0f)
            memset(dqb + (size_t)r * w->lddq, 0, (size_t)hd * sizeof(float));
}

/* One key block kb of (sequence b, key/value head g): for every query head of the group and every
   chunk of the query rows that see the block, P of the tile from the row's lse, dV += P^T dO,
   dP = dO V^T, dS, dK += dS^T Q and, with with_dq, dQ += dS K (dQ's rows hold the sum over the
   earlier key blocks: the caller runs a head's key blocks in order). */
static void bw_key_block(const sa_attn_bwd *w, int worker, int32_t b, int32_t g, int32_t kb,
                         int with_dq)
{
    const sa_attn *a = &w->a;
    const int32_t hd = a->head_dim, dv = sa_attn_dv(a), len = sa_attn_kv_length(a, b);
    const int32_t k0 = kb * w->kblock;
    const int32_t nkb = a->kv_len - k0 < w->kblock ? a->kv_len - k0 : w->kblock;
    const int32_t nvis = len - k0 < nkb ? (len - k0 > 0 ? len - k0 : 0) : nkb;
    const size_t krow0 = (size_t)b * a->kv_len + (size_t)k0;
    float *dkb = w->dk != NULL ? w->dk + krow0 * w->lddk + (size_t)g * hd : NULL;
    float *dvb = w->dv != NULL ? w->dv + krow0 * w->lddv + (size_t)g * dv : NULL;
    float *dq = with_dq ? w->dq : NULL;
    int32_t done = 0; /* rows of dkb/dvb written so far */

    int32_t ilo;
    const int32_t nq = nvis > 0 ? sa_attn_key_queries(a, b, k0, nvis, &ilo) : 0;
    if (nq > 0) {
        const size_t area = (size_t)w->qchunk * w->ld_t;
        float *s = w->scratch + (size_t)worker * w->per_worker, *dp = s + area;
        float *dc = w->nbuf == 3 ? dp + area : NULL;
        const int need_ds = dkb != NULL || dq != NULL;
        const float *kh = a->k + krow0 * a->ldk + (size_t)g * hd;
        const float *vh = a->v + krow0 * a->ldv + (size_t)g * dv;
        for (int32_t t = 0; t < a->group; t++) {
            const int32_t h = g * a->group + t;
            for (int32_t c0 = ilo; c0 < ilo + nq; c0 += w->qchunk) {
                const int32_t mc = ilo + nq - c0 < w->qchunk ? ilo + nq - c0 : w->qchunk;
                const size_t qrow0 = (size_t)b * a->q_len + (size_t)c0;
                const size_t hr = ((size_t)b * a->n_heads + h) * a->q_len + (size_t)c0;
                const float *qb = a->q + qrow0 * a->ldq + (size_t)h * hd;
                const float *dob = w->dout + qrow0 * w->lddo + (size_t)h * dv;
                const float beta = done > 0 ? 1.0f : 0.0f;
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mc, nvis, hd, 1.0f, qb,
                            (int)a->ldq, kh, (int)a->ldk, 0.0f, s, (int)w->ld_t);
                sa_attn_tile_probs(a, b, h, c0, mc, k0, nvis, s, w->ld_t, w->lse + hr,
                                   need_ds ? dc : NULL);
                if (dvb != NULL)
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nvis, dv, mc, 1.0f, s,
                                (int)w->ld_t, dob, (int)w->lddo, beta, dvb, (int)w->lddv);
                if (need_ds) {
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mc, nvis, dv, 1.0f, dob,
                                (int)w->lddo, vh, (int)a->ldv, 0.0f, dp, (int)w->ld_t);
                    bw_dscores(a, b, c0, mc, k0, nvis, s, dp, dc, w->ld_t, w->dsum + hr, NULL);
                }
                if (dkb != NULL)
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nvis, hd, mc, 1.0f, dp,
                                (int)w->ld_t, qb, (int)a->ldq, beta, dkb, (int)w->lddk);
                if (dq != NULL)
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, mc, hd, nvis, 1.0f, dp,
                                (int)w->ld_t, kh, (int)a->ldk, 1.0f,
                                dq + qrow0 * w->lddq + (size_t)h * hd, (int)w->lddq);
                done = nvis;
            }
        }
    }
    /* keys at or past the length, and keys no query sees: zeros */
    for (int32_t r = done; r < nkb; r++) {
        if (dkb != NULL)
            memset(dkb + (size_t)r * w->lddk, 0, (size_t)hd * sizeof(float));
        if (dvb != NULL)
            memset(dvb + (size_t)r * w->lddv, 0, (size_t)dv * sizeof(float));
    }
}

/* Pass B: one (sequence, key/value head, key block). */
static void bw_pass_b(void *arg, int worker, int task)
{
    const sa_attn_bwd *w = arg;
    const int32_t n_kv = w->a.n_heads / w->a.group;
    const int per_block = w->a.batch * n_kv;
    /* under a causal mask the first blocks are the largest */
    bw_key_block(w, worker, (task % per_block) / n_kv, task % n_kv, task / per_block, 0);
}

/* The single pass: one (sequence, key/value head), its key blocks in order. D = rowsum(dO o O)
   of the group's rows first (the forward has written O and lse), dQ from zero. */
static void bw_pass_kv(void *arg, int worker, int task)
{
    const sa_attn_bwd *w = arg;
    const sa_attn *a = &w->a;
    const int32_t n_kv = a->n_heads / a->group;
    const int32_t b = task / n_kv, g = task % n_kv, hd = a->head_dim, dv = sa_attn_dv(a);
    const int32_t rows_b = sa_attn_query_rows(a, b);
    const sa_f32_dot_fn dot = sa_kernels_get()->dot;
    for (int32_t t = 0; t < a->group; t++) {
        const int32_t h = g * a->group + t;
        const size_t hr = ((size_t)b * a->n_heads + h) * a->q_len;
        for (int32_t i = 0; i < rows_b; i++) {
            const size_t row = (size_t)b * a->q_len + (size_t)i;
            w->dsum[hr + (size_t)i] = w->lse[hr + (size_t)i] == -INFINITY
                                          ? 0.0f
                                          : dot(w->dout + row * w->lddo + (size_t)h * dv,
                                                a->out + row * a->ldo + (size_t)h * dv, (size_t)dv);
            if (w->dq != NULL)
                memset(w->dq + row * w->lddq + (size_t)h * hd, 0, (size_t)hd * sizeof(float));
        }
    }
    for (int32_t kb = 0; kb < w->n_kblocks; kb++)
        bw_key_block(w, worker, b, g, kb, 1);
}

void sa_attn_bwd_run(sa_attn_bwd *w, int workers)
{
    if (!w->onepass) {
        sa_run_tasks(workers, w->plan.n_tasks, bw_pass_a, w);
        if (w->dk != NULL || w->dv != NULL)
            sa_run_tasks(workers, w->tasks_b, bw_pass_b, w);
        return;
    }
    if (!w->have_forward) { /* the forward: O and each row's log-sum-exp */
        w->a.lse = w->lse;
        sa_attn_run(&w->a, &w->plan, workers, w->scratch);
        w->a.lse = NULL;
    }
    if (w->dout != NULL && (w->dq != NULL || w->dk != NULL || w->dv != NULL))
        sa_run_tasks(workers, w->tasks_kv, bw_pass_kv, w);
}

/* ---- Entry point ---------------------------------------------------------------------------- */

selfattn_status selfattn_attend_backward(const selfattn_layer *layer, int32_t batch, int32_t q_len,
                                         int32_t kv_len, const float *q, const float *k,
                                         const float *v, const int32_t *kv_lengths,
                                         const float *dout, float *dq, float *dk, float *dv)
{
    sa_err_begin("selfattn_attend_backward");
    SA_CHECK_NULL(layer);
    SA_CHECK_NULL(q);
    SA_CHECK_NULL(k);
    SA_CHECK_NULL(v);
    SA_CHECK_NULL(dout);
    selfattn_status st = sa_check_attend_call(layer, batch, q_len, kv_len);
    SA_CHECK(st == SELFATTN_OK, st);
    const sa_widths wd = sa_layer_widths(layer);
    const size_t nq = wd.nq, nkv = wd.nkv, nq_v = wd.nq_v, nkv_v = wd.nkv_v;
    const size_t q_rows = (size_t)batch * (size_t)q_len; /* addressable: checked */
    size_t head_rows;
    SA_CHECK(sa_mul_size(q_rows, (size_t)layer->n_heads, &head_rows), SELFATTN_ERR_OVERFLOW);
    st = sa_check_lengths(kv_lengths, batch, kv_len, "kv_lengths", "kv_len");
    SA_CHECK(st == SELFATTN_OK, st);
    if (dq == NULL && dk == NULL && dv == NULL)
        return SELFATTN_OK;

    sa_attn_bwd w;
    memset(&w, 0, sizeof w);
    sa_attn_from_layer(&w.a, layer, batch, q_len, kv_len, NULL);
    w.a.align = layer->causal; /* as selfattn_attend: every causal alignment */
    st = sa_attn_bwd_plan(&w);
    SA_CHECK(st == SELFATTN_OK, st);
    /* the forward and the single pass, or pass A's products and pass B's */
    const double flops = 1.0 * batch * (double)q_len * kv_len * (double)(nq + nq_v) *
                         (dk != NULL || dv != NULL ? 7.0 : 4.0);
    const int workers = sa_workers_for(layer, flops);
    /* lse, D, scratch and, for the single pass, O (D = rowsum(dO o O) needs it) */
    sa_ws_plan wp = {0};
    const size_t o_lse = sa_ws_reserve(&wp, head_rows), o_dsum = sa_ws_reserve(&wp, head_rows);
    const size_t o_scratch = sa_ws_reserve_n(&wp, (size_t)workers, w.per_worker);
    const size_t o_out = sa_ws_reserve(&wp, w.onepass ? q_rows * nq_v : 0);
    sa_ws *ws;
    st = sa_ws_acquire_plan(layer->ws, &wp, &ws);
    SA_CHECK(st == SELFATTN_OK, st);

    float *base = ws->data;
    w.a.kv_lengths = kv_lengths;
    w.a.q = q;
    w.a.k = k;
    w.a.v = v;
    w.a.ldq = nq;
    w.a.ldo = nq_v;
    w.a.ldk = nkv;
    w.a.ldv = nkv_v;
    w.a.out = w.onepass ? base + o_out : NULL; /* passes A and B take D from P and dP */
    w.lse = base + o_lse;
    w.dsum = base + o_dsum;
    w.scratch = base + o_scratch;
    w.dout = dout;
    w.lddq = nq;
    w.lddo = nq_v;
    w.lddk = nkv;
    w.lddv = nkv_v;
    w.dq = dq;
    w.dk = dk;
    w.dv = dv;
    sa_attn_bwd_run(&w, workers);
    sa_ws_release(layer->ws, ws);
    return SELFATTN_OK;
}
