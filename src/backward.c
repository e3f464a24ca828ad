/* selfattn_backward: the layer's gradients. The forward's projections (and RoPE) are recomputed
 * unless a training state keeps them, the attention's gradients come from the attention backward
 * (attention_backward.c), then the layer goes back through RoPE (the opposite angle) and the
 * projections; the weight gradients are sums over the valid rows (rows.c), split over workers by
 * output rows, and the row-split products use fixed chunks of rows, so the partition of every
 * GEMM is a function of the shapes alone and results do not depend on the worker count. */
#include <string.h>

#include "internal.h"

/* ---- Checks ---------------------------------------------------------------------------------- */

/* The 1.1 layout of selfattn_grads, as for selfattn_extras. */
static selfattn_status bw_check_grads(const selfattn_grads *g, const selfattn_layer *l)
{
    if (g == NULL)
        return SELFATTN_OK;
    const selfattn_status st =
        sa_check_struct_size(g, g->struct_size, sizeof(selfattn_grads), sizeof(selfattn_grads),
                             "grads");
    SA_CHECK(st == SELFATTN_OK, st);
    SA_CHECKF(l->out_proj || (g->w_o == NULL && g->b_o == NULL), SELFATTN_ERR_INVALID,
              "grads->w_o and grads->b_o must be NULL with the output projection off");
    return SELFATTN_OK;
}

/* ---- Entry points ---------------------------------------------------------------------------- */

/* What one backward call computes and the workspace it needs, from the arguments alone (no
   caller buffer is read but the lengths): the plan is made, and every check passed, before the
   workspace is taken and anything is written. */
typedef struct bw_plan {
    size_t dm, nq, nkv, nq_v, nkv_v, nqkv, rows, head_rows, valid;
    sa_rows batch_rows;
    const selfattn_grads *g; /* grads, or a struct of NULLs */
    int want_q, want_k, want_v, want_o, want_qkv;
    int workers;
    sa_attn_bwd w; /* the attention backward, its pointers set at run time */
    sa_ws_plan ws; /* qkv and O (unless kept), dqkv, dO (unless dy is dO), lse (unless kept
                      for the single pass), D, scratch */
    size_t o_qkv, o_dqkv, o_attn, o_dattn, o_lse, o_dsum, o_scratch, o_panel;
} bw_plan;

static const selfattn_grads bw_no_grads = {.struct_size = sizeof(selfattn_grads)};

static selfattn_status bw_plan_make(const selfattn_layer *layer, int32_t batch, int32_t seq_len,
                                    const float *x, const int32_t *lengths, const float *dy,
                                    const float *dx, const selfattn_grads *grads,
                                    const sa_kept *kept, bw_plan *p)
{
    SA_CHECK_NULL(layer);
    SA_CHECK_NULL(x);
    SA_CHECK_NULL(dy);
    selfattn_status st = sa_check_batch_call(layer, batch, seq_len);
    SA_CHECK(st == SELFATTN_OK, st);
    st = bw_check_grads(grads, layer);
    SA_CHECK(st == SELFATTN_OK, st);

    memset(p, 0, sizeof *p);
    p->dm = (size_t)layer->d_model;
    const sa_widths wd = sa_layer_widths(layer);
    p->nq = wd.nq;
    p->nkv = wd.nkv;
    p->nq_v = wd.nq_v;
    p->nkv_v = wd.nkv_v;
    p->nqkv = wd.nqkv;
    p->rows = (size_t)batch * (size_t)seq_len; /* addressable: checked */
    SA_CHECK(sa_mul_size(p->rows, (size_t)layer->n_heads, &p->head_rows) &&
                 sa_rowprod_chunks_fit(p->rows),
             SELFATTN_ERR_OVERFLOW);
    st = sa_check_lengths(lengths, batch, seq_len, "lengths", "seq_len");
    SA_CHECK(st == SELFATTN_OK, st);

    const selfattn_grads *g = p->g = grads != NULL ? grads : &bw_no_grads;
    p->want_q = dx != NULL || g->w_q != NULL || g->b_q != NULL;
    p->want_k = dx != NULL || g->w_k != NULL || g->b_k != NULL;
    p->want_v = dx != NULL || g->w_v != NULL || g->b_v != NULL;
    p->want_o = g->w_o != NULL || g->b_o != NULL;
    p->want_qkv = p->want_q || p->want_k || p->want_v;
    if (!p->want_qkv && !p->want_o)
        return SELFATTN_OK;

    p->valid = sa_valid_rows(lengths, batch, seq_len);
    p->batch_rows = (sa_rows){.batch = batch, .seq_len = seq_len, .lengths = lengths};
    sa_attn_from_layer(&p->w.a, layer, batch, seq_len, seq_len, NULL);
    p->w.a.pad_queries = 1;
    p->w.a.kv_lengths = lengths;
    st = sa_attn_bwd_plan(&p->w);
    SA_CHECK(st == SELFATTN_OK, st);
    /* recomputed projections, dO, weight gradients and dx; the attention: forward and backward */
    const double flops =
        2.0 * (double)p->valid * (double)p->dm * (double)(3 * p->nqkv + 2 * p->nq_v) +
        7.0 * (double)p->valid * seq_len * (double)(p->nq + p->nq_v);
    p->workers = sa_workers_for(layer, flops);

    const int own_lse = !(kept != NULL && p->w.onepass);
    p->o_qkv = sa_ws_reserve(&p->ws, kept == NULL ? p->rows * p->nqkv : 0);
    p->o_dqkv = sa_ws_reserve(&p->ws, p->want_qkv ? p->rows * p->nqkv : 0);
    p->o_attn = sa_ws_reserve(&p->ws, kept == NULL ? p->rows * p->nq_v : 0);
    p->o_dattn = sa_ws_reserve(&p->ws, layer->out_proj ? p->rows * p->nq_v : 0);
    p->o_lse = sa_ws_reserve(&p->ws, own_lse ? p->head_rows : 0);
    p->o_dsum = sa_ws_reserve(&p->ws, p->head_rows);
    p->o_scratch = sa_ws_reserve_n(&p->ws, (size_t)p->workers, p->w.per_worker);
    p->o_panel = sa_ws_reserve_n(&p->ws, (size_t)p->workers, sa_layer_panel_floats(layer));
    return SELFATTN_OK;
}

/* Every wanted weight gradient, each over the valid rows (zeros without any). */
static void bw_weight_grads(const bw_plan *p, const float *x, const float *dy, const float *dqkv,
                            const float *attn)
{
    const selfattn_grads *g = p->g;
    const size_t nq = p->nq, nkv = p->nkv, nqkv = p->nqkv, dm = p->dm;
    sa_wgrad wg = {.rows = p->batch_rows};
    const sa_wgrad_part parts[4] = {
        {.g = dqkv,
         .ld_g = nqkv,
         .c0 = 0,
         .c1 = nq,
         .in = x,
         .ld_in = dm,
         .n_in = dm,
         .dw = g->w_q,
         .db = g->b_q},
        {.g = dqkv,
         .ld_g = nqkv,
         .c0 = nq,
         .c1 = nq + nkv,
         .in = x,
         .ld_in = dm,
         .n_in = dm,
         .dw = g->w_k,
         .db = g->b_k},
        {.g = dqkv,
         .ld_g = nqkv,
         .c0 = nq + nkv,
         .c1 = nqkv,
         .in = x,
         .ld_in = dm,
         .n_in = dm,
         .dw = g->w_v,
         .db = g->b_v},
        {.g = dy,
         .ld_g = dm,
         .c0 = 0,
         .c1 = dm,
         .in = attn,
         .ld_in = p->nq_v,
         .n_in = p->nq_v,
         .dw = g->w_o,
         .db = g->b_o},
    };
    for (int i = 0; i < 4; i++)
        sa_wgrad_add(&wg, &parts[i]);
    sa_wgrad_run(&wg, p->workers);
}

selfattn_status sa_backward(const selfattn_layer *layer, int32_t batch, int32_t seq_len,
                            const float *x, const int32_t *lengths, const float *dy, float *dx,
                            const selfattn_grads *grads, const sa_kept *kept)
{
    bw_plan p;
    selfattn_status st = bw_plan_make(layer, batch, seq_len, x, lengths, dy, dx, grads, kept, &p);
    SA_CHECK(st == SELFATTN_OK, st);
    if (!p.want_qkv && !p.want_o)
        return SELFATTN_OK;
    sa_ws *ws;
    st = sa_ws_acquire_plan(layer->ws, &p.ws, &ws);
    SA_CHECK(st == SELFATTN_OK, st);

    const size_t nq = p.nq, nkv = p.nkv, nq_v = p.nq_v, nqkv = p.nqkv, dm = p.dm;
    const int workers = p.workers;
    float *base = ws->data;
    /* kept arrays are only read: O through a.out, lse through w.lse by the single pass, which
       skips its forward then (passes A and B recompute the lse into the workspace) */
    float *qkv = kept != NULL ? (float *)kept->qkv : base + p.o_qkv, *dqkv = base + p.o_dqkv;
    float *attn = kept != NULL ? (float *)kept->o : base + p.o_attn;
    float *dattn = layer->out_proj ? base + p.o_dattn : (float *)dy;
    if (p.valid > 0 && kept == NULL) {
        sa_in_proj(layer, x, qkv, &p.batch_rows, p.valid, 1, base + p.o_panel, workers);
        sa_rope_apply(layer, qkv, nqkv, batch, seq_len, lengths, NULL, 0, workers);
    }
    if (p.valid > 0 && layer->out_proj && p.want_qkv) {
        const sa_rowprod d_out = {.in = dy,
                                  .ld_in = dm,
                                  .k = dm,
                                  .w = layer->w_o,
                                  .w16 = layer->h_o,
                                  .w_dtype = layer->weight_dtype,
                                  .panel = base + p.o_panel,
                                  .ld_w = nq_v,
                                  .out = dattn,
                                  .ld_out = nq_v,
                                  .n = nq_v,
                                  .rows = p.batch_rows,
                                  .valid_rows = p.valid,
                                  .fixed_chunks = 1};
        sa_rowprod_run(&d_out, workers);
    }
    sa_attn_bwd *w = &p.w;
    w->a.q = qkv;
    w->a.k = qkv + nq;
    w->a.v = qkv + nq + nkv;
    w->a.ldq = w->a.ldk = w->a.ldv = nqkv;
    w->a.out = kept != NULL && !w->onepass ? NULL : attn;
    w->a.ldo = nq_v;
    w->lse = kept != NULL && w->onepass ? (float *)kept->lse : base + p.o_lse;
    w->have_forward = kept != NULL;
    w->dsum = base + p.o_dsum;
    w->scratch = base + p.o_scratch;
    /* dO and the gradients; without any of them (O alone, for dW_O) only the forward runs */
    w->dout = p.want_qkv ? dattn : NULL;
    w->lddo = nq_v;
    w->dq = p.want_q ? dqkv : NULL;
    w->dk = p.want_k ? dqkv + nq : NULL;
    w->dv = p.want_v ? dqkv + nq + nkv : NULL;
    w->lddq = w->lddk = w->lddv = nqkv;
    if (p.valid > 0) {
        if (p.want_qkv || (p.want_o && kept == NULL))
            sa_attn_bwd_run(w, workers);
        if (p.want_q || p.want_k)
            sa_rope_apply(layer, dqkv, nqkv, batch, seq_len, lengths, NULL, 1, workers);
    }
    bw_weight_grads(&p, x, dy, dqkv, attn);
    if (dx != NULL) {
        if (p.valid > 0) {
            const sa_rowprod d_in = {.in = dqkv,
                                     .ld_in = nqkv,
                                     .k = nqkv,
                                     .w = layer->w_qkv,
                                     .w16 = layer->h_qkv,
                                     .w_dtype = layer->weight_dtype,
                                     .panel = base + p.o_panel,
                                     .ld_w = dm,
                                     .out = dx,
                                     .ld_out = dm,
                                     .n = dm,
                                     .rows = p.batch_rows,
                                     .valid_rows = p.valid,
                                     .fixed_chunks = 1};
            sa_rowprod_run(&d_in, workers);
        }
        sa_zero_padding(dx, dm, lengths, batch, seq_len);
    }
    sa_ws_release(layer->ws, ws);
    return SELFATTN_OK;
}

selfattn_status selfattn_backward(const selfattn_layer *layer, int32_t batch, int32_t seq_len,
                                  const float *x, const int32_t *lengths, const float *dy,
                                  float *dx, const selfattn_grads *grads)
{
    sa_err_begin("selfattn_backward");
    return sa_backward(layer, batch, seq_len, x, lengths, dy, dx, grads, NULL);
}
