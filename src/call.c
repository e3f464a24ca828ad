/* The plumbing every entry point shares: the checks of lengths and of the 1.1 structs'
 * struct_size, the valid rows of a padded batch, the score description of a layer's options
 * (sa_attn) that the attention core takes, and the projections. (The BLAS and the worker count:
 * blas.c.) */
#include <stdio.h>
#include <string.h>

#include "internal.h"

selfattn_status sa_check_lengths(const int32_t *lengths, int32_t batch, int32_t max,
                                 const char *name, const char *max_name)
{
    if (lengths == NULL)
        return SELFATTN_OK;
    for (int32_t b = 0; b < batch; b++) {
        SA_CHECKF(lengths[b] >= 0, SELFATTN_ERR_INVALID, "%s[%d] = %d is negative", name, b,
                  lengths[b]);
        SA_CHECKF(lengths[b] <= max, SELFATTN_ERR_INVALID, "%s[%d] = %d exceeds %s %d", name, b,
                  lengths[b], max_name, max);
    }
    return SELFATTN_OK;
}

selfattn_status sa_check_head_dim(const selfattn_layer *l)
{
    SA_CHECKF(l->head_dim != 0, SELFATTN_ERR_STATE,
              "head_dim is undetermined: d_model %d is not divisible by n_heads %d; set "
              "SELFATTN_OPT_HEAD_DIM",
              l->d_model, l->n_heads);
    return SELFATTN_OK;
}

selfattn_status sa_check_batch_call(const selfattn_layer *l, int32_t batch, int32_t seq_len)
{
    SA_CHECKF(batch >= 1 && seq_len >= 1, SELFATTN_ERR_INVALID,
              "batch %d and seq_len %d must both be >= 1", batch, seq_len);
    const selfattn_status st = sa_check_weights(l);
    SA_CHECK(st == SELFATTN_OK, st);
    const size_t rows = (size_t)batch * (size_t)seq_len; /* < 2^62 */
    const sa_widths wd = sa_layer_widths(l);
    SA_CHECKF(sa_array_bytes(rows, (size_t)l->d_model) != 0 && sa_array_bytes(rows, wd.nqkv) != 0 &&
                  sa_array_bytes(rows, wd.nq_v) != 0,
              SELFATTN_ERR_OVERFLOW,
              "batch %d x seq_len %d rows of d_model %d (and of the %zu projected columns, the "
              "%zu attention outputs) do not fit in memory's address range",
              batch, seq_len, l->d_model, wd.nqkv, wd.nq_v);
    return SELFATTN_OK;
}

selfattn_status sa_check_attend_call(const selfattn_layer *l, int32_t batch, int32_t q_len,
                                     int32_t kv_len)
{
    SA_CHECKF(batch >= 1 && q_len >= 1 && kv_len >= 1, SELFATTN_ERR_INVALID,
              "batch %d, q_len %d and kv_len %d must all be >= 1", batch, q_len, kv_len);
    const selfattn_status st = sa_check_head_dim(l);
    SA_CHECK(st == SELFATTN_OK, st);
    const sa_widths wd = sa_layer_widths(l);
    const size_t nq = wd.nq > wd.nq_v ? wd.nq : wd.nq_v,
                 nkv = wd.nkv > wd.nkv_v ? wd.nkv : wd.nkv_v;
    SA_CHECKF(sa_array_bytes((size_t)batch * (size_t)q_len, nq) != 0 &&
                  sa_array_bytes((size_t)batch * (size_t)kv_len, nkv) != 0,
              SELFATTN_ERR_OVERFLOW,
              "batch %d x q_len %d (or kv_len %d) rows do not fit in memory's address range", batch,
              q_len, kv_len);
    return SELFATTN_OK;
}

selfattn_status sa_check_weights(const selfattn_layer *l)
{
    const selfattn_status st = sa_check_head_dim(l);
    SA_CHECK(st == SELFATTN_OK, st);
    const unsigned need = SA_HAVE_Q | SA_HAVE_K | SA_HAVE_V | (l->out_proj ? SA_HAVE_O : 0u);
    if ((l->have & need) == need)
        return SELFATTN_OK;
    static const char *const names[4] = {"W_Q", "W_K", "W_V", "W_O"};
    char missing[32] = "";
    size_t at = 0;
    for (int i = 0; i < 4; i++)
        if ((need & (1u << i)) && !(l->have & (1u << i))) {
            const int n =
                snprintf(missing + at, sizeof missing - at, "%s%s", at ? ", " : "", names[i]);
            at += n > 0 ? (size_t)n : 0; /* at most 18 characters in all */
        }
    sa_fail(SELFATTN_ERR_STATE, "%s not set (selfattn_layer_set_weight before a call%s)", missing,
            !(l->have & SA_HAVE_O) && l->out_proj
                ? "; without an output projection, OUT_PROJ 0 before any weight"
                : "");
    return SELFATTN_ERR_STATE;
}

size_t sa_valid_rows(const int32_t *lengths, int32_t batch, int32_t seq_len)
{
    if (lengths == NULL)
        return (size_t)batch * (size_t)seq_len;
    size_t valid = 0;
    for (int32_t b = 0; b < batch; b++)
        valid += (size_t)lengths[b];
    return valid;
}

void sa_zero_padding(float *out, size_t width, const int32_t *lengths, int32_t batch,
                     int32_t seq_len)
{
    for (int32_t b = 0; lengths != NULL && b < batch; b++)
        if (lengths[b] < seq_len)
            memset(out + ((size_t)b * seq_len + (size_t)lengths[b]) * width, 0,
                   (size_t)(seq_len - lengths[b]) * width * sizeof(float));
}

selfattn_status sa_check_struct_size(const void *s, uint32_t struct_size, size_t least,
                                     size_t known, const char *name)
{
    SA_CHECKF(struct_size >= least, SELFATTN_ERR_INVALID,
              "%s->struct_size %u is below the smallest valid size %zu (set it to sizeof)", name,
              struct_size, least);
    const unsigned char *bytes = s;
    for (size_t i = known; i < struct_size; i++)
        SA_CHECKF(bytes[i] == 0, SELFATTN_ERR_UNSUPPORTED,
                  "%s->struct_size %u: byte %zu past this library's %zu is set (a newer field "
                  "this library does not know)",
                  name, struct_size, i, known);
    return SELFATTN_OK;
}

/* The score description of a layer's options, shared by every entry point. */
void sa_attn_from_layer(sa_attn *a, const selfattn_layer *l, int32_t batch, int32_t q_len,
                        int32_t kv_len, const selfattn_extras *e)
{
    memset(a, 0, sizeof *a);
    a->batch = batch;
    a->q_len = q_len;
    a->kv_len = kv_len;
    a->n_heads = l->n_heads;
    a->group = l->n_heads / l->n_kv_heads;
    a->head_dim = l->head_dim;
    a->v_dim = sa_layer_dv(l);
    a->scale = sa_layer_scale(l);
    a->softcap = l->softcap;
    a->alibi = l->alibi;
    a->causal = l->causal != 0; /* the alignment (2, 3) is the attend calls' to set */
    a->window = l->window;
    if (e != NULL) {
        a->bias = e->attn_bias;
        a->bias_sb = e->bias_stride_batch;
        a->bias_sh = e->bias_stride_head;
        a->bias_sr = e->bias_stride_row;
        a->weights = e->weights;
        a->lse = e->lse;
        a->scores = e->scores;
        a->scores_stage = e->scores_stage;
    }
}

size_t sa_layer_panel_floats(const selfattn_layer *l)
{
    if (l->weight_dtype == SELFATTN_DTYPE_F32)
        return 0;
    const sa_widths wd = sa_layer_widths(l);
    const size_t k[3] = {(size_t)l->d_model, wd.nq_v, wd.nqkv}; /* the products' inner sizes */
    size_t most = 0;
    for (int i = 0; i < 3; i++) {
        const size_t f = sa_rowprod_panel_floats(k[i]);
        most = f > most ? f : most;
    }
    return most;
}

void sa_in_proj(const selfattn_layer *l, const float *x, float *qkv, const sa_rows *rows,
                size_t valid, int fixed_chunks, float *panel, int workers)
{
    const size_t dm = (size_t)l->d_model;
    const size_t nqkv = sa_layer_widths(l).nqkv;
    const sa_rowprod p = {.in = x,
                          .ld_in = dm,
                          .k = dm,
                          .w = l->w_qkv,
                          .w16 = l->h_qkv,
                          .w_dtype = l->weight_dtype,
                          .panel = panel,
                          .ld_w = dm,
                          .w_is_linear = 1,
                          .bias = l->b_qkv,
                          .out = qkv,
                          .ld_out = nqkv,
                          .n = nqkv,
                          .rows = *rows,
                          .valid_rows = valid,
                          .fixed_chunks = fixed_chunks};
    sa_rowprod_run(&p, workers);
}

void sa_out_proj(const selfattn_layer *l, const float *attn, float *y, const sa_rows *rows,
                 size_t valid, float *panel, int workers)
{
    const size_t dm = (size_t)l->d_model, nq = sa_layer_widths(l).nq_v;
    const sa_rowprod p = {.in = attn,
                          .ld_in = nq,
                          .k = nq,
                          .w = l->w_o,
                          .w16 = l->h_o,
                          .w_dtype = l->weight_dtype,
                          .panel = panel,
                          .ld_w = nq,
                          .w_is_linear = 1,
                          .bias = l->b_o,
                          .out = y,
                          .ld_out = dm,
                          .n = dm,
                          .rows = *rows,
                          .valid_rows = valid};
    sa_rowprod_run(&p, workers);
}
