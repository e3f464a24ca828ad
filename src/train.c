/* Training with kept activations: selfattn_train_state_size, selfattn_forward_train and
 * selfattn_backward_train. The forward keeps what the backward would otherwise recompute (Q, K and
 * V after RoPE, the attention output before the output projection and each row's log-sum-exp) in
 * a buffer the caller owns, so the backward skips the input projection and the attention's
 * forward: 8 projection and 5 attention products instead of 11 and 7.
 *
 * The buffer starts with a header that ties it to the call that filled it: the layer (its serial
 * number and the count of its changes), batch, seq_len and the lengths. selfattn_backward_train
 * refuses a state whose header does not match its own call (SELFATTN_ERR_STATE), so a state
 * filled by another layer, for other shapes, or before the layer's weights or options changed is
 * never used. Layout (each part on a 64-byte boundary from the start of the buffer):
 *   header, lengths [batch] | qkv [batch * seq_len][nq + nkv + nkv_v] | O [batch * seq_len][nq_v] |
 *   lse [batch][n_heads][seq_len] */
#include <stdint.h>
#include <string.h>

#include "internal.h"

#define SA_TRAIN_MAGIC 0x31534e4152544153ull /* "SATRANS1" */

typedef struct sa_train_header {
    uint64_t magic;
    uint64_t serial, version; /* the layer's, at the forward */
    int32_t batch, seq_len;
    int32_t has_lengths;
    int32_t pad_;
} sa_train_header;

typedef struct sa_train_layout {
    size_t o_qkv, o_o, o_lse; /* floats from the start; the header and lengths come first */
    size_t bytes;
} sa_train_layout;

static selfattn_status sa_train_plan(const selfattn_layer *layer, int32_t batch, int32_t seq_len,
                                     sa_train_layout *t)
{
    SA_CHECKF(batch >= 1 && seq_len >= 1, SELFATTN_ERR_INVALID,
              "batch %d and seq_len %d must both be >= 1", batch, seq_len);
    const selfattn_status st_hd = sa_check_head_dim(layer);
    SA_CHECK(st_hd == SELFATTN_OK, st_hd);
    const sa_widths wd = sa_layer_widths(layer);
    const size_t rows = (size_t)batch * (size_t)seq_len; /* < 2^62 */
    size_t head_rows;
    SA_CHECK(sa_array_bytes(rows, wd.nqkv) != 0 && sa_array_bytes(rows, wd.nq_v) != 0 &&
                 sa_mul_size(rows, (size_t)layer->n_heads, &head_rows),
             SELFATTN_ERR_OVERFLOW);
    sa_ws_plan wp = {0};
    sa_ws_reserve(&wp, (sizeof(sa_train_header) + (size_t)batch * sizeof(int32_t) + 3) / 4);
    t->o_qkv = sa_ws_reserve(&wp, rows * wd.nqkv);
    t->o_o = sa_ws_reserve(&wp, rows * wd.nq_v);
    t->o_lse = sa_ws_reserve(&wp, head_rows);
    t->bytes = sa_ws_plan_bytes(&wp);
    SA_CHECK(t->bytes != 0, SELFATTN_ERR_OVERFLOW);
    return SELFATTN_OK;
}

selfattn_status selfattn_train_state_size(const selfattn_layer *layer, int32_t batch,
                                          int32_t seq_len, size_t *bytes)
{
    sa_err_begin("selfattn_train_state_size");
    SA_CHECK_NULL(layer);
    SA_CHECK_NULL(bytes);
    sa_train_layout t = {0};
    const selfattn_status st = sa_train_plan(layer, batch, seq_len, &t);
    SA_CHECK(st == SELFATTN_OK, st);
    *bytes = t.bytes;
    return SELFATTN_OK;
}

/* The state's size and alignment for this call. */
static selfattn_status sa_train_check_buffer(const selfattn_layer *layer, int32_t batch,
                                             int32_t seq_len, const void *state, size_t state_bytes,
                                             sa_train_layout *t)
{
    const selfattn_status st = sa_train_plan(layer, batch, seq_len, t);
    SA_CHECK(st == SELFATTN_OK, st);
    SA_CHECK(state_bytes >= t->bytes && (uintptr_t)state % sizeof(uint64_t) == 0,
             SELFATTN_ERR_INVALID);
    return SELFATTN_OK;
}

selfattn_status selfattn_forward_train(const selfattn_layer *layer, int32_t batch, int32_t seq_len,
                                       const float *x, const int32_t *lengths, float *y,
                                       void *state, size_t state_bytes)
{
    sa_err_begin("selfattn_forward_train");
    SA_CHECK_NULL(layer);
    SA_CHECK_NULL(x);
    SA_CHECK_NULL(y);
    SA_CHECK_NULL(state);
    sa_train_layout t = {0};
    selfattn_status st = sa_train_check_buffer(layer, batch, seq_len, state, state_bytes, &t);
    SA_CHECK(st == SELFATTN_OK, st);
    float *base = state;
    const sa_keep keep = {.qkv = base + t.o_qkv, .o = base + t.o_o, .lse = base + t.o_lse};
    /* checks everything before its first write: on failure the state is as it was */
    st = sa_forward(layer, batch, seq_len, x, lengths, NULL, y, &keep);
    SA_CHECK(st == SELFATTN_OK, st);
    sa_train_header h;
    memset(&h, 0, sizeof h);
    h.magic = SA_TRAIN_MAGIC;
    h.serial = layer->serial;
    h.version = layer->version;
    h.batch = batch;
    h.seq_len = seq_len;
    h.has_lengths = lengths != NULL;
    memcpy(state, &h, sizeof h);
    if (lengths != NULL)
        memcpy((char *)state + sizeof h, lengths, (size_t)batch * sizeof(int32_t));
    return SELFATTN_OK;
}

selfattn_status selfattn_backward_train(const selfattn_layer *layer, int32_t batch, int32_t seq_len,
                                        const float *x, const int32_t *lengths, const float *dy,
                                        float *dx, const selfattn_grads *grads, const void *state,
                                        size_t state_bytes)
{
    sa_err_begin("selfattn_backward_train");
    SA_CHECK_NULL(layer);
    SA_CHECK_NULL(x);
    SA_CHECK_NULL(dy);
    SA_CHECK_NULL(state);
    sa_train_layout t = {0};
    selfattn_status st = sa_train_plan(layer, batch, seq_len, &t);
    SA_CHECK(st == SELFATTN_OK, st);
    /* the header first: a state of another call is STATE whatever its size */
    SA_CHECK(state_bytes >= sizeof(sa_train_header) && (uintptr_t)state % sizeof(uint64_t) == 0,
             SELFATTN_ERR_INVALID);
    sa_train_header h;
    memcpy(&h, state, sizeof h);
    SA_CHECK(h.magic == SA_TRAIN_MAGIC && h.serial == layer->serial &&
                 h.version == layer->version && h.batch == batch && h.seq_len == seq_len &&
                 h.has_lengths == (lengths != NULL),
             SELFATTN_ERR_STATE);
    SA_CHECK(state_bytes >= t.bytes, SELFATTN_ERR_INVALID);
    if (lengths != NULL)
        SA_CHECK(memcmp((const char *)state + sizeof h, lengths, (size_t)batch * sizeof(int32_t)) ==
                     0,
                 SELFATTN_ERR_STATE);
    const float *base = state;
    const sa_kept kept = {.qkv = base + t.o_qkv, .o = base + t.o_o, .lse = base + t.o_lse};
    return sa_backward(layer, batch, seq_len, x, lengths, dy, dx, grads, &kept);
}
