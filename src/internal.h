/* Internal declarations shared by the library's source files. Not API. */
#ifndef SELFATTN_INTERNAL_H
#define SELFATTN_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "selfattn/selfattn.h"

#include "kernels/kernels.h"

/* ---- Errors (error.c): selfattn_last_error's message ---- */
/* An entry point names itself before its checks (fn: static text, e.g. "selfattn_forward"). */
SA_HIDDEN void sa_err_begin(const char *fn);
/* Returns st, having written "fn: <message>" unless an earlier check of this call already did. */
SA_HIDDEN selfattn_status sa_fail(selfattn_status st, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
SA_HIDDEN selfattn_status sa_fail_check(selfattn_status st, const char *cond);

/* Return the status from the enclosing function when cond is false; the message names the
   condition (SA_CHECKF: a message with the argument and its values). */
#define SA_CHECK(cond, status)                                                                     \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            sa_fail_check((status), #cond);                                                        \
            return (status);                                                                       \
        }                                                                                          \
    } while (0)
/* SELFATTN_ERR_NULL naming the pointer argument when it is NULL. */
#define SA_CHECK_NULL(ptr) SA_CHECKF((ptr) != NULL, SELFATTN_ERR_NULL, "%s is NULL", #ptr)
#define SA_CHECKF(cond, status, ...)                                                               \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            sa_fail((status), __VA_ARGS__);                                                        \
            return (status);                                                                       \
        }                                                                                          \
    } while (0)

/* ---- Allocation: every allocation of the library goes through these. ---- */
SA_HIDDEN void *sa_malloc(size_t bytes);
SA_HIDDEN void *sa_calloc(size_t n, size_t size);
SA_HIDDEN void sa_free(void *p);
/* Tests only: make the n-th allocation from now fail (0 = none). Returns the previous
   countdown: > 0 means the previously armed failure has not happened. */
SA_HIDDEN long sa_test_fail_allocation(long n);
/* Tests only: make every helper-thread start fail (on = 1) or not (0). */
SA_HIDDEN void sa_test_fail_thread_starts(int on);
SA_HIDDEN int sa_thread_start_allowed(void);

/* Floats in 64 bytes: workspace parts, score rows and column slices start on such boundaries. */
#define SA_ALIGN_FLOATS 16

/* a * b into *out without overflow; returns 0 on overflow. */
static inline int sa_mul_size(size_t a, size_t b, size_t *out)
{
    if (a != 0 && b > SIZE_MAX / a)
        return 0;
    *out = a * b;
    return 1;
}

static inline int sa_add_size(size_t a, size_t b, size_t *out)
{
    if (b > SIZE_MAX - a)
        return 0;
    *out = a + b;
    return 1;
}

/* Bytes of an array of rows x width floats, or 0 on overflow. */
static inline size_t sa_array_bytes(size_t rows, size_t width)
{
    size_t n;
    if (!sa_mul_size(rows, width, &n) || !sa_mul_size(n, sizeof(float), &n) ||
        n > (size_t)PTRDIFF_MAX)
        return 0;
    return n;
}

/* ---- Kernels (kernels/kernels.h) and their table ---- */
typedef enum sa_isa { SA_ISA_SCALAR = 0, SA_ISA_AVX2 = 1, SA_ISA_AVX512 = 2 } sa_isa;

typedef struct sa_kernels {
    sa_isa isa;
    const char *softmax_name;
    sa_f32_softmax_exp_fn softmax_exp;
    sa_f32_softmax_exp_above_fn softmax_exp_above; /* chunks of a long row */
    sa_f32_qkt_fn qkt;
    sa_f32_pv_fn pv;
    sa_f32_dot_fn dot; /* the softmax backward's row kernels */
    sa_f32_dscores_fn dscores;
    sa_f32_expsub_fn expsub;
    sa_f32_softcap_fn softcap; /* the scores' softcap (forward and backward) */
    /* 16-bit storage, indexed by dtype - 1 (0: f16, 1: bf16) */
    sa_x16_to_f32_fn to_f32[2];
    sa_f32_to_x16_fn from_f32[2];
    sa_x16_qkt_fn qkt_x16[2];
    sa_x16_pv_fn pv_x16[2];
} sa_kernels;

/* The kernel table chosen for this process (CPU detection and SELFATTN_ISA, once). */
SA_HIDDEN const sa_kernels *sa_kernels_get(void);
/* The table for one ISA, or NULL when this build or this CPU cannot run it (for tests). */
SA_HIDDEN const sa_kernels *sa_kernels_for_isa(sa_isa isa);

/* The CPU's vector instruction set, whatever this build compiled (blas.c compares the BLAS's
   kernels with it); *bf16 (when not NULL): whether it has AVX512-BF16. UNKNOWN off x86. */
typedef enum sa_cpu_vec {
    SA_CPU_VEC_UNKNOWN = 0,
    SA_CPU_VEC_SSE = 1,
    SA_CPU_VEC_AVX = 2,
    SA_CPU_VEC_AVX2 = 3, /* with FMA */
    SA_CPU_VEC_AVX512 = 4 /* AVX-512F */
} sa_cpu_vec;
SA_HIDDEN sa_cpu_vec sa_cpu_vector_level(int *bf16);

/* ---- Attention blocking ---- */
/* Query rows per attention task. Each task multiplies its block by all the keys it can see, and
   BLAS packs those keys (and values) again for every block: bigger blocks amortise that packing
   (on the machine this was first tuned on, blocks of 256 rows ran about 25% faster than 64 at
   seq_len 2048-8192), while the score block (block x key span floats per worker) must stay
   modest; under a causal mask the triangle inside each block is wasted work (about block / q_len
   of the whole), so blocks stay at or under a quarter of the sequence, and at 128 rows unless
   q_len / 32 (a waste of about 3%) is more. At q_len 8192 (512 wide, 8 heads), blocks of 256
   rows instead of 128 ran the causal forward 3-6% closer to its sgemm ceiling with OpenBLAS's
   Cooperlake kernels on AMD EPYC (Zen 5); at 2048 and 4096 they ran 0-4% further from it, so
   those keep 128. Spans over 4096 keys, when `chunked` (the call may take its keys in chunks:
   attention.c, sa_key_chunk, where the score block no longer grows with the span), allow
   SA_BLOCK_MAX_LONG rows: 496 instead of 256 at 8192 full brought the forward 2-4% closer to its
   ceiling on 2 threads with Cooperlake's kernels (0-2% on 1; no change with Haswell's), against
   0-4% further at 4096 on 2 threads, which keeps 256. Calls that keep whole rows (the weights,
   the backward) keep 256: their score blocks would double, and the backward at 8192 measured no
   faster with 496. `span` is the most keys one block can see. */
#define SA_BLOCK_MAX 256
#define SA_BLOCK_MAX_LONG 512
#define SA_BLOCK_MIN 32
#define SA_BLOCK_CAUSAL 128
#define SA_SCORE_BUDGET_BYTES (16u << 20)

static inline int32_t sa_block_rows(int32_t q_len, int32_t span, int causal, int chunked)
{
    int64_t b = (int64_t)(SA_SCORE_BUDGET_BYTES / sizeof(float)) / ((int64_t)span + 16);
    if (causal && b > q_len / 4)
        b = q_len / 4;
    const int64_t causal_cap = q_len / 32 > SA_BLOCK_CAUSAL ? q_len / 32 : SA_BLOCK_CAUSAL;
    if (causal && b > causal_cap)
        b = causal_cap;
    b = b / 16 * 16;
    const int64_t cap = chunked && span > 4096 ? SA_BLOCK_MAX_LONG : SA_BLOCK_MAX;
    if (b > cap)
        b = cap;
    if (b < SA_BLOCK_MIN)
        b = SA_BLOCK_MIN;
    return q_len < b ? q_len : (int32_t)b;
}

/* ---- Worker pool (pool.c) ---- */
#define SA_MAX_THREADS 64
/* Runs fn(ctx, w) on n_workers workers at once, w = 0 (the caller) .. n_workers - 1, each at most
   once; returns when all have returned. Helpers come from the process's persistent pool; a helper
   that cannot be had (all busy, or a thread could not be started) is simply not run, so fn must
   share its work out dynamically (sa_run_tasks does). */
typedef void (*sa_job_fn)(void *ctx, int worker);
SA_HIDDEN void sa_pool_run(int n_workers, sa_job_fn fn, void *ctx);
/* Helper threads started so far (for tests). */
SA_HIDDEN int sa_pool_size(void);

/* Tasks 0 .. n_tasks - 1, each run once as task(arg, worker, t) by one of n_workers workers; which
   worker runs a task must not change its result. */
typedef void (*sa_task_fn)(void *arg, int worker, int task);
SA_HIDDEN void sa_run_tasks(int n_workers, int n_tasks, sa_task_fn task, void *arg);

/* ---- Workspaces kept between calls (workspace.c) ---- */
typedef struct sa_ws {
    struct sa_ws *next;
    size_t bytes;
    void *data; /* 64-byte aligned, `bytes` long */
} sa_ws;
typedef struct sa_ws_cache sa_ws_cache;
SA_HIDDEN sa_ws_cache *sa_ws_cache_create(void);
SA_HIDDEN void sa_ws_cache_destroy(sa_ws_cache *c);
/* A buffer of at least `bytes` for the caller's sole use, or NULL (out of memory). */
SA_HIDDEN sa_ws *sa_ws_acquire(sa_ws_cache *c, size_t bytes);
SA_HIDDEN void sa_ws_release(sa_ws_cache *c, sa_ws *w); /* NULL is a no-op */
/* A workspace carved by name: each sa_ws_reserve takes the next part of `floats` floats (on a
   64-byte boundary) and returns its offset in floats, so that one piece of code both sizes and
   carves; an overflow anywhere marks the plan. */
typedef struct sa_ws_plan {
    size_t floats;
    int overflow;
} sa_ws_plan;
static inline size_t sa_ws_reserve(sa_ws_plan *p, size_t floats)
{
    const size_t at = p->floats;
    size_t sz;
    if (!sa_add_size(floats, SA_ALIGN_FLOATS - 1, &sz) ||
        !sa_add_size(at, sz / SA_ALIGN_FLOATS * SA_ALIGN_FLOATS, &p->floats))
        p->overflow = 1;
    return at;
}
/* n consecutive blocks of `each` floats as one part (one block per worker), its offset. */
static inline size_t sa_ws_reserve_n(sa_ws_plan *p, size_t n, size_t each)
{
    size_t floats;
    if (!sa_mul_size(n, each, &floats)) {
        p->overflow = 1;
        return p->floats;
    }
    return sa_ws_reserve(p, floats);
}
/* The plan's bytes, or 0 when it overflowed or passes PTRDIFF_MAX. */
SA_HIDDEN size_t sa_ws_plan_bytes(const sa_ws_plan *p);
/* A workspace for the plan from the cache into *ws: SELFATTN_OK, SELFATTN_ERR_OVERFLOW or
   SELFATTN_ERR_NOMEM. */
SA_HIDDEN selfattn_status sa_ws_acquire_plan(sa_ws_cache *c, const sa_ws_plan *p, sa_ws **ws);

/* ---- The layer ---- */
enum { SA_HAVE_Q = 1u, SA_HAVE_K = 2u, SA_HAVE_V = 4u, SA_HAVE_O = 8u };

struct selfattn_layer {
    int32_t d_model;
    int32_t n_heads;
    int32_t n_kv_heads; /* resolved: never 0 */
    int32_t head_dim;   /* resolved; 0 while undetermined */
    int32_t v_head_dim; /* SELFATTN_OPT_V_HEAD_DIM: 0 = head_dim (sa_layer_dv resolves it) */
    int32_t causal;
    int32_t out_proj;
    int32_t threads_opt; /* 0 = library default */
    int32_t window;      /* 0 = none */
    int32_t rope;        /* 0 none, 1 rotate-half, 2 adjacent pairs */
    int32_t rope_dims;   /* 0 = head_dim */
    int32_t alibi;
    float scale_opt;       /* 0 = default */
    float softcap;         /* 0 = off */
    double rope_theta;     /* 0 = default */
    unsigned have;         /* SA_HAVE_* bits */
    int weights_set;       /* any weight or bias set: the shape is frozen */
    int32_t weight_dtype;  /* selfattn_dtype of w_qkv and w_o */
    int32_t kv_dtype;      /* selfattn_dtype of the caches created from now on */
    float *w_qkv;          /* [nq + nkv + nkv_v][d_model], Q rows then K then V (nkv_v =
                              n_kv_heads dv; float32 weights) */
    float *b_qkv;          /* [nq + nkv + nkv_v] or NULL (all zero) */
    float *w_o;            /* [d_model][n_heads dv] or NULL (float32 weights) */
    uint16_t *h_qkv, *h_o; /* the same in 16 bits, for an F16 or BF16 weight_dtype */
    float *b_o;            /* [d_model] or NULL (all zero) */
    sa_ws_cache *ws;       /* workspaces of forward/attend calls: mutable through a const layer */
    /* What a training state remembers of the layer that filled it: a serial number unique in the
       process (layers at a reused address differ) and a count of the changes to its weights and
       to the options that change its results (not THREADS). */
    uint64_t serial, version;
};

/* The width of a value head, dv: SELFATTN_OPT_V_HEAD_DIM, or head_dim (0 while undetermined). */
static inline int32_t sa_layer_dv(const selfattn_layer *l)
{
    return l->v_head_dim != 0 ? l->v_head_dim : l->head_dim;
}
/* The layer's projected widths: Q and K (nq, nkv: head_dim wide heads), V and the attention
   output (nkv_v, nq_v: dv wide heads) and the projected row Q | K | V (nqkv). Each fits an
   int32 once head_dim is determined (checked when the shape is set). */
typedef struct sa_widths {
    size_t nq, nkv, nkv_v, nq_v, nqkv;
} sa_widths;
static inline sa_widths sa_layer_widths(const selfattn_layer *l)
{
    sa_widths w;
    const size_t hd = (size_t)l->head_dim, dv = (size_t)sa_layer_dv(l);
    w.nq = (size_t)l->n_heads * hd;
    w.nkv = (size_t)l->n_kv_heads * hd;
    w.nkv_v = (size_t)l->n_kv_heads * dv;
    w.nq_v = (size_t)l->n_heads * dv;
    w.nqkv = w.nq + w.nkv + w.nkv_v;
    return w;
}

/* Number of worker threads a call on this layer uses. */
SA_HIDDEN int sa_layer_threads(const selfattn_layer *layer);
/* The effective score scale. */
SA_HIDDEN float sa_layer_scale(const selfattn_layer *layer);

/* ---- The attention core (attention.c) ---- */
/* What one attention call computes, for every entry point. Query i of sequence b is at position
   i + off_b (sa_attn_query_pos), key j at position j. */
typedef struct sa_attn {
    int32_t batch, q_len, kv_len;
    int32_t n_heads, group, head_dim;
    int32_t v_dim;          /* the width of a value head and of an output head (0: head_dim) */
    const float *q, *k, *v; /* row-major, row strides ldq/ldk/ldv, q_len/kv_len rows per sequence */
    size_t ldq, ldk, ldv;
    /* K/V strides between sequences and between K/V heads; 0 = the interleaved layout
       (kv_len * ld, and head_dim for K, v_dim for V). A head-major layout has each head's rows
       contiguous. */
    size_t k_bs, k_hs, v_bs, v_hs;
    float *out;
    size_t ldo;
    const int32_t *kv_lengths; /* NULL: kv_len each */
    int pad_queries;           /* forward: query rows at or past kv_lengths[b] are padding */
    /* the scores: s = (q.k) scale; softcap; + ALiBi; + bias; visibility */
    float scale;
    float softcap; /* 0 = off */
    int alibi;
    int causal;
    /* the causal alignment (SELFATTN_OPT_CAUSAL, selfattn_attend* only): off_b = kv_len - q_len
       (0 or 1), 0 (2: top-left), kv_lengths[b] - q_len (3); positions follow it */
    int align;
    int32_t window; /* 0 = none */
    const float *bias;
    int64_t bias_sb, bias_sh, bias_sr;
    /* optional outputs, [batch][n_heads][q_len]([kv_len]) */
    float *weights;
    float *lse;
    float *scores; /* the scores at stage scores_stage (selfattn_extras) */
    int scores_stage;
    /* with q_len 1, a task may take every query head of a K/V group (forward, attend, cache) */
    int stack_heads;
    /* K and V stored in 16 bits (the cache's KV_DTYPE): kv_dtype F16 or BF16, k16 and v16 in
       the layout above instead of k and v (the forward core only) */
    int kv_dtype;
    const uint16_t *k16, *v16;
    /* whole rows only (the backward's plan: its score blocks hold every key a block sees) */
    int whole_rows;
} sa_attn;
/* The width of a value head of a description. */
static inline int32_t sa_attn_dv(const sa_attn *a)
{
    return a->v_dim != 0 ? a->v_dim : a->head_dim;
}

/* How the core blocks a call: query blocks, the score block's row stride, and the scratch each
   worker needs (a score block, then inverse sums and lse of its rows). With key_chunk, a task
   takes its keys key_chunk at a time (an online softmax: running maximum and sum per row, the
   output rows rescaled when the maximum grows), so that the score block is block x key_chunk
   however long the rows. */
typedef struct sa_attn_plan {
    int32_t block, n_blocks;
    int32_t key_chunk;        /* keys per chunk, 0: whole rows */
    size_t ld_s;              /* row stride of a score block */
    int stacked;              /* rows of a task are the query heads of a group (see sa_attn) */
    int32_t rows;             /* rows of a task's score block: block, or the group when stacked */
    size_t floats_per_worker; /* rows * ld_s + 2 * rows (inverse sums and lse, or with
                                 key_chunk each row's running maximum and sum), rounded up to a
                                 multiple of 16, and
                                 with 16-bit K/V a block of ld_s x max(head_dim, v_dim) floats
                                 at kv_conv */
    size_t kv_conv;
    int n_tasks;
} sa_attn_plan;
SA_HIDDEN selfattn_status sa_attn_plan_make(const sa_attn *a, sa_attn_plan *p);
/* Runs the attention with `workers` workers and scratch of workers * floats_per_worker floats.
   Writes out rows (all but padding rows), weights and lse when asked. */
SA_HIDDEN void sa_attn_run(const sa_attn *a, const sa_attn_plan *p, int workers, float *scratch);
/* O = P V for rows of probabilities s (row stride ld_s, unnormalised) over the keys
   [klo, klo + nk) of K/V head g of sequence b, each output row scaled by inv[r] = 1 / sum, and
   zeros for a row that sees no key (inv 0) even where V holds a NaN: ob [mb][v_dim], row
   stride ldo. conv: the plan's kv_conv block, for 16-bit V. */
SA_HIDDEN void sa_attn_pv(const sa_attn *a, int32_t b, int32_t g, int32_t klo, int32_t mb,
                          int32_t nk, const float *s, size_t ld_s, const float *inv, float *ob,
                          size_t ldo, float *conv);
/* The keys a block of rows [i0, i0 + mb) of sequence b can see: returns their count (0: none)
   and the first in *klo. */
SA_HIDDEN int32_t sa_attn_block_keys(const sa_attn *a, int32_t b, int32_t i0, int32_t mb,
                                     int32_t *klo);
/* Several descriptions in one parallel region (the cache: one per sequence); their task counts
   must add up to at most INT32_MAX, and per_worker is the largest floats_per_worker. */
SA_HIDDEN void sa_attn_run_many(const sa_attn *a, const sa_attn_plan *p, int n, int workers,
                                float *scratch, size_t per_worker);
/* ALiBi slope of head h of n (Press et al. 2022; the BLOOM rule for n not a power of two). */
SA_HIDDEN double sa_alibi_slope(int32_t h, int32_t n);

/* The probabilities of one block, shared by the forward and backward passes: rows
   [i0, i0 + mb) of sequence b, head h (none of them padding), over the keys [klo, klo + nk) that
   sa_attn_block_keys gives (nk >= 1). Writes into s (row stride p->ld_s) each row's exp(score - m)
   over its own visible keys and 0 at the block's other keys, inv[r] = 1 / sum (0 for a row that
   sees no key, whose s row is all 0) and lse[r] = m + log(sum) (-inf for such a row); the
   normalised weights are s[r][j] * inv[r]. With a softcap and dcap non-NULL also dcap (the score
   block's shape) = 1 - tanh^2(q.k scale / c) at each row's visible keys, 0 at the block's other
   keys (for the backward pass). */
SA_HIDDEN void sa_attn_probs(const sa_attn *a, const sa_attn_plan *p, int32_t b, int32_t h,
                             int32_t i0, int32_t mb, int32_t klo, int32_t nk, float *s, float *inv,
                             float *lse, float *dcap);
/* The keys [*lo, *hi) that query row i of sequence b sees (*lo == *hi: none). */
SA_HIDDEN void sa_attn_row_keys(const sa_attn *a, int32_t b, int32_t i, int32_t *lo, int32_t *hi);
/* The query rows that see at least one key of [k0, k0 + nk) in sequence b (padding rows excluded
   with pad_queries): returns their count (0: none), the first in *ilo. */
SA_HIDDEN int32_t sa_attn_key_queries(const sa_attn *a, int32_t b, int32_t k0, int32_t nk,
                                      int32_t *ilo);
/* Normalised probabilities of a tile from each row's log-sum-exp: s holds the raw q.k of rows
   [i0, i0 + mb) of (b, h) over keys [k0, k0 + nk) (row stride ld); on return s = exp(final score
   - lse[r]) at each row's visible keys and 0 elsewhere (rows with lse -inf all 0). dcap as in
   sa_attn_probs (NULL: not wanted, or no softcap). */
SA_HIDDEN void sa_attn_tile_probs(const sa_attn *a, int32_t b, int32_t h, int32_t i0, int32_t mb,
                                  int32_t k0, int32_t nk, float *s, size_t ld, const float *lse,
                                  float *dcap);

/* ---- The attention backward (attention_backward.c) ---- */
/* The sequence's key count: kv_lengths[b], or kv_len without lengths. */
static inline int32_t sa_attn_kv_length(const sa_attn *a, int32_t b)
{
    return a->kv_lengths != NULL ? a->kv_lengths[b] : a->kv_len;
}
/* Query rows of sequence b that are not padding (all q_len unless pad_queries). */
static inline int32_t sa_attn_query_rows(const sa_attn *a, int32_t b)
{
    const int32_t len = sa_attn_kv_length(a, b);
    return a->pad_queries && len < a->q_len ? len : a->q_len;
}

/* Task `task` of a description split into (query block, sequence, unit) tasks, units per
   sequence (heads, or groups of stacked heads), the largest blocks (the last rows: the most keys
   under a causal mask) first for balance: its sequence b, unit, first query row i0, the block's
   rows and how many of them are not padding (valid). */
typedef struct sa_attn_task_tile {
    int32_t b, unit, i0, rows, valid;
} sa_attn_task_tile;
static inline sa_attn_task_tile sa_attn_tile_of(const sa_attn *a, const sa_attn_plan *p,
                                                int32_t units, int task)
{
    const int per_block = a->batch * units;
    sa_attn_task_tile t;
    t.b = (task % per_block) / units;
    t.unit = task % units;
    t.i0 = (p->n_blocks - 1 - task / per_block) * p->block;
    t.rows = a->q_len - t.i0 < p->block ? a->q_len - t.i0 : p->block;
    const int32_t left = sa_attn_query_rows(a, t.b) - t.i0;
    t.valid = left < t.rows ? (left > 0 ? left : 0) : t.rows;
    return t;
}

/* One attention backward: the forward's description a (q, k, v, and out = O when the single
   pass needs it), dout, the gradients wanted and the workspace parts the plan sizes. */
typedef struct sa_attn_bwd {
    sa_attn a; /* the forward: q, k, v; out = O (NULL: not wanted), written by pass A */
    sa_attn_plan plan;
    const float *dout;
    size_t lddo;
    float *dq, *dk, *dv; /* NULL: not wanted */
    size_t lddq, lddk, lddv;
    float *lse, *dsum; /* [batch][n_heads][q_len] */
    int32_t kblock, n_kblocks, qchunk;
    size_t ld_t;       /* row stride of a pass-B tile */
    int nbuf;          /* score-shaped buffers: P, dP and, with a softcap, its derivative */
    size_t per_worker; /* scratch floats per worker */
    int tasks_b;
    int onepass;  /* the single pass (one task per (sequence, key/value head)) rather than passes A
                     and B */
    int tasks_kv; /* its tasks: batch x key/value heads */
    int have_forward; /* O and lse are given (training state): the single pass skips its forward */
    float *scratch;
} sa_attn_bwd;
/* Fills the blocking of w (its a filled in): plan, key blocks, scratch per worker, the scheme. */
SA_HIDDEN selfattn_status sa_attn_bwd_plan(sa_attn_bwd *w);
/* Runs it with `workers` workers (lse, dsum and scratch set): dq, dk, dv, and O when a.out. */
SA_HIDDEN void sa_attn_bwd_run(sa_attn_bwd *w, int workers);

/* ---- The valid rows of a padded batch (rows.c) ---- */
/* batch sequences of seq_len rows each, of which the first lengths[b] are valid (NULL: all) */
typedef struct sa_rows {
    int32_t batch, seq_len;
    const int32_t *lengths;
} sa_rows;
/* Walks the valid rows numbered [v0, v1) across the batch (v1 may be SIZE_MAX: all) as runs of
   memory-contiguous rows: sa_rows_next gives the next run's first row (a row index of the batch)
   and count, and 0 when none is left. A run spans sequences only where they are full, and holds
   at most INT32_MAX rows (a CBLAS dimension). */
typedef struct sa_rows_it {
    sa_rows rows;
    size_t v, v1; /* valid rows still to walk */
    int32_t b;    /* the sequence holding valid row v */
    size_t seen;  /* valid rows before sequence b */
} sa_rows_it;
SA_HIDDEN void sa_rows_begin(sa_rows_it *it, const sa_rows *rows, size_t v0, size_t v1);
SA_HIDDEN int sa_rows_next(sa_rows_it *it, size_t *r0, size_t *n);

/* out = in op(w) + bias over the valid rows: in [rows][k] (row stride ld_in), out [rows][n]
   (ld_out); rows of padding are neither read nor written. w_is_linear: w is [n][k] (PyTorch's
   nn.Linear, out = in w^T), else [k][n] (out = in w); row stride ld_w either way. */
typedef struct sa_rowprod {
    const float *in;
    size_t ld_in, k;
    const float *w;
    size_t ld_w;
    int w_is_linear;
    const float *bias; /* [n] or NULL */
    float *out;
    size_t ld_out, n;
    sa_rows rows;
    size_t valid_rows;
    int fixed_chunks; /* split by a fixed number of rows: results independent of the workers */
    /* 16-bit weights (w_dtype F16 or BF16, w NULL): w16 in the same layout; a few rows of an
       nn.Linear product read it directly, other products convert panels of it into `panel`
       (sa_rowprod_panel_floats floats per worker, worker w's at panel + w * that) */
    const uint16_t *w16;
    int w_dtype;
    float *panel;
} sa_rowprod;
/* Floats of one worker's weight panel for a 16-bit product with inner dimension k. */
SA_HIDDEN size_t sa_rowprod_panel_floats(size_t k);
SA_HIDDEN void sa_rowprod_run(const sa_rowprod *p, int workers);
/* Whether a fixed-chunk product over valid_rows rows has an int task count. */
SA_HIDDEN int sa_rowprod_chunks_fit(size_t valid_rows);

/* Weight gradients dw[c][i] = sum_r g[r][c] in[r][i] and db[c] = sum_r g[r][c] over the valid
   rows, for the columns [c0, c1) of g; dw and db each NULL when not wanted. Split over workers by
   fixed blocks of output rows, never by input rows: each sum has one order. */
typedef struct sa_wgrad_part {
    const float *g;
    size_t ld_g, c0, c1;
    const float *in;
    size_t ld_in, n_in;
    float *dw, *db;
    int first_task; /* set by sa_wgrad_add */
} sa_wgrad_part;
typedef struct sa_wgrad {
    sa_rows rows;
    sa_wgrad_part part[4];
    int n_parts, n_tasks;
} sa_wgrad;
SA_HIDDEN void sa_wgrad_add(sa_wgrad *j, const sa_wgrad_part *part);
SA_HIDDEN void sa_wgrad_run(const sa_wgrad *j, int workers);

/* ---- Rotary embeddings (rope.c) ---- */
/* Rotates the Q and K heads (the first (n_heads + n_kv_heads) * head_dim columns of each row of
   qkv, row stride ld) of the valid rows of a batch in place, row t of sequence b at position
   pos0[b] + t (pos0 NULL: 0); inverse turns by the opposite angle (gradients). No-op without
   SELFATTN_OPT_ROPE. */
SA_HIDDEN void sa_rope_apply(const selfattn_layer *l, float *qkv, size_t ld, int32_t batch,
                             int32_t seq_len, const int32_t *lengths, const int64_t *pos0,
                             int inverse, int workers);

/* ---- The entry points' shared pieces (forward.c: sa_forward; backward.c: sa_backward) ---- */
/* The score description of a layer's options (and extras, NULL for none) for a call. */
SA_HIDDEN void sa_attn_from_layer(sa_attn *a, const selfattn_layer *l, int32_t batch, int32_t q_len,
                                  int32_t kv_len, const selfattn_extras *e);
/* selfattn_forward_ex, and with keep non-NULL (training) Q, K, V after RoPE ([rows][nqkv]),
   the attention output before the output projection ([rows][nq_v]) and each row's log-sum-exp
   ([batch][n_heads][seq_len]) are written there, the valid rows only (lse: every row). */
typedef struct sa_keep {
    float *qkv, *o, *lse;
} sa_keep;
SA_HIDDEN selfattn_status sa_forward(const selfattn_layer *layer, int32_t batch, int32_t seq_len,
                                     const float *x, const int32_t *lengths,
                                     const selfattn_extras *extras, float *y, const sa_keep *keep);
/* selfattn_backward, and with kept non-NULL (from sa_forward's keep for the same call) Q, K, V, O
   and lse are read from there instead of recomputed. */
typedef struct sa_kept {
    const float *qkv, *o, *lse;
} sa_kept;
SA_HIDDEN selfattn_status sa_backward(const selfattn_layer *layer, int32_t batch, int32_t seq_len,
                                      const float *x, const int32_t *lengths, const float *dy,
                                      float *dx, const selfattn_grads *grads, const sa_kept *kept);
/* Argument helpers of the entry points over a batch (call.c):
   lengths NULL, or each in [0, max] (SELFATTN_ERR_INVALID otherwise); */
SA_HIDDEN selfattn_status sa_check_lengths(const int32_t *lengths, int32_t batch, int32_t max,
                                           const char *name, const char *max_name);
/* a whole-layer call over batch x seq_len rows: sizes >= 1, the weights set (sa_check_weights),
   the activations and projections addressable; */
SA_HIDDEN selfattn_status sa_check_batch_call(const selfattn_layer *l, int32_t batch,
                                              int32_t seq_len);
/* an attention call: sizes >= 1, head_dim determined, q and k/v addressable; */
SA_HIDDEN selfattn_status sa_check_attend_call(const selfattn_layer *l, int32_t batch,
                                               int32_t q_len, int32_t kv_len);
/* head_dim is determined (SELFATTN_ERR_STATE saying why not otherwise); */
SA_HIDDEN selfattn_status sa_check_head_dim(const selfattn_layer *l);
/* the weights a forward needs are set and head_dim is determined (SELFATTN_ERR_STATE naming
   what is missing otherwise); */
SA_HIDDEN selfattn_status sa_check_weights(const selfattn_layer *l);
/* the rows of a batch that are not padding (batch * seq_len without lengths); */
SA_HIDDEN size_t sa_valid_rows(const int32_t *lengths, int32_t batch, int32_t seq_len);
/* zeros in the padding rows (t >= lengths[b]) of out [batch][seq_len][width]; */
SA_HIDDEN void sa_zero_padding(float *out, size_t width, const int32_t *lengths, int32_t batch,
                               int32_t seq_len);
/* the struct_size rule of the 1.1 structs (selfattn_extras, selfattn_grads): below `least`
   bytes (the struct's first published size) SELFATTN_ERR_INVALID, above `known` (this header's
   sizeof) only when every byte past `known` is zero (SELFATTN_ERR_UNSUPPORTED otherwise). */
SA_HIDDEN selfattn_status sa_check_struct_size(const void *s, uint32_t struct_size, size_t least,
                                               size_t known, const char *name);
/* The layer's input projection qkv = x W_qkv^T + b_qkv ([rows][d_model] to [rows][nqkv])
   and output projection y = attn W_O^T + b_O ([rows][nq_v] to [rows][d_model]) over the valid
   rows; fixed_chunks as in sa_rowprod (the backward). */
SA_HIDDEN void sa_in_proj(const selfattn_layer *l, const float *x, float *qkv, const sa_rows *rows,
                          size_t valid, int fixed_chunks, float *panel, int workers);
SA_HIDDEN void sa_out_proj(const selfattn_layer *l, const float *attn, float *y,
                           const sa_rows *rows, size_t valid, float *panel, int workers);
/* Floats of one worker's weight panel for any product of the layer's weights (0 for float32
   weights): a call reserves workers times this for `panel`. */
SA_HIDDEN size_t sa_layer_panel_floats(const selfattn_layer *l);
/* ---- The BLAS (blas.c) ---- */
/* Workers for a call of about `flops` on layer l: 1 for tiny calls (helpers are not worth waking)
   and whenever the BLAS runs several threads of its own (it parallelises the products then),
   else the layer's SELFATTN_OPT_THREADS. Each call asks once and sizes and runs everything with
   the answer. Applies SELFATTN_BLAS_THREADS=1 first (once per process). */
SA_HIDDEN int sa_workers_for(const selfattn_layer *l, double flops);
/* Threads the BLAS runs its products on: OpenBLAS's openblas_get_num_threads(), 1 otherwise. */
SA_HIDDEN int sa_blas_threads(void);

#endif /* SELFATTN_INTERNAL_H */
