/* The entry points selfattn_forward(_ex) and selfattn_attend(_ex): argument checks, the workspace,
 * then the phases, each a list of tasks for the call's workers (the caller and helpers from the
 * persistent pool):
 *   1. projections of the valid rows of x, one fused GEMM x * W_qkv^T (project.c), then rotary
 *      embeddings of Q and K when asked;
 *   2. the attention core (attention.c);
 *   3. the output projection.
 * Which worker runs a task never changes its result. Every check comes before the first write to
 * a caller buffer, and the workspace is taken from the layer's cache before anything is written,
 * so a failed call writes nothing. */
#include <math.h>
#include <string.h>

#include <cblas.h>

#include "internal.h"

/* Whether a caller's struct of `size` bytes ends inside the field at [at, at + n). */
static int sa_cuts_field(uint32_t size, size_t at, size_t n)
{
    return size > at && size < at + n;
}

/* selfattn_extras as the caller compiled it: from the 1.1 layout (its fields up to lse) to this
   header's; a newer caller's larger struct is accepted when every byte past it is zero. Checks
   it and copies it into *copy, the fields the caller's struct_size does not cover NULL / 0;
   *e_out is then copy (NULL without extras). */
static selfattn_status sa_check_extras(const selfattn_extras *e, const selfattn_layer *l,
                                       int32_t batch, int32_t q_len, int32_t kv_len,
                                       selfattn_extras *copy, const selfattn_extras **e_out)
{
    *e_out = NULL;
    if (e == NULL)
        return SELFATTN_OK;
    const size_t at_scores = offsetof(selfattn_extras, scores);
    const size_t at_stage = offsetof(selfattn_extras, scores_stage);
    const selfattn_status st = sa_check_struct_size(e, e->struct_size, at_scores,
                                                    sizeof(selfattn_extras), "extras");
    SA_CHECK(st == SELFATTN_OK, st);
    SA_CHECKF(!sa_cuts_field(e->struct_size, at_scores, sizeof e->scores) &&
                  !sa_cuts_field(e->struct_size, at_stage, sizeof e->scores_stage),
              SELFATTN_ERR_INVALID,
              "extras->struct_size %u ends inside a field (1.1 size %zu, sizeof %zu)",
              e->struct_size, at_scores, sizeof(selfattn_extras));
    memset(copy, 0, sizeof *copy);
    memcpy(copy, e, e->struct_size < sizeof *copy ? e->struct_size : sizeof *copy);
    e = copy;
    size_t rows; /* of weights and lse: batch * n_heads * q_len */
    SA_CHECK(sa_mul_size((size_t)batch, (size_t)l->n_heads, &rows) &&
                 sa_mul_size(rows, (size_t)q_len, &rows),
             SELFATTN_ERR_OVERFLOW);
    if (e->weights != NULL)
        SA_CHECK(sa_array_bytes(rows, (size_t)kv_len) != 0, SELFATTN_ERR_OVERFLOW);
    if (e->lse != NULL)
        SA_CHECK(sa_array_bytes(rows, 1) != 0, SELFATTN_ERR_OVERFLOW);
    if (e->scores != NULL) {
        SA_CHECKF(e->scores_stage >= 0 && e->scores_stage <= 2, SELFATTN_ERR_INVALID,
                  "extras->scores_stage %d is not 0, 1 or 2", (int)e->scores_stage);
        SA_CHECK(sa_array_bytes(rows, (size_t)kv_len) != 0, SELFATTN_ERR_OVERFLOW);
    }
    if (e->attn_bias != NULL) {
        SA_CHECK(e->bias_stride_batch >= 0 && e->bias_stride_head >= 0 && e->bias_stride_row >= 0,
                 SELFATTN_ERR_INVALID);
        /* The last element of the view must be addressable: strides times (count - 1) summed. */
        const double last = (double)e->bias_stride_batch * (batch - 1) +
                            (double)e->bias_stride_head * (l->n_heads - 1) +
                            (double)e->bias_stride_row * (q_len - 1) + (double)(kv_len - 1);
        SA_CHECK(last < (double)PTRDIFF_MAX / (double)sizeof(float) / 2, SELFATTN_ERR_OVERFLOW);
    }
    *e_out = copy;
    return SELFATTN_OK;
}

/* ---- K and V in head-major layout ---- */

/* Below this many queries a call is bound by memory, not by its GEMMs: copying K and V would cost
   about what it saves. */
#define SA_HEADMAJOR_MIN_Q 64

typedef struct sa_kv_copy {
    const float *k, *v; /* [batch][len][ldk or ldv]: K head g at column g * hd, V head at g * dv */
    size_t ldk, ldv;
    int32_t batch, len, n_kv, hd, dv;
    const int32_t *lengths; /* rows past lengths[b] are not needed */
    float *kh, *vh;         /* [batch][n_kv][len][hd], [batch][n_kv][len][dv] */
} sa_kv_copy;

static void sa_kv_copy_task(void *arg, int worker, int task)
{
    (void)worker;
    const sa_kv_copy *c = arg;
    const int32_t b = task / c->n_kv, g = task % c->n_kv;
    const int32_t rows = c->lengths != NULL ? c->lengths[b] : c->len;
    const size_t hd = (size_t)c->hd, dv = (size_t)c->dv;
    const size_t ksrc0 = (size_t)b * c->len * c->ldk + (size_t)g * hd;
    const size_t vsrc0 = (size_t)b * c->len * c->ldv + (size_t)g * dv;
    const size_t kdst0 = ((size_t)b * c->n_kv + g) * c->len * hd;
    const size_t vdst0 = ((size_t)b * c->n_kv + g) * c->len * dv;
    for (int32_t t = 0; t < rows; t++) {
        memcpy(c->kh + kdst0 + (size_t)t * hd, c->k + ksrc0 + (size_t)t * c->ldk,
               hd * sizeof(float));
        memcpy(c->vh + vdst0 + (size_t)t * dv, c->v + vsrc0 + (size_t)t * c->ldv,
               dv * sizeof(float));
    }
}

/* Copies K and V into head-major arrays (each head's rows contiguous: BLAS packs them from one
   stream, about 5-10% faster attention GEMMs on the machine this was measured on) and points the
   description at them. */
static void sa_use_headmajor(sa_attn *a, const sa_kv_copy *c, int workers)
{
    sa_run_tasks(workers, c->batch * c->n_kv, sa_kv_copy_task, (void *)c);
    a->k = c->kh;
    a->v = c->vh;
    a->ldk = (size_t)c->hd;
    a->ldv = (size_t)c->dv;
    a->k_hs = (size_t)c->len * (size_t)c->hd;
    a->v_hs = (size_t)c->len * (size_t)c->dv;
    a->k_bs = (size_t)c->n_kv * a->k_hs;
    a->v_bs = (size_t)c->n_kv * a->v_hs;
}

/* ---- Entry points ---- */

static selfattn_status sa_attend_ex(const selfattn_layer *layer, int32_t batch, int32_t q_len,
                                    int32_t kv_len, const float *q, const float *k, const float *v,
                                    const int32_t *kv_lengths, const selfattn_extras *extras,
                                    float *out)
{
    SA_CHECK_NULL(layer);
    SA_CHECK_NULL(q);
    SA_CHECK_NULL(k);
    SA_CHECK_NULL(v);
    SA_CHECK_NULL(out);
    selfattn_status st = sa_check_attend_call(layer, batch, q_len, kv_len);
    SA_CHECK(st == SELFATTN_OK, st);
    const sa_widths wd = sa_layer_widths(layer);
    const size_t nq = wd.nq, nkv = wd.nkv, nq_v = wd.nq_v, nkv_v = wd.nkv_v;
    selfattn_extras extras_copy;
    st = sa_check_extras(extras, layer, batch, q_len, kv_len, &extras_copy, &extras);
    SA_CHECK(st == SELFATTN_OK, st);
    /* Arrays are read only once the sizes are known to be addressable. */
    st = sa_check_lengths(kv_lengths, batch, kv_len, "kv_lengths", "kv_len");
    SA_CHECK(st == SELFATTN_OK, st);

    sa_attn a;
    sa_attn_plan plan;
    sa_attn_from_layer(&a, layer, batch, q_len, kv_len, extras);
    a.align = layer->causal; /* attend honours every causal alignment */
    a.stack_heads = 1;
    st = sa_attn_plan_make(&a, &plan);
    SA_CHECK(st == SELFATTN_OK, st);
    const double flops = 2.0 * batch * (double)q_len * kv_len * (double)(nq + nq_v);
    const int workers = sa_workers_for(layer, flops);
    /* scores per worker, then (enough queries to be GEMM-bound) head-major copies of K and V */
    const int headmajor = q_len >= SA_HEADMAJOR_MIN_Q;
    const size_t kv_rows = (size_t)batch * (size_t)kv_len; /* times nkv, nkv_v: addressable */
    sa_ws_plan wp = {0};
    const size_t o_scores = sa_ws_reserve_n(&wp, (size_t)workers, plan.floats_per_worker);
    const size_t o_k = sa_ws_reserve(&wp, headmajor ? kv_rows * nkv : 0);
    const size_t o_v = sa_ws_reserve(&wp, headmajor ? kv_rows * nkv_v : 0);
    sa_ws *ws;
    st = sa_ws_acquire_plan(layer->ws, &wp, &ws);
    SA_CHECK(st == SELFATTN_OK, st);

    a.kv_lengths = kv_lengths;
    a.q = q;
    a.k = k;
    a.v = v;
    a.ldq = nq;
    a.ldo = nq_v;
    a.ldk = nkv;
    a.ldv = nkv_v;
    a.out = out;
    float *wsf = ws->data;
    if (headmajor) {
        const sa_kv_copy c = {.k = k,
                              .v = v,
                              .ldk = nkv,
                              .ldv = nkv_v,
                              .batch = batch,
                              .len = kv_len,
                              .n_kv = layer->n_kv_heads,
                              .hd = layer->head_dim,
                              .dv = sa_layer_dv(layer),
                              .lengths = kv_lengths,
                              .kh = wsf + o_k,
                              .vh = wsf + o_v};
        sa_use_headmajor(&a, &c, workers);
    }
    sa_attn_run(&a, &plan, workers, wsf + o_scores);
    sa_ws_release(layer->ws, ws);
    return SELFATTN_OK;
}

selfattn_status selfattn_attend_ex(const selfattn_layer *layer, int32_t batch, int32_t q_len,
                                   int32_t kv_len, const float *q, const float *k, const float *v,
                                   const int32_t *kv_lengths, const selfattn_extras *extras,
                                   float *out)
{
    sa_err_begin("selfattn_attend_ex");
    return sa_attend_ex(layer, batch, q_len, kv_len, q, k, v, kv_lengths, extras, out);
}

selfattn_status selfattn_attend(const selfattn_layer *layer, int32_t batch, int32_t q_len,
                                int32_t kv_len, const float *q, const float *k, const float *v,
                                const int32_t *kv_lengths, float *out)
{
    sa_err_begin("selfattn_attend");
    return sa_attend_ex(layer, batch, q_len, kv_len, q, k, v, kv_lengths, NULL, out);
}

/* What one forward call needs, from the arguments alone (lengths read once the sizes are known):
   every check passes here, before the workspace is taken and anything is written. */
typedef struct sa_fwd_plan {
    size_t dm, nq, nkv, nq_v, nkv_v, nqkv, rows, valid;
    sa_rows batch_rows;
    int workers, headmajor;
    sa_attn a; /* the core's description, its pointers set at run time */
    sa_attn_plan attn;
    sa_ws_plan ws; /* qkv [rows][nqkv] and attn [rows][nq_v] (unless the training state keeps them
                      or, for attn, y takes it), the scores per worker, head-major K and V */
    size_t o_qkv, o_attn, o_scores, o_kv, o_panel;
} sa_fwd_plan;

static selfattn_status sa_fwd_plan_make(const selfattn_layer *layer, int32_t batch, int32_t seq_len,
                                        const float *x, const int32_t *lengths,
                                        const selfattn_extras *extras, const float *y, int kept,
                                        sa_fwd_plan *p)
{
    SA_CHECK_NULL(layer);
    SA_CHECK_NULL(x);
    SA_CHECK_NULL(y);
    selfattn_status st = sa_check_batch_call(layer, batch, seq_len);
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
    selfattn_extras extras_copy;
    st = sa_check_extras(extras, layer, batch, seq_len, seq_len, &extras_copy, &extras);
    SA_CHECK(st == SELFATTN_OK, st);
    /* Arrays are read only once the sizes are known to be addressable. */
    st = sa_check_lengths(lengths, batch, seq_len, "lengths", "seq_len");
    SA_CHECK(st == SELFATTN_OK, st);

    p->valid = sa_valid_rows(lengths, batch, seq_len);
    p->batch_rows = (sa_rows){.batch = batch, .seq_len = seq_len, .lengths = lengths};
    const double flops = 2.0 * (double)p->valid * (double)p->dm * (double)(p->nqkv + p->nq_v) +
                         2.0 * (double)p->valid * seq_len * (double)(p->nq + p->nq_v);
    p->workers = sa_workers_for(layer, flops);
    sa_attn_from_layer(&p->a, layer, batch, seq_len, seq_len, extras);
    p->a.stack_heads = 1;
    st = sa_attn_plan_make(&p->a, &p->attn);
    SA_CHECK(st == SELFATTN_OK, st);

    p->headmajor = seq_len >= SA_HEADMAJOR_MIN_Q;
    p->o_qkv = sa_ws_reserve(&p->ws, kept ? 0 : p->rows * p->nqkv);
    p->o_attn = sa_ws_reserve(&p->ws, !kept && layer->out_proj ? p->rows * p->nq_v : 0);
    p->o_scores = sa_ws_reserve_n(&p->ws, (size_t)p->workers, p->attn.floats_per_worker);
    p->o_kv = sa_ws_reserve(&p->ws, p->headmajor ? p->rows * (p->nkv + p->nkv_v) : 0);
    p->o_panel = sa_ws_reserve_n(&p->ws, (size_t)p->workers, sa_layer_panel_floats(layer));
    return SELFATTN_OK;
}

selfattn_status sa_forward(const selfattn_layer *layer, int32_t batch, int32_t seq_len,
                           const float *x, const int32_t *lengths, const selfattn_extras *extras,
                           float *y, const sa_keep *keep)
{
    sa_fwd_plan p;
    selfattn_status st =
        sa_fwd_plan_make(layer, batch, seq_len, x, lengths, extras, y, keep != NULL, &p);
    SA_CHECK(st == SELFATTN_OK, st);
    sa_ws *ws;
    st = sa_ws_acquire_plan(layer->ws, &p.ws, &ws);
    SA_CHECK(st == SELFATTN_OK, st);

    const size_t dm = p.dm, nq = p.nq, nkv = p.nkv, nq_v = p.nq_v, nqkv = p.nqkv;
    const int workers = p.workers;
    float *wsf = ws->data;
    float *qkv = keep != NULL ? keep->qkv : wsf + p.o_qkv;
    float *attn = keep != NULL ? keep->o : layer->out_proj ? wsf + p.o_attn : y;
    sa_attn *a = &p.a;
    a->kv_lengths = lengths;
    a->pad_queries = 1;
    a->q = qkv;
    a->k = qkv + nq;
    a->v = qkv + nq + nkv;
    a->ldq = a->ldk = a->ldv = nqkv;
    a->out = attn;
    a->ldo = nq_v;
    if (keep != NULL)
        a->lse = keep->lse;

    if (p.valid > 0) {
        sa_in_proj(layer, x, qkv, &p.batch_rows, p.valid, 0, wsf + p.o_panel, workers);
        sa_rope_apply(layer, qkv, nqkv, batch, seq_len, lengths, NULL, 0, workers);
        if (p.headmajor) {
            const sa_kv_copy c = {.k = qkv + nq,
                                  .v = qkv + nq + nkv,
                                  .ldk = nqkv,
                                  .ldv = nqkv,
                                  .batch = batch,
                                  .len = seq_len,
                                  .n_kv = layer->n_kv_heads,
                                  .hd = layer->head_dim,
                                  .dv = sa_layer_dv(layer),
                                  .lengths = lengths,
                                  .kh = wsf + p.o_kv,
                                  .vh = wsf + p.o_kv + p.rows * nkv};
            sa_use_headmajor(a, &c, workers);
        }
    }
    /* Even with no valid row the core runs: it writes the weights and lse of padding rows. */
    sa_attn_run(a, &p.attn, workers, wsf + p.o_scores);
    if (p.valid > 0 && layer->out_proj) {
        sa_out_proj(layer, attn, y, &p.batch_rows, p.valid, wsf + p.o_panel, workers);
    } else if (!layer->out_proj && attn != y) { /* kept O without an output projection: y is O */
        for (int32_t b = 0; b < batch; b++) {
            const size_t len = lengths != NULL ? (size_t)lengths[b] : (size_t)seq_len;
            memcpy(y + (size_t)b * seq_len * dm, attn + (size_t)b * seq_len * nq_v,
                   len * nq_v * sizeof(float));
        }
    }
    sa_zero_padding(y, dm, lengths, batch, seq_len);
    sa_ws_release(layer->ws, ws);
    return SELFATTN_OK;
}

selfattn_status selfattn_forward_ex(const selfattn_layer *layer, int32_t batch, int32_t seq_len,
                                    const float *x, const int32_t *lengths,
                                    const selfattn_extras *extras, float *y)
{
    sa_err_begin("selfattn_forward_ex");
    return sa_forward(layer, batch, seq_len, x, lengths, extras, y, NULL);
}

selfattn_status selfattn_forward(const selfattn_layer *layer, int32_t batch, int32_t seq_len,
                                 const float *x, const int32_t *lengths, float *y)
{
    sa_err_begin("selfattn_forward");
    return sa_forward(layer, batch, seq_len, x, lengths, NULL, y, NULL);
}
