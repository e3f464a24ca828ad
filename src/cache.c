/* The key/value cache and selfattn_forward_cached.
 *
 * Keys and values are stored head-major, [seq][kv head][row][head_dim] (values: [dv], the value
 * heads' width, SELFATTN_OPT_V_HEAD_DIM): a decoding step streams
 * each head's keys and values as one contiguous block (the core reads them through its K/V head
 * stride), and appending a token copies one head_dim row per head. Without a window, position p is
 * row p. With a window the cache is a ring of `capacity` slots, position p in slot p % capacity,
 * and every row is stored twice, at its slot and at slot + capacity: any run of at most `capacity`
 * consecutive positions is then one contiguous run of rows, which the core reads as it reads a
 * plain sequence.
 *
 * A call projects the new rows, applies RoPE at their positions, appends K and V, runs the core
 * once per sequence (all in one parallel region: query t of sequence s at relative position
 * L - lo + t over keys from position lo, which leaves causality, the window and ALiBi, all
 * functions of position differences, as they are), then the output projection. Every check and
 * the workspace come first: a failed call changes nothing. */
#include <string.h>

#include "internal.h"

struct selfattn_cache {
    const selfattn_layer *layer;
    int32_t n_seqs, capacity;
    /* the layer's settings at create */
    int32_t window, rope, rope_dims, n_kv_heads, head_dim, v_dim, kv_dtype;
    double rope_theta;
    size_t elem;    /* bytes of a stored element: 4, or 2 for F16 and BF16 */
    size_t width;   /* n_kv_heads * head_dim */
    size_t v_width; /* n_kv_heads * v_dim */
    size_t rows;    /* rows per sequence: capacity, or 2 * capacity for a ring */
    int64_t *len;   /* [n_seqs] positions processed */
    int64_t *kept;  /* [n_seqs] the first position still stored (a ring overwrites older ones) */
    void *k, *v;    /* [n_seqs][n_kv_heads][rows][head_dim or v_dim] of kv_dtype */
};

selfattn_status selfattn_cache_create(const selfattn_layer *layer, int32_t n_seqs, int32_t capacity,
                                      selfattn_cache **out)
{
    sa_err_begin("selfattn_cache_create");
    SA_CHECK_NULL(layer);
    SA_CHECK_NULL(out);
    SA_CHECKF(n_seqs >= 1 && capacity >= 1, SELFATTN_ERR_INVALID,
              "n_seqs %d and capacity %d must both be >= 1", n_seqs, capacity);
    const selfattn_status st_hd = sa_check_head_dim(layer);
    SA_CHECK(st_hd == SELFATTN_OK, st_hd);
    const size_t width = (size_t)layer->n_kv_heads * (size_t)layer->head_dim;
    const size_t v_width = (size_t)layer->n_kv_heads * (size_t)sa_layer_dv(layer);
    const size_t rows = (size_t)capacity * (layer->window > 0 ? 2 : 1);
    size_t per_seq, v_per_seq;
    SA_CHECK(sa_mul_size(rows, width, &per_seq) && per_seq <= INT32_MAX &&
                 sa_array_bytes((size_t)n_seqs, per_seq) != 0 &&
                 sa_mul_size(rows, v_width, &v_per_seq) && v_per_seq <= INT32_MAX &&
                 sa_array_bytes((size_t)n_seqs, v_per_seq) != 0,
             SELFATTN_ERR_OVERFLOW);
    const size_t elem = layer->kv_dtype == SELFATTN_DTYPE_F32 ? sizeof(float) : sizeof(uint16_t);
    const size_t bytes = sa_array_bytes((size_t)n_seqs, per_seq) / sizeof(float) * elem;
    const size_t v_bytes = sa_array_bytes((size_t)n_seqs, v_per_seq) / sizeof(float) * elem;

    selfattn_cache *c = sa_calloc(1, sizeof *c);
    SA_CHECK(c != NULL, SELFATTN_ERR_NOMEM);
    c->len = sa_calloc(2 * (size_t)n_seqs, sizeof *c->len);
    c->k = sa_malloc(bytes);
    c->v = sa_malloc(v_bytes);
    if (c->len == NULL || c->k == NULL || c->v == NULL) {
        selfattn_cache_destroy(c);
        return SELFATTN_ERR_NOMEM;
    }
    c->kept = c->len + n_seqs;
    c->layer = layer;
    c->n_seqs = n_seqs;
    c->capacity = capacity;
    c->window = layer->window;
    c->rope = layer->rope;
    c->rope_dims = layer->rope_dims;
    c->rope_theta = layer->rope_theta;
    c->n_kv_heads = layer->n_kv_heads;
    c->head_dim = layer->head_dim;
    c->v_dim = sa_layer_dv(layer);
    c->kv_dtype = layer->kv_dtype;
    c->elem = elem;
    c->width = width;
    c->v_width = v_width;
    c->rows = rows;
    *out = c;
    return SELFATTN_OK;
}

void selfattn_cache_destroy(selfattn_cache *cache)
{
    if (cache == NULL)
        return;
    sa_free(cache->len);
    sa_free(cache->k);
    sa_free(cache->v);
    sa_free(cache);
}

selfattn_status selfattn_cache_length(const selfattn_cache *cache, int32_t seq, int32_t *length)
{
    sa_err_begin("selfattn_cache_length");
    SA_CHECK_NULL(cache);
    SA_CHECK_NULL(length);
    SA_CHECKF(seq >= 0 && seq < cache->n_seqs, SELFATTN_ERR_INVALID,
              "seq %d is outside [0, n_seqs %d)", seq, cache->n_seqs);
    *length = (int32_t)cache->len[seq]; /* calls never take it past INT32_MAX */
    return SELFATTN_OK;
}

/* The first position a token at position p needs. */
static int64_t sa_cache_first_needed(const selfattn_cache *c, int64_t p)
{
    if (c->window <= 0)
        return 0;
    const int64_t f = p - c->window + 1;
    return f > 0 ? f : 0;
}

selfattn_status selfattn_cache_truncate(selfattn_cache *cache, int32_t seq, int32_t length)
{
    sa_err_begin("selfattn_cache_truncate");
    SA_CHECK_NULL(cache);
    SA_CHECKF(seq >= -1 && seq < cache->n_seqs, SELFATTN_ERR_INVALID,
              "seq %d is outside [-1, n_seqs %d)", seq, cache->n_seqs);
    SA_CHECKF(length >= 0, SELFATTN_ERR_INVALID, "length %d is negative", length);
    const int32_t s0 = seq < 0 ? 0 : seq, s1 = seq < 0 ? cache->n_seqs : seq + 1;
    /* check every sequence first: all or nothing */
    for (int32_t s = s0; s < s1; s++) {
        if (length > cache->len[s]) {
            SA_CHECKF(seq < 0, SELFATTN_ERR_INVALID, /* with -1, shorter ones stay as they are */
                      "length %d is above sequence %d's length %lld", length, s,
                      (long long)cache->len[s]);
            continue;
        }
        SA_CHECK(sa_cache_first_needed(cache, length) >= cache->kept[s] || length == 0,
                 SELFATTN_ERR_INVALID);
    }
    for (int32_t s = s0; s < s1; s++)
        if (length < cache->len[s]) {
            cache->len[s] = length;
            if (length == 0)
                cache->kept[s] = 0;
        }
    return SELFATTN_OK;
}

selfattn_status selfattn_cache_copy(selfattn_cache *cache, int32_t src_seq, int32_t dst_seq)
{
    sa_err_begin("selfattn_cache_copy");
    SA_CHECK_NULL(cache);
    SA_CHECKF(src_seq >= 0 && src_seq < cache->n_seqs && dst_seq >= 0 && dst_seq < cache->n_seqs,
              SELFATTN_ERR_INVALID, "src_seq %d or dst_seq %d is outside [0, n_seqs %d)", src_seq,
              dst_seq, cache->n_seqs);
    if (src_seq == dst_seq)
        return SELFATTN_OK;
    const size_t hd = (size_t)cache->head_dim, head = cache->rows * hd;
    const size_t dv = (size_t)cache->v_dim, v_head = cache->rows * dv;
    /* only the rows in use: a short prompt in a large cache copies little */
    const int64_t used = cache->window > 0 ? (int64_t)cache->rows : cache->len[src_seq];
    const size_t n = (size_t)used * hd * cache->elem, v_n = (size_t)used * dv * cache->elem;
    char *k = cache->k, *v = cache->v;
    for (int32_t g = 0; g < cache->n_kv_heads; g++) {
        const size_t src = ((size_t)src_seq * cache->n_kv_heads + g) * head * cache->elem;
        const size_t dst = ((size_t)dst_seq * cache->n_kv_heads + g) * head * cache->elem;
        const size_t v_src = ((size_t)src_seq * cache->n_kv_heads + g) * v_head * cache->elem;
        const size_t v_dst = ((size_t)dst_seq * cache->n_kv_heads + g) * v_head * cache->elem;
        memcpy(k + dst, k + src, n);
        memcpy(v + v_dst, v + v_src, v_n);
    }
    cache->len[dst_seq] = cache->len[src_seq];
    cache->kept[dst_seq] = cache->kept[src_seq];
    return SELFATTN_OK;
}

/* Offset of row `slot` of K/V head 0 of sequence s in the K (width head_dim) or V (v_dim) store. */
static size_t sa_cache_at(const selfattn_cache *c, int32_t s, size_t slot, int32_t width)
{
    return ((size_t)s * (size_t)c->n_kv_heads * c->rows + slot) * (size_t)width;
}

/* Stores the K and V rows (all heads, [n_kv_heads * head_dim] and [n_kv_heads * v_dim] as
   projected) of position p of sequence s (twice in a ring). */
static void sa_cache_store(selfattn_cache *c, int32_t s, int64_t p, const float *k, const float *v)
{
    const size_t hd = (size_t)c->head_dim, head = c->rows * hd;
    const size_t dv = (size_t)c->v_dim, v_head = c->rows * dv;
    const size_t slot = c->window > 0 ? (size_t)(p % c->capacity) : (size_t)p;
    const int copies = c->window > 0 ? 2 : 1;
    /* 16 bits: rounded to nearest even; a value past the range becomes +-inf (it reaches only
       its own sequence) */
    const sa_f32_to_x16_fn narrow =
        c->kv_dtype != SELFATTN_DTYPE_F32 ? sa_kernels_get()->from_f32[c->kv_dtype - 1] : NULL;
    if (c->window > 0 && p - c->capacity + 1 > c->kept[s])
        c->kept[s] = p - c->capacity + 1;
    for (int copy = 0; copy < copies; copy++) {
        const size_t row = slot + (size_t)copy * (size_t)c->capacity;
        const size_t at = sa_cache_at(c, s, row, c->head_dim);
        const size_t v_at = sa_cache_at(c, s, row, c->v_dim);
        for (int32_t g = 0; g < c->n_kv_heads; g++) {
            const size_t to = at + (size_t)g * head, v_to = v_at + (size_t)g * v_head;
            if (narrow != NULL) {
                narrow(k + (size_t)g * hd, (uint16_t *)c->k + to, hd);
                narrow(v + (size_t)g * dv, (uint16_t *)c->v + v_to, dv);
            } else {
                memcpy((float *)c->k + to, k + (size_t)g * hd, hd * sizeof(float));
                memcpy((float *)c->v + v_to, v + (size_t)g * dv, dv * sizeof(float));
            }
        }
    }
}

/* Where the rows holding positions [lo, lo + n) of sequence s start in a store of rows of width:
   one contiguous run. */
static size_t sa_cache_row(const selfattn_cache *c, int32_t s, int64_t lo, int32_t width)
{
    return sa_cache_at(c, s, c->window > 0 ? (size_t)(lo % c->capacity) : (size_t)lo, width);
}

/* What one forward_cached call needs, from the arguments alone (n_new read once the sizes are
   known): every check passes here, before the workspace is taken and anything is written. */
typedef struct sa_cached_plan {
    size_t dm, nq, nkv, nq_v, nkv_v, nqkv, rows, valid, per_worker;
    int workers;
    sa_ws_plan ws; /* qkv [rows][nqkv], attn [rows][nq_v], scratch, and per sequence its attention
                      description, plan, first position and new-token count */
    size_t o_qkv, o_attn, o_scratch, o_desc, o_plans, o_pos0, o_lens, o_panel;
} sa_cached_plan;

/* Floats that hold n objects of `size` bytes (the workspace is 64-byte aligned floats). */
static size_t sa_floats_for(size_t n, size_t size)
{
    return (n * size + sizeof(float) - 1) / sizeof(float); /* n <= INT32_MAX, size small */
}

static selfattn_status sa_cached_plan_make(const selfattn_layer *layer, const selfattn_cache *cache,
                                           int32_t max_new, const float *x, const int32_t *n_new,
                                           const float *y, sa_cached_plan *p)
{
    SA_CHECK_NULL(layer);
    SA_CHECK_NULL(cache);
    SA_CHECK_NULL(x);
    SA_CHECK_NULL(y);
    SA_CHECKF(cache->layer == layer, SELFATTN_ERR_INVALID,
              "the cache was created for another layer");
    SA_CHECKF(layer->causal, SELFATTN_ERR_STATE,
              "the layer is not causal (SELFATTN_OPT_CAUSAL 1, 2 or 3 is needed for a cache)");
    SA_CHECKF(layer->window == cache->window && layer->rope == cache->rope &&
                  layer->rope_dims == cache->rope_dims && layer->rope_theta == cache->rope_theta &&
                  layer->n_kv_heads == cache->n_kv_heads && layer->head_dim == cache->head_dim &&
                  sa_layer_dv(layer) == cache->v_dim && layer->kv_dtype == cache->kv_dtype,
              SELFATTN_ERR_STATE,
              "the layer's WINDOW, ROPE, ROPE_DIMS, ROPE_THETA, N_KV_HEADS, HEAD_DIM, V_HEAD_DIM "
              "or KV_DTYPE changed since the cache was created (WINDOW %d then %d now, V_HEAD_DIM "
              "%d then %d now, KV_DTYPE %d then %d now)",
              cache->window, layer->window, cache->v_dim, sa_layer_dv(layer), cache->kv_dtype,
              layer->kv_dtype);
    const selfattn_status st_w = sa_check_weights(layer);
    SA_CHECK(st_w == SELFATTN_OK, st_w);
    SA_CHECKF(max_new >= 1, SELFATTN_ERR_INVALID, "max_new %d must be >= 1", max_new);

    memset(p, 0, sizeof *p);
    const int32_t n_seqs = cache->n_seqs;
    p->dm = (size_t)layer->d_model;
    const sa_widths wd = sa_layer_widths(layer); /* the cache's widths: checked above */
    p->nq = wd.nq;
    p->nkv = wd.nkv;
    p->nq_v = wd.nq_v;
    p->nkv_v = wd.nkv_v;
    p->nqkv = wd.nqkv;
    p->rows = (size_t)n_seqs * (size_t)max_new;
    SA_CHECK(sa_array_bytes(p->rows, p->dm) != 0, SELFATTN_ERR_OVERFLOW);
    /* Per sequence: the checks, then the scratch a worker needs for its plan (the most any
       sequence's plan asks for, not simply the plan of the longest: a one-token sequence's task
       takes a whole GQA group, a taller block). */
    int32_t max_keys = 1;
    for (int32_t s = 0; s < n_seqs; s++) {
        const int32_t n = n_new != NULL ? n_new[s] : max_new;
        SA_CHECKF(n >= 0 && n <= max_new, SELFATTN_ERR_INVALID,
                  "n_new[%d] = %d is outside [0, max_new %d]", s, n, max_new);
        const int64_t L = cache->len[s];
        SA_CHECK(L + n <= INT32_MAX, SELFATTN_ERR_OVERFLOW);
        const int64_t first = sa_cache_first_needed(cache, L), keys = L + n - first;
        SA_CHECKF(keys <= cache->capacity && first >= cache->kept[s], SELFATTN_ERR_INVALID,
                  "sequence %d: %lld positions needed (%lld kept of %lld, + %d new) exceed the "
                  "cache's capacity %d",
                  s, (long long)keys, (long long)(L - first), (long long)L, n, cache->capacity);
        p->valid += (size_t)n;
        if (n == 0)
            continue;
        if (keys > max_keys)
            max_keys = (int32_t)keys;
        sa_attn a;
        sa_attn_plan ap;
        sa_attn_from_layer(&a, layer, 1, n, (int32_t)keys, NULL);
        a.stack_heads = 1;
        a.kv_dtype = cache->kv_dtype;
        const selfattn_status st = sa_attn_plan_make(&a, &ap);
        SA_CHECK(st == SELFATTN_OK, st);
        if (ap.floats_per_worker > p->per_worker)
            p->per_worker = ap.floats_per_worker;
    }
    /* every sequence's core tasks (at most heads * ceil(n / 32) each) are counted in an int */
    SA_CHECK((int64_t)n_seqs * layer->n_heads * (((int64_t)max_new + 31) / 32) <= INT32_MAX,
             SELFATTN_ERR_OVERFLOW);

    const double flops = 2.0 * (double)p->valid * (double)p->dm * (double)(p->nqkv + p->nq_v) +
                         2.0 * (double)p->valid * max_keys * (double)(p->nq + p->nq_v);
    p->workers = sa_workers_for(layer, flops);
    SA_CHECK(sa_array_bytes(p->rows, p->nqkv) != 0 && sa_array_bytes(p->rows, p->nq_v) != 0,
             SELFATTN_ERR_OVERFLOW);
    const size_t ns = (size_t)n_seqs;
    p->o_qkv = sa_ws_reserve(&p->ws, p->rows * p->nqkv);
    p->o_attn = sa_ws_reserve(&p->ws, layer->out_proj ? p->rows * p->nq_v : 0);
    p->o_scratch = sa_ws_reserve_n(&p->ws, (size_t)p->workers, p->per_worker);
    p->o_desc = sa_ws_reserve(&p->ws, sa_floats_for(ns, sizeof(sa_attn)));
    p->o_plans = sa_ws_reserve(&p->ws, sa_floats_for(ns, sizeof(sa_attn_plan)));
    p->o_pos0 = sa_ws_reserve(&p->ws, sa_floats_for(ns, sizeof(int64_t)));
    p->o_lens = sa_ws_reserve(&p->ws, sa_floats_for(ns, sizeof(int32_t)));
    p->o_panel = sa_ws_reserve_n(&p->ws, (size_t)p->workers, sa_layer_panel_floats(layer));
    return SELFATTN_OK;
}

/* Appends each sequence's new K and V (qkv, after RoPE) to the cache and describes its attention
   (its new queries over the positions it still needs, read from the cache) into desc and plans;
   returns the number of descriptions (sequences with new tokens). */
static int sa_cached_describe(const selfattn_layer *layer, selfattn_cache *cache, int32_t max_new,
                              const int32_t *lens, const sa_cached_plan *p, const float *qkv,
                              float *attn, sa_attn *desc, sa_attn_plan *plans)
{
    const size_t nq = p->nq, nkv = p->nkv, nq_v = p->nq_v, nqkv = p->nqkv;
    int n_desc = 0;
    for (int32_t s = 0; s < cache->n_seqs; s++) {
        const int32_t n = lens[s];
        if (n == 0)
            continue;
        const int64_t L = cache->len[s], lo = sa_cache_first_needed(cache, L);
        for (int32_t t = 0; t < n; t++) {
            const float *row = qkv + ((size_t)s * max_new + t) * nqkv;
            sa_cache_store(cache, s, L + t, row + nq, row + nq + nkv);
        }
        sa_attn *a = &desc[n_desc];
        const int32_t kv_len = (int32_t)(L + n - lo);
        sa_attn_from_layer(a, layer, 1, n, kv_len, NULL);
        a->stack_heads = 1;
        a->q = qkv + (size_t)s * max_new * nqkv;
        a->ldq = nqkv;
        const size_t row = sa_cache_row(cache, s, lo, cache->head_dim);
        const size_t v_row = sa_cache_row(cache, s, lo, cache->v_dim);
        if (cache->kv_dtype != SELFATTN_DTYPE_F32) {
            a->kv_dtype = cache->kv_dtype;
            a->k16 = (const uint16_t *)cache->k + row;
            a->v16 = (const uint16_t *)cache->v + v_row;
        } else {
            a->k = (const float *)cache->k + row;
            a->v = (const float *)cache->v + v_row;
        }
        a->ldk = (size_t)cache->head_dim;
        a->ldv = (size_t)cache->v_dim;
        a->k_hs = cache->rows * (size_t)cache->head_dim; /* head-major */
        a->v_hs = cache->rows * (size_t)cache->v_dim;
        a->k_bs = nkv * cache->rows;
        a->v_bs = cache->v_width * cache->rows;
        a->out = attn + (size_t)s * max_new * nq_v;
        a->ldo = nq_v;
        sa_attn_plan_make(a, &plans[n_desc]); /* made, and checked, in the plan */
        n_desc++;
        cache->len[s] = L + n;
    }
    return n_desc;
}

selfattn_status selfattn_forward_cached(const selfattn_layer *layer, selfattn_cache *cache,
                                        int32_t max_new, const float *x, const int32_t *n_new,
                                        float *y)
{
    sa_err_begin("selfattn_forward_cached");
    sa_cached_plan p;
    selfattn_status st = sa_cached_plan_make(layer, cache, max_new, x, n_new, y, &p);
    SA_CHECK(st == SELFATTN_OK, st);
    sa_ws *ws;
    st = sa_ws_acquire_plan(layer->ws, &p.ws, &ws);
    SA_CHECK(st == SELFATTN_OK, st);

    /* Nothing fails from here on. */
    const int32_t n_seqs = cache->n_seqs;
    const size_t dm = p.dm, nqkv = p.nqkv;
    float *wsf = ws->data;
    float *qkv = wsf + p.o_qkv, *attn = layer->out_proj ? wsf + p.o_attn : y;
    sa_attn *desc = (sa_attn *)(void *)(wsf + p.o_desc);
    sa_attn_plan *plans = (sa_attn_plan *)(void *)(wsf + p.o_plans);
    int64_t *pos0 = (int64_t *)(void *)(wsf + p.o_pos0);
    int32_t *lens = (int32_t *)(void *)(wsf + p.o_lens);
    for (int32_t s = 0; s < n_seqs; s++) {
        lens[s] = n_new != NULL ? n_new[s] : max_new;
        pos0[s] = cache->len[s];
    }
    const sa_rows rows_new = {.batch = n_seqs, .seq_len = max_new, .lengths = lens};
    sa_in_proj(layer, x, qkv, &rows_new, p.valid, 0, wsf + p.o_panel, p.workers);
    sa_rope_apply(layer, qkv, nqkv, n_seqs, max_new, lens, pos0, 0, p.workers);
    const int n_desc = sa_cached_describe(layer, cache, max_new, lens, &p, qkv, attn, desc, plans);
    sa_attn_run_many(desc, plans, n_desc, p.workers, wsf + p.o_scratch, p.per_worker);
    if (layer->out_proj) {
        sa_out_proj(layer, attn, y, &rows_new, p.valid, wsf + p.o_panel, p.workers);
    }
    sa_zero_padding(y, dm, lens, n_seqs, max_new);
    sa_ws_release(layer->ws, ws);
    return SELFATTN_OK;
}
