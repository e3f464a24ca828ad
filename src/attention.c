/* The attention core shared by every entry point: one task per (query block, sequence, head).
 *
 * A task computes S = Q_blk K^T over the keys its rows can see (one contiguous range: causality,
 * the window and the sequence's length each bound it from one side, so blocks that are hidden
 * entirely are never multiplied and window attention costs O(L w)), turns each row of S into
 * final scores (scale, then softcap, ALiBi and bias when asked), runs the scaled-softmax kernel
 * on the row's own visible range, computes O_blk = P V with one sgemm and scales each output row
 * by 1 / sum. The row's log-sum-exp and its normalised weights are written when asked. Memory
 * is one score block per worker: never an L x L matrix. Long rows (sa_key_chunk) go through the
 * same steps a chunk of keys at a time, with an online softmax (sa_attn_chunked). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "internal.h"
#include "kernels/exp-constants.h"

double sa_alibi_slope(int32_t h, int32_t n)
{
    int32_t closest = 1; /* the largest power of two <= n */
    while (closest <= n / 2)
        closest *= 2;
    if (h < closest)
        return exp2(-8.0 * (h + 1) / closest);
    /* heads past the power of two take the odd powers of the next power of two's base */
    return exp2(-8.0 * (2 * (h - closest) + 1) / (2.0 * closest));
}

/* Element offset of row j of K/V head g of sequence b, heads of width hd (strides 0: the default
   interleaved layout). */
static size_t sa_attn_kv_at(const sa_attn *a, size_t ld, size_t bs, size_t hs, int32_t hd,
                            int32_t b, int32_t g, int32_t j)
{
    bs = bs != 0 ? bs : (size_t)a->kv_len * ld;
    hs = hs != 0 ? hs : (size_t)hd;
    return (size_t)b * bs + (size_t)g * hs + (size_t)j * ld;
}

/* 16-bit K or V rows [0, n) at x (row stride ld) as float32 rows of width into conv. */
static const float *sa_attn_widen(const sa_attn *a, const uint16_t *x, size_t ld, int32_t n,
                                  int32_t width, float *conv)
{
    const sa_x16_to_f32_fn to_f32 = sa_kernels_get()->to_f32[a->kv_dtype - 1];
    const size_t hd = (size_t)width;
    for (int32_t j = 0; j < n; j++)
        to_f32(x + (size_t)j * ld, conv + (size_t)j * hd, hd);
    return conv;
}

/* The position of query row i of a sequence of len keys: i plus the alignment's offset. */
static int64_t sa_attn_query_pos(const sa_attn *a, int32_t len, int32_t i)
{
    switch (a->align) {
    case 2: /* top-left */
        return i;
    case 3: /* bottom-right of the sequence's own keys */
        return (int64_t)i + len - a->q_len;
    default: /* bottom-right of kv_len */
        return (int64_t)i + a->kv_len - a->q_len;
    }
}

/* The keys [*lo, *hi) that query row i sees in a sequence of len keys (empty: *lo == *hi). */
static void sa_row_range(const sa_attn *a, int32_t len, int32_t i, int32_t *lo, int32_t *hi)
{
    const int64_t p = sa_attn_query_pos(a, len, i);
    int64_t l = 0, h = len;
    if (a->causal && p + 1 < h)
        h = p + 1;
    if (a->window > 0) {
        if (p - a->window + 1 > l)
            l = p - a->window + 1;
        if (!a->causal && p + a->window < h)
            h = p + a->window;
    }
    /* An empty range sits at or below len: a block's key span runs from its first row's lo to
       its last row's hi, and must never take in keys at or past the length. */
    if (l > len)
        l = len;
    if (h < l)
        h = l;
    *lo = (int32_t)l;
    *hi = (int32_t)h;
}

/* The most keys a block of `block` rows can see. */
static int64_t sa_key_span(const sa_attn *a, int64_t block)
{
    int64_t span = a->kv_len;
    if (a->window > 0) {
        const int64_t w = a->window;
        const int64_t s = a->causal ? block + w - 1 : block + 2 * w - 1;
        if (s < span)
            span = s;
    }
    return span;
}

/* Keys per chunk of a long row (the online softmax), or 0 to take whole rows. A task's score
   block (block x span floats) is read again by the softmax and by the P V product: once it
   outgrows SA_KEY_CHUNK_FROM_BYTES those passes run from L3 instead of L2, and chunks of
   SA_KEY_CHUNK keys keep it small. Only where nothing needs a whole row at once: not for the
   weights (normalised by the final sum), nor the backward's plan, nor stacked decoding rows.
   SELFATTN_KEY_CHUNK overrides the choice (tests, tuning): 0 never, N > 0 chunks of N keys
   whenever a block's span is longer. */
#define SA_KEY_CHUNK 512
#define SA_KEY_CHUNK_FROM_BYTES (4u << 20)
static int sa_keys_may_chunk(const sa_attn *a)
{
    return !a->whole_rows && a->weights == NULL;
}

static int32_t sa_key_chunk(const sa_attn *a, int32_t block, int64_t span, int stacked)
{
    if (!sa_keys_may_chunk(a) || stacked)
        return 0;
    const char *env = getenv("SELFATTN_KEY_CHUNK");
    if (env != NULL && *env != '\0') {
        const long n = strtol(env, NULL, 10);
        if (n <= 0)
            return 0;
        const int32_t kc = n > (1L << 20) ? (1 << 20) : (int32_t)n;
        return span > kc ? kc : 0;
    }
    if (block <= SA_ROWS_MAX || span <= 2 * (int64_t)SA_KEY_CHUNK ||
        (uint64_t)block * (uint64_t)span * sizeof(float) <= SA_KEY_CHUNK_FROM_BYTES)
        return 0;
    return SA_KEY_CHUNK;
}

selfattn_status sa_attn_plan_make(const sa_attn *a, sa_attn_plan *p)
{
    int64_t span = sa_key_span(a, SA_BLOCK_MAX);
    p->block = sa_block_rows(a->q_len, (int32_t)span, a->causal, sa_keys_may_chunk(a));
    span = sa_key_span(a, p->block);
    p->n_blocks = (int32_t)(((int64_t)a->q_len + p->block - 1) / p->block);
    /* One query row and shared K/V heads: a task takes all the query heads of a group, so that
       the group's keys and values are streamed once instead of once per head. */
    p->stacked = a->stack_heads && a->q_len == 1 && a->group > 1;
    p->ld_s = ((size_t)span + SA_ALIGN_FLOATS - 1) / SA_ALIGN_FLOATS * SA_ALIGN_FLOATS;
    if (p->ld_s > INT32_MAX) /* the whole-row bound, chunks or not: the same calls fail */
        return SELFATTN_ERR_OVERFLOW;
    p->key_chunk = sa_key_chunk(a, p->block, span, p->stacked);
    if (p->key_chunk > 0)
        p->ld_s = ((size_t)p->key_chunk + SA_ALIGN_FLOATS - 1) / SA_ALIGN_FLOATS * SA_ALIGN_FLOATS;
    p->rows = p->stacked ? a->group : p->block;
    size_t per;
    if (!sa_mul_size((size_t)p->rows, p->ld_s + 2, &per) ||
        !sa_add_size(per, SA_ALIGN_FLOATS - 1, &per))
        return SELFATTN_ERR_OVERFLOW;
    p->floats_per_worker = per / SA_ALIGN_FLOATS * SA_ALIGN_FLOATS;
    p->kv_conv = p->floats_per_worker;
    const int32_t kv_width = a->head_dim > sa_attn_dv(a) ? a->head_dim : sa_attn_dv(a);
    if (a->kv_dtype != SELFATTN_DTYPE_F32 &&
        (!sa_mul_size(p->ld_s, (size_t)kv_width, &per) ||
         !sa_add_size(p->floats_per_worker, per, &p->floats_per_worker)))
        return SELFATTN_ERR_OVERFLOW;
    const int64_t tasks =
        (int64_t)a->batch * (p->stacked ? a->n_heads / a->group : a->n_heads) * p->n_blocks;
    if (p->ld_s > INT32_MAX || tasks > INT32_MAX)
        return SELFATTN_ERR_OVERFLOW; /* ld_s (a CBLAS leading dimension) and tasks are ints */
    p->n_tasks = (int)tasks;
    return SELFATTN_OK;
}

typedef struct sa_attn_job {
    const sa_attn *a;
    const sa_attn_plan *p;
    float *scratch;
} sa_attn_job;

/* -inf in the scores out of n_rows head rows from head_row: every key of them. */
static void sa_scores_masked(const sa_attn *a, size_t head_row, int32_t n_rows)
{
    const size_t kv_len = (size_t)a->kv_len;
    for (size_t e = head_row * kv_len; e < (head_row + (size_t)n_rows) * kv_len; e++)
        a->scores[e] = -INFINITY;
}

/* Rows of padding (forward) and rows that see no key: weights 0, lse -inf; padding rows also
   scores -inf (a row that sees no key still has scores at stages 0 and 1). */
static void sa_empty_extras(const sa_attn *a, size_t head_row, int32_t n_rows, int padding)
{
    if (a->scores != NULL && padding)
        sa_scores_masked(a, head_row, n_rows);
    if (a->weights != NULL)
        memset(a->weights + head_row * (size_t)a->kv_len, 0,
               (size_t)n_rows * (size_t)a->kv_len * sizeof(float));
    if (a->lse != NULL)
        for (int32_t r = 0; r < n_rows; r++)
            a->lse[head_row + (size_t)r] = -INFINITY;
}

/* Final scores of keys [lo, lo + n) of query row i of (sequence b, head h) in place
   (s = (q.k) scale, softcap, ALiBi, bias); returns their maximum (-inf when every key is masked
   by the bias). With a softcap and dcap non-NULL, dcap[j] = 1 - tanh^2 (the softcap's
   derivative, for the backward pass). */
static float sa_final_scores(const sa_attn *a, float *row, int32_t lo, int32_t n, int32_t b,
                             int32_t h, int32_t i, float slope, float *dcap)
{
    const int64_t pos = sa_attn_query_pos(a, sa_attn_kv_length(a, b), i);
    const float *bias_row =
        a->bias != NULL ? a->bias + b * a->bias_sb + h * a->bias_sh + (int64_t)i * a->bias_sr
                        : NULL;
    const float cap = a->softcap;
    float scale = a->scale;
    if (cap > 0.0f) { /* the kernel applies the scale and the cap (a tanh per score) */
        sa_kernels_get()->softcap(row, (size_t)n, scale, cap);
        scale = 1.0f;
        if (dcap != NULL)
            for (int32_t j = 0; j < n; j++) {
                const float th = row[j] / cap;
                dcap[j] = 1.0f - th * th;
            }
    }
    float m = -INFINITY;
    for (int32_t j = 0; j < n; j++) {
        float t = row[j] * scale;
        if (slope != 0.0f) {
            int64_t d = pos - (lo + j);
            d = d < 0 ? -d : d;
            t -= slope * (float)d;
        }
        if (bias_row != NULL)
            t += bias_row[lo + j];
        row[j] = t;
        m = t > m ? t : m;
    }
    return m;
}

int32_t sa_attn_block_keys(const sa_attn *a, int32_t b, int32_t i0, int32_t mb, int32_t *klo)
{
    int32_t lo, hi, unused;
    const int32_t len = sa_attn_kv_length(a, b);
    sa_row_range(a, len, i0, &lo, &unused);
    sa_row_range(a, len, i0 + mb - 1, &unused, &hi);
    *klo = lo;
    return hi > lo ? hi - lo : 0;
}

/* The raw q.k of rows [i0, i0 + mb) of (b, h) (with stacking: query i0 of heads h ..) over the
   keys [klo, klo + nk) into s (row stride p->ld_s, nk <= p->ld_s). */
static void sa_attn_qk(const sa_attn *a, const sa_attn_plan *p, int32_t b, int32_t h, int32_t i0,
                       int32_t mb, int32_t klo, int32_t nk, float *s)
{
    const int32_t hd = a->head_dim;
    const float *qb = a->q + ((size_t)b * a->q_len + i0) * a->ldq + (size_t)h * hd;
    const size_t k_at = sa_attn_kv_at(a, a->ldk, a->k_bs, a->k_hs, hd, b, h / a->group, klo);
    const size_t ldq = p->stacked ? (size_t)hd : a->ldq; /* stacked rows: the group's heads */
    const float *kh = a->k != NULL ? a->k + k_at : NULL;
    size_t ldk = a->ldk;
    if (mb <= SA_ROWS_MAX) { /* few rows (decoding): stream K once; sgemm would pack it first */
        if (a->kv_dtype != SELFATTN_DTYPE_F32)
            sa_kernels_get()->qkt_x16[a->kv_dtype - 1]((size_t)mb, (size_t)nk, (size_t)hd, qb, ldq,
                                                       a->k16 + k_at, ldk, s, p->ld_s);
        else
            sa_kernels_get()->qkt((size_t)mb, (size_t)nk, (size_t)hd, qb, ldq, kh, ldk, s, p->ld_s);
    } else {
        if (a->kv_dtype != SELFATTN_DTYPE_F32) { /* the block's keys in float32, then sgemm */
            kh = sa_attn_widen(a, a->k16 + k_at, ldk, nk, hd, s + p->kv_conv);
            ldk = (size_t)hd;
        }
        if (p->stacked) /* S^T = K Q_g^T, K as the A operand, which BLAS packs a panel at a
                           time as it streams it */
            cblas_sgemm(CblasColMajor, CblasTrans, CblasNoTrans, nk, mb, hd, 1.0f, kh, (int)ldk, qb,
                        hd, 0.0f, s, (int)p->ld_s);
        else
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mb, nk, hd, 1.0f, qb, (int)a->ldq,
                        kh, (int)ldk, 0.0f, s, (int)p->ld_s);
    }
}

void sa_attn_probs(const sa_attn *a, const sa_attn_plan *p, int32_t b, int32_t h, int32_t i0,
                   int32_t mb, int32_t klo, int32_t nk, float *s, float *inv, float *lse,
                   float *dcap)
{
    const sa_f32_softmax_exp_fn softmax_exp = sa_kernels_get()->softmax_exp;
    const int modified = a->softcap > 0.0f || a->alibi || a->bias != NULL;
    const int32_t len = sa_attn_kv_length(a, b), khi = klo + nk;
    sa_attn_qk(a, p, b, h, i0, mb, klo, nk, s);
    if (a->softcap <= 0.0f)
        dcap = NULL;

    for (int32_t r = 0; r < mb; r++) {
        /* stacked: row r is head h + r of query i0; else query i0 + r of head h */
        const int32_t i = p->stacked ? i0 : i0 + r, hr = p->stacked ? h + r : h;
        const float slope = a->alibi ? (float)sa_alibi_slope(hr, a->n_heads) : 0.0f;
        float *row = s + (size_t)r * p->ld_s;
        int32_t lo, hi;
        sa_row_range(a, len, i, &lo, &hi);
        float m, sum = 0.0f;
        int empty = hi <= lo;
        if (!empty && modified) {
            float *dc = dcap != NULL ? dcap + (size_t)r * p->ld_s : NULL;
            if (dc != NULL) {
                memset(dc, 0, (size_t)(lo - klo) * sizeof(float));
                memset(dc + (hi - klo), 0, (size_t)(khi - hi) * sizeof(float));
            }
            m = sa_final_scores(a, row + (lo - klo), lo, hi - lo, b, hr, i, slope,
                                dc != NULL ? dc + (lo - klo) : NULL);
            empty = m == -INFINITY;
            if (!empty)
                sum =
                    softmax_exp(row + (lo - klo), (size_t)(hi - lo), (size_t)(khi - lo), 1.0f, &m);
        } else if (!empty) {
            sum =
                softmax_exp(row + (lo - klo), (size_t)(hi - lo), (size_t)(khi - lo), a->scale, &m);
        }
        if (empty) {
            memset(row, 0, (size_t)nk * sizeof(float));
            if (dcap != NULL)
                memset(dcap + (size_t)r * p->ld_s, 0, (size_t)nk * sizeof(float));
            inv[r] = 0.0f;
            lse[r] = -INFINITY;
        } else {
            memset(row, 0, (size_t)(lo - klo) * sizeof(float));
            inv[r] = 1.0f / sum;
            lse[r] = m + logf(sum);
        }
    }
}

void sa_attn_row_keys(const sa_attn *a, int32_t b, int32_t i, int32_t *lo, int32_t *hi)
{
    sa_row_range(a, sa_attn_kv_length(a, b), i, lo, hi);
}

int32_t sa_attn_key_queries(const sa_attn *a, int32_t b, int32_t k0, int32_t nk, int32_t *ilo)
{
    /* Both ends of a row's key range are non-decreasing in the row, so the rows that see a key of
       [k0, k0 + nk) are one run: from the first whose range ends past k0 to the first whose
       range starts at or past k0 + nk. */
    const int32_t len = sa_attn_kv_length(a, b);
    const int32_t rows = sa_attn_query_rows(a, b);
    const int32_t k1 = k0 + nk;
    int32_t lo = 0, hi = rows, klo, khi;
    while (lo < hi) { /* first row with khi > k0 */
        const int32_t mid = lo + (hi - lo) / 2;
        sa_row_range(a, len, mid, &klo, &khi);
        if (khi > k0)
            hi = mid;
        else
            lo = mid + 1;
    }
    const int32_t first = lo;
    hi = rows;
    while (lo < hi) { /* first row with klo >= k1 */
        const int32_t mid = lo + (hi - lo) / 2;
        sa_row_range(a, len, mid, &klo, &khi);
        if (klo >= k1)
            hi = mid;
        else
            lo = mid + 1;
    }
    *ilo = first;
    return lo - first;
}

void sa_attn_tile_probs(const sa_attn *a, int32_t b, int32_t h, int32_t i0, int32_t mb, int32_t k0,
                        int32_t nk, float *s, size_t ld, const float *lse, float *dcap)
{
    const sa_kernels *kern = sa_kernels_get();
    const int modified = a->softcap > 0.0f || a->alibi || a->bias != NULL;
    const int32_t len = sa_attn_kv_length(a, b), k1 = k0 + nk;
    const float slope = a->alibi ? (float)sa_alibi_slope(h, a->n_heads) : 0.0f;
    if (a->softcap <= 0.0f)
        dcap = NULL;
    for (int32_t r = 0; r < mb; r++) {
        const int32_t i = i0 + r;
        float *row = s + (size_t)r * ld;
        float *dc = dcap != NULL ? dcap + (size_t)r * ld : NULL;
        int32_t lo, hi;
        sa_row_range(a, len, i, &lo, &hi);
        lo = lo > k0 ? lo : k0;
        hi = hi < k1 ? hi : k1;
        if (hi <= lo || lse[r] == -INFINITY) {
            memset(row, 0, (size_t)nk * sizeof(float));
            if (dc != NULL)
                memset(dc, 0, (size_t)nk * sizeof(float));
            continue;
        }
        float *part = row + (lo - k0);
        float scale = a->scale;
        if (modified) {
            sa_final_scores(a, part, lo, hi - lo, b, h, i, slope,
                            dc != NULL ? dc + (lo - k0) : NULL);
            scale = 1.0f;
        }
        if (fabsf(lse[r]) < SA_EXP_EXACT_MAX_FROM) {
            /* One exp per score, straight from the row's log-sum-exp (no max pass, no rescale
               pass): s scale - lse <= 0 up to half an ulp of lse (<= 2^-5 here), the same
               error that lse's rounding puts into exp(s - m) exp(m - lse). */
            kern->expsub(part, (size_t)(hi - lo), scale, lse[r]);
        } else {
            /* Huge scores: half an ulp of lse could push exp out of range, so subtract the
               tile's own maximum exactly (the softmax kernel's exact-max path) and rescale by
               exp(m - lse), m <= lse: no overflow. */
            float m;
            kern->softmax_exp(part, (size_t)(hi - lo), (size_t)(hi - lo), scale, &m);
            const float f = expf(m - lse[r]);
            for (int32_t j = 0; j < hi - lo; j++)
                part[j] *= f;
        }
        memset(row, 0, (size_t)(lo - k0) * sizeof(float));
        memset(row + (hi - k0), 0, (size_t)(k1 - hi) * sizeof(float));
        if (dc != NULL) {
            memset(dc, 0, (size_t)(lo - k0) * sizeof(float));
            memset(dc + (hi - k0), 0, (size_t)(k1 - hi) * sizeof(float));
        }
    }
}

void sa_attn_pv(const sa_attn *a, int32_t b, int32_t g, int32_t klo, int32_t mb, int32_t nk,
                const float *s, size_t ld_s, const float *inv, float *ob, size_t ldo, float *conv)
{
    const int32_t hd = sa_attn_dv(a); /* the value heads' width */
    const size_t v_at = sa_attn_kv_at(a, a->ldv, a->v_bs, a->v_hs, hd, b, g, klo);
    if (mb <= SA_ROWS_MAX && a->kv_dtype != SELFATTN_DTYPE_F32) /* few rows: stream V once */
        sa_kernels_get()->pv_x16[a->kv_dtype - 1]((size_t)mb, (size_t)nk, (size_t)hd, s, ld_s,
                                                  a->v16 + v_at, a->ldv, ob, ldo);
    else if (mb <= SA_ROWS_MAX)
        sa_kernels_get()->pv((size_t)mb, (size_t)nk, (size_t)hd, s, ld_s, a->v + v_at, a->ldv, ob,
                             ldo);
    else if (a->kv_dtype != SELFATTN_DTYPE_F32)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, mb, hd, nk, 1.0f, s, (int)ld_s,
                    sa_attn_widen(a, a->v16 + v_at, a->ldv, nk, hd, conv), hd, 0.0f, ob, (int)ldo);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, mb, hd, nk, 1.0f, s, (int)ld_s,
                    a->v + v_at, (int)a->ldv, 0.0f, ob, (int)ldo);
    for (int32_t r = 0; r < mb; r++) {
        float *o = ob + (size_t)r * ldo;
        const float f = inv[r];
        if (f == 0.0f) /* a row that sees no key: zeros, even where V holds a NaN */
            memset(o, 0, (size_t)hd * sizeof(float));
        else
            for (int32_t c = 0; c < hd; c++)
                o[c] *= f;
    }
}

/* The scores out of rows [i0, i0 + mb) of (b, h) (stacked: query i0 of heads h .. h + mb - 1),
   at head row head_row, at the stage asked: stages 0 and 1 over every key below the sequence's
   length, masked or not (so computed here, in chunks of the score block s, whatever the block
   skipping), stage 2 over each row's visible keys of the block's [klo, klo + nk); -inf at every
   other key. */
static void sa_attn_scores(const sa_attn *a, const sa_attn_plan *p, int32_t b, int32_t h,
                           int32_t i0, int32_t mb, int32_t klo, int32_t nk, size_t head_row,
                           float *s)
{
    const int32_t len = sa_attn_kv_length(a, b), stage = a->scores_stage;
    const int32_t k0 = stage == 2 ? klo : 0, k1 = stage == 2 ? klo + nk : len;
    const size_t kv_len = (size_t)a->kv_len;
    sa_scores_masked(a, head_row, mb);
    for (int32_t c0 = k0; c0 < k1; c0 += (int32_t)p->ld_s) {
        const int32_t cn = k1 - c0 < (int32_t)p->ld_s ? k1 - c0 : (int32_t)p->ld_s;
        sa_attn_qk(a, p, b, h, i0, mb, c0, cn, s);
        for (int32_t r = 0; r < mb; r++) {
            const int32_t i = p->stacked ? i0 : i0 + r, hr = p->stacked ? h + r : h;
            float *row = s + (size_t)r * p->ld_s, *o = a->scores + (head_row + (size_t)r) * kv_len;
            int32_t lo = c0, hi = c0 + cn;
            if (stage == 2) { /* the final scores, as the softmax takes them */
                int32_t rlo, rhi;
                sa_row_range(a, len, i, &rlo, &rhi);
                lo = rlo > lo ? rlo : lo;
                hi = rhi < hi ? rhi : hi;
                if (hi <= lo)
                    continue;
                const float slope = a->alibi ? (float)sa_alibi_slope(hr, a->n_heads) : 0.0f;
                sa_final_scores(a, row + (lo - c0), lo, hi - lo, b, hr, i, slope, NULL);
                memcpy(o + lo, row + (lo - c0), (size_t)(hi - lo) * sizeof(float));
            } else if (stage == 1 && a->softcap > 0.0f) {
                sa_kernels_get()->softcap(row, (size_t)cn, a->scale, a->softcap);
                memcpy(o + c0, row, (size_t)cn * sizeof(float));
            } else {
                for (int32_t j = 0; j < cn; j++)
                    o[c0 + j] = row[j] * a->scale;
            }
        }
    }
}

/* Rows [i0, i0 + mb) of (b, h) over the keys [klo, klo + nk) taken p->key_chunk at a time, with
   an online softmax (Milakov and Gimelshein 2018; FlashAttention's forward): per row a running
   maximum m and sum l; each chunk's probabilities are taken relative to the running maximum
   (raised first when the chunk holds a larger score, the output row and l then rescaled by
   exp(m_old - m_new) <= 1), and O += P_c V_c (one sgemm per chunk). At the end each output row is
   divided by l, lse = m + log l; a row that sees no key gets zeros and -inf. Each chunk reads
   only keys of [klo, klo + nk), as the whole-row path does. */
static void sa_attn_chunked(const sa_attn *a, const sa_attn_plan *p, int32_t b, int32_t h,
                            int32_t i0, int32_t mb, int32_t klo, int32_t nk, float *s, float *ob,
                            size_t ldo, size_t head_row)
{
    const sa_f32_softmax_exp_above_fn exp_above = sa_kernels_get()->softmax_exp_above;
    const int modified = a->softcap > 0.0f || a->alibi || a->bias != NULL;
    const int32_t len = sa_attn_kv_length(a, b), dv = sa_attn_dv(a), khi = klo + nk;
    const float slope = a->alibi ? (float)sa_alibi_slope(h, a->n_heads) : 0.0f;
    float *run_m = s + (size_t)p->rows * p->ld_s, *run_l = run_m + p->rows;
    for (int32_t r = 0; r < mb; r++) {
        run_m[r] = -INFINITY;
        run_l[r] = 0.0f;
        memset(ob + (size_t)r * ldo, 0, (size_t)dv * sizeof(float));
    }
    const size_t v_at = sa_attn_kv_at(a, a->ldv, a->v_bs, a->v_hs, dv, b, h / a->group, 0);
    for (int32_t c0 = klo; c0 < khi; c0 += p->key_chunk) {
        const int32_t cn = khi - c0 < p->key_chunk ? khi - c0 : p->key_chunk, c1 = c0 + cn;
        sa_attn_qk(a, p, b, h, i0, mb, c0, cn, s);
        int32_t seen = 0; /* rows that see a key of this chunk */
        for (int32_t r = 0; r < mb; r++) {
            float *row = s + (size_t)r * p->ld_s;
            int32_t lo, hi;
            sa_row_range(a, len, i0 + r, &lo, &hi);
            lo = lo > c0 ? lo : c0;
            hi = hi < c1 ? hi : c1;
            float scale = a->scale;
            if (hi > lo && modified) {
                const float mc =
                    sa_final_scores(a, row + (lo - c0), lo, hi - lo, b, h, i0 + r, slope, NULL);
                scale = 1.0f;
                if (mc == -INFINITY)
                    hi = lo; /* every key of the chunk masked by the bias: nothing to add */
            }
            if (hi <= lo) {
                memset(row, 0, (size_t)cn * sizeof(float));
                continue;
            }
            float m;
            const float sum = exp_above(row + (lo - c0), (size_t)(hi - lo), (size_t)(c1 - lo),
                                        scale, run_m[r], &m);
            memset(row, 0, (size_t)(lo - c0) * sizeof(float));
            if (m > run_m[r] && run_l[r] != 0.0f) { /* the maximum grew: rescale what is summed */
                const float f = expf(run_m[r] - m);
                float *o = ob + (size_t)r * ldo;
                for (int32_t c = 0; c < dv; c++)
                    o[c] *= f;
                run_l[r] *= f;
            }
            run_m[r] = m;
            run_l[r] += sum;
            seen++;
        }
        if (seen == 0)
            continue;
        const float *vc = a->v != NULL ? a->v + v_at + (size_t)c0 * a->ldv : NULL;
        size_t ldv = a->ldv;
        if (a->kv_dtype != SELFATTN_DTYPE_F32) {
            vc = sa_attn_widen(a, a->v16 + v_at + (size_t)c0 * a->ldv, a->ldv, cn, dv,
                               s + p->kv_conv);
            ldv = (size_t)dv;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, mb, dv, cn, 1.0f, s, (int)p->ld_s,
                    vc, (int)ldv, 1.0f, ob, (int)ldo);
    }
    for (int32_t r = 0; r < mb; r++) {
        float *o = ob + (size_t)r * ldo;
        if (run_l[r] == 0.0f) { /* a row that sees no key: zeros, even where V holds a NaN */
            memset(o, 0, (size_t)dv * sizeof(float));
            if (a->lse != NULL)
                a->lse[head_row + (size_t)r] = -INFINITY;
            continue;
        }
        const float f = 1.0f / run_l[r];
        for (int32_t c = 0; c < dv; c++)
            o[c] *= f;
        if (a->lse != NULL)
            a->lse[head_row + (size_t)r] = run_m[r] + logf(run_l[r]);
    }
}

/* Task `task` of one attention description, with one worker's scratch s: the rows of one query
   block of one head, or with stacking the one query row of every head of one group. */
static void sa_attn_block(const sa_attn *a, const sa_attn_plan *p, float *s, int task)
{
    const int32_t heads_per_task = p->stacked ? a->group : 1;
    const int32_t units = a->n_heads / heads_per_task;
    const sa_attn_task_tile tile = sa_attn_tile_of(a, p, units, task);
    const int32_t b = tile.b, h = tile.unit * heads_per_task; /* the first head */
    const int32_t dv = sa_attn_dv(a), i0 = tile.i0, q_rows = tile.rows, q_mb = tile.valid;
    /* with stacking q_len is 1: row r is head h + r, at head_row + r as well */
    const int32_t rows = p->stacked ? heads_per_task : q_rows;
    const int32_t mb = p->stacked ? (q_mb > 0 ? heads_per_task : 0) : q_mb;
    const size_t ldo = p->stacked ? (size_t)dv : a->ldo;
    const size_t head_row = ((size_t)b * a->n_heads + h) * a->q_len + (size_t)i0;
    if (mb < rows) /* padding rows of this block */
        sa_empty_extras(a, head_row + (size_t)mb, rows - mb, 1);
    if (mb == 0)
        return;

    float *ob = a->out + ((size_t)b * a->q_len + i0) * a->ldo + (size_t)h * dv;
    int32_t klo;
    const int32_t nk = sa_attn_block_keys(a, b, i0, q_mb, &klo);
    if (a->scores != NULL) /* before the probabilities take s */
        sa_attn_scores(a, p, b, h, i0, mb, klo, nk, head_row, s);
    if (nk == 0) { /* no row of the block sees a key */
        for (int32_t r = 0; r < mb; r++)
            memset(ob + (size_t)r * ldo, 0, (size_t)dv * sizeof(float));
        sa_empty_extras(a, head_row, mb, 0);
        return;
    }

    if (p->key_chunk > 0) {
        sa_attn_chunked(a, p, b, h, i0, mb, klo, nk, s, ob, ldo, head_row);
        return;
    }
    float *inv = s + (size_t)p->rows * p->ld_s, *lse = inv + p->rows;
    sa_attn_probs(a, p, b, h, i0, mb, klo, nk, s, inv, lse, NULL);
    for (int32_t r = 0; r < mb; r++) {
        if (a->lse != NULL)
            a->lse[head_row + (size_t)r] = lse[r];
        if (a->weights != NULL) {
            const float *row = s + (size_t)r * p->ld_s;
            float *w = a->weights + (head_row + (size_t)r) * (size_t)a->kv_len;
            memset(w, 0, (size_t)klo * sizeof(float));
            for (int32_t j = 0; j < nk; j++)
                w[klo + j] = row[j] * inv[r];
            memset(w + klo + nk, 0, (size_t)(a->kv_len - klo - nk) * sizeof(float));
        }
    }
    sa_attn_pv(a, b, h / a->group, klo, mb, nk, s, p->ld_s, inv, ob, ldo, s + p->kv_conv);
}

static void sa_attn_task(void *arg, int worker, int task)
{
    const sa_attn_job *job = arg;
    sa_attn_block(job->a, job->p, job->scratch + (size_t)worker * job->p->floats_per_worker, task);
}

void sa_attn_run(const sa_attn *a, const sa_attn_plan *p, int workers, float *scratch)
{
    sa_attn_job job = {a, p, scratch};
    sa_run_tasks(workers, p->n_tasks, sa_attn_task, &job);
}

typedef struct sa_attn_many_job {
    const sa_attn *a;
    const sa_attn_plan *p;
    float *scratch;
    size_t per_worker;
} sa_attn_many_job;

static void sa_attn_many_task(void *arg, int worker, int task)
{
    const sa_attn_many_job *job = arg;
    int i = 0;
    while (task >= job->p[i].n_tasks) /* descriptions in order: few, so a scan */
        task -= job->p[i++].n_tasks;
    sa_attn_block(&job->a[i], &job->p[i], job->scratch + (size_t)worker * job->per_worker, task);
}

void sa_attn_run_many(const sa_attn *a, const sa_attn_plan *p, int n, int workers, float *scratch,
                      size_t per_worker)
{
    int tasks = 0;
    for (int i = 0; i < n; i++)
        tasks += p[i].n_tasks;
    sa_attn_many_job job = {a, p, scratch, per_worker};
    sa_run_tasks(workers, tasks, sa_attn_many_task, &job);
}
