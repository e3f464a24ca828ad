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
    const selfattn_status st = sa_check_struct_size(g, g->struct_size, sizeof(selfattn_grads));
    SA_CHECK(st == SELFATTN_OK, st);
    SA_CHECK(l->out_proj || (g->w_o == NULL && g->b_o == NULL), SELFATTN_ERR_INVALID);
    return SELFATTN_OK;
}

/* ---- Entry points ---------------------------------------------------------------------------- */

selfattn_status sa_backward(const selfattn_layer *layer, int32_t batch, int32_t seq_len,
                            const float *x, const int32_t *lengths, const float *dy, float *dx,
                            const selfattn_grads *grads, const sa_kept *kept)
{
    SA_CHECK(layer != NULL && x != NULL && dy != NULL, SELFATTN_ERR_NULL);
    SA_CHECK(batch >= 1 && seq_len >= 1, SELFATTN_ERR_INVALID);
    const unsigned need = SA_HAVE_Q | SA_HAVE_K | SA_HAVE_V | (layer->out_proj ? SA_HAVE_O : 0u);
    SA_CHECK(layer->head_dim != 0 && (layer->have & need) == need, SELFATTN_ERR_STATE);
    selfattn_status st = bw_check_grads(grads, layer);
    SA_CHECK(st == SELFATTN_OK, st);

    const size_t dm = (size_t)layer->d_model;
    const size_t nq = (size_t)layer->n_heads * (size_t)layer->head_dim;
    const size_t nkv = (size_t)layer->n_kv_heads * (size_t)layer->head_dim;
    const size_t nqkv = nq + 2 * nkv;
    const size_t rows = (size_t)batch * (size_t)seq_len; /* < 2^62 */
    size_t head_rows;
    SA_CHECK(sa_array_bytes(rows, dm) != 0 && sa_array_bytes(rows, nqkv) != 0 &&
                 sa_mul_size(rows, (size_t)layer->n_heads, &head_rows) &&
                 sa_rowprod_chunks_fit(rows),
             SELFATTN_ERR_OVERFLOW);
    st = sa_check_lengths(lengths, batch, seq_len);
    SA_CHECK(st == SELFATTN_OK, st);

    const selfattn_grads none = {.struct_size = sizeof none};
    const selfattn_grads *g = grads != NULL ? grads : &none;
    const int want_q = dx != NULL || g->w_q != NULL || g->b_q != NULL;
    const int want_k = dx != NULL || g->w_k != NULL || g->b_k != NULL;
    const int want_v = dx != NULL || g->w_v != NULL || g->b_v != NULL;
    const int want_o = g->w_o != NULL || g->b_o != NULL;
    if (!want_q && !want_k && !want_v && !want_o)
        return SELFATTN_OK;
    const int want_qkv = want_q || want_k || want_v;

    const size_t valid = sa_valid_rows(lengths, batch, seq_len);
    const sa_rows batch_rows = {.batch = batch, .seq_len = seq_len, .lengths = lengths};
    sa_attn_bwd w;
    memset(&w, 0, sizeof w);
    sa_attn_from_layer(&w.a, layer, batch, seq_len, seq_len, NULL);
    w.a.pad_queries = 1;
    w.a.kv_lengths = lengths;
    st = sa_attn_bwd_plan(&w);
    SA_CHECK(st == SELFATTN_OK, st);
    /* recomputed projections, dO, weight gradients and dx; the attention: forward and backward */
    const double flops = 2.0 * (double)valid * (double)dm * (double)(3 * nqkv + 2 * nq) +
                         14.0 * (double)valid * seq_len * (double)nq;
    const int workers = sa_workers_for(layer, flops);

    /* qkv and O (unless kept), dqkv, dO (unless dy is dO), lse (unless kept for the single
       pass), D, scratch */
    size_t scratch;
    SA_CHECK(sa_mul_size((size_t)workers, w.per_worker, &scratch), SELFATTN_ERR_OVERFLOW);
    const int own_lse = !(kept != NULL && w.onepass);
    sa_ws_plan wp = {0};
    const size_t o_qkv = sa_ws_reserve(&wp, kept == NULL ? rows * nqkv : 0);
    const size_t o_dqkv = sa_ws_reserve(&wp, want_qkv ? rows * nqkv : 0);
    const size_t o_attn = sa_ws_reserve(&wp, kept == NULL ? rows * nq : 0);
    const size_t o_dattn = sa_ws_reserve(&wp, layer->out_proj ? rows * nq : 0);
    const size_t o_lse = sa_ws_reserve(&wp, own_lse ? head_rows : 0);
    const size_t o_dsum = sa_ws_reserve(&wp, head_rows);
    const size_t o_scratch = sa_ws_reserve(&wp, scratch);
    sa_ws *ws;
    st = sa_ws_acquire_plan(layer->ws, &wp, &ws);
    SA_CHECK(st == SELFATTN_OK, st);

    sa_blas_init();
    float *base = ws->data;
    /* kept arrays are only read: O through a.out, lse through w.lse by the single pass, which
       skips its forward then (passes A and B recompute the lse into the workspace) */
    float *qkv = kept != NULL ? (float *)kept->qkv : base + o_qkv, *dqkv = base + o_dqkv;
    float *attn = kept != NULL ? (float *)kept->o : base + o_attn;
    float *dattn = layer->out_proj ? base + o_dattn : (float *)dy;
    if (valid > 0 && kept == NULL) {
        const sa_rowprod in_proj = {.in = x, .ld_in = dm, .k = dm, .w = layer->w_qkv,
                                    .ld_w = dm, .w_is_linear = 1, .bias = layer->b_qkv,
                                    .out = qkv, .ld_out = nqkv, .n = nqkv, .rows = batch_rows,
                                    .valid_rows = valid, .fixed_chunks = 1};
        sa_rowprod_run(&in_proj, workers);
        sa_rope_apply(layer, qkv, nqkv, batch, seq_len, lengths, NULL, 0, workers);
    }
    if (valid > 0 && layer->out_proj && want_qkv) {
        const sa_rowprod d_out = {.in = dy, .ld_in = dm, .k = dm, .w = layer->w_o, .ld_w = nq,
                                  .out = dattn, .ld_out = nq, .n = nq, .rows = batch_rows,
                                  .valid_rows = valid, .fixed_chunks = 1};
        sa_rowprod_run(&d_out, workers);
    }
    w.a.q = qkv;
    w.a.k = qkv + nq;
    w.a.v = qkv + nq + nkv;
    w.a.ldq = w.a.ldk = w.a.ldv = nqkv;
    w.a.out = kept != NULL && !w.onepass ? NULL : attn;
    w.a.ldo = nq;
    w.lse = kept != NULL && w.onepass ? (float *)kept->lse : base + o_lse;
    w.have_forward = kept != NULL;
    w.dsum = base + o_dsum;
    w.scratch = base + o_scratch;
    w.dout = dattn;
    w.lddo = nq;
    w.dq = want_q ? dqkv : NULL;
    w.dk = want_k ? dqkv + nq : NULL;
    w.dv = want_v ? dqkv + nq + nkv : NULL;
    w.lddq = w.lddk = w.lddv = nqkv;
    if (valid > 0) {
        if (want_qkv || (want_o && kept == NULL)) {
            if (!want_qkv) { /* O alone: the forward */
                w.dq = w.dk = w.dv = NULL;
                w.dout = NULL;
            }
            sa_attn_bwd_run(&w, workers);
        }
        if (want_q || want_k)
            sa_rope_apply(layer, dqkv, nqkv, batch, seq_len, lengths, NULL, 1, workers);
    }

    /* Weight gradients: every wanted one, each over the valid rows (zeros without any). */
    sa_wgrad wg = {.rows = batch_rows};
    const sa_wgrad_part parts_w[4] = {
        {.g = dqkv, .ld_g = nqkv, .c0 = 0, .c1 = nq, .in = x, .ld_in = dm, .n_in = dm,
         .dw = g->w_q, .db = g->b_q},
        {.g = dqkv, .ld_g = nqkv, .c0 = nq, .c1 = nq + nkv, .in = x, .ld_in = dm, .n_in = dm,
         .dw = g->w_k, .db = g->b_k},
        {.g = dqkv, .ld_g = nqkv, .c0 = nq + nkv, .c1 = nqkv, .in = x, .ld_in = dm, .n_in = dm,
         .dw = g->w_v, .db = g->b_v},
        {.g = dy, .ld_g = dm, .c0 = 0, .c1 = dm, .in = attn, .ld_in = nq, .n_in = nq,
         .dw = g->w_o, .db = g->b_o},
    };
    for (int i = 0; i < 4; i++)
        sa_wgrad_add(&wg, &parts_w[i]);
    sa_wgrad_run(&wg, workers);

    if (dx != NULL) {
        if (valid > 0) {
            const sa_rowprod d_in = {.in = dqkv, .ld_in = nqkv, .k = nqkv, .w = layer->w_qkv,
                                     .ld_w = dm, .out = dx, .ld_out = dm, .n = dm,
                                     .rows = batch_rows, .valid_rows = valid,
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
    return sa_backward(layer, batch, seq_len, x, lengths, dy, dx, grads, NULL);
}
