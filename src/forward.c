/* selfattn_forward and selfattn_attend.
 *
 * A call runs in up to three phases, each a list of independent tasks taken from a shared
 * counter by the call's workers (the calling thread and up to threads-1 helpers it starts):
 *   1. projections: chunks of the valid rows of x, one fused GEMM x * W_qkv^T per chunk;
 *   2. attention: one task per (query block, sequence, head): S = Q_blk K^T (only the keys the
 *      block can see), the scaled-softmax kernel on each row of S, O_blk = P V, and the rows of
 *      O_blk scaled by 1/sum;
 *   3. output projection: chunks of valid rows, attn * W_o^T.
 * Which worker runs a task never changes its result, so results do not depend on timing. The
 * workspace is one allocation made before anything is written: O(rows * width) for the
 * projections plus O(block * kv_len) per worker for scores, never an L x L matrix. */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "internal.h"

#define SA_SCORE_ALIGN 16 /* floats: score rows start on 64-byte boundaries */

typedef struct sa_run sa_run;

/* One projection out = in * w^T + bias over rows: in [rows][k], w [n][k], out [rows][n]. */
typedef struct sa_linear {
    const float *in;
    size_t k;
    const float *w;
    const float *bias; /* [n] or NULL */
    float *out;
    size_t n;
} sa_linear;
typedef void (*sa_task_fn)(sa_run *run, int worker, int task);

struct sa_run {
    const selfattn_layer *layer;
    sa_f32_softmax_exp_fn softmax_exp;
    int32_t batch, q_len, kv_len;
    const int32_t *lengths; /* kv lengths; in forward also the valid query rows */
    int pad_queries;        /* forward: query rows at or past lengths[b] are not computed */
    int causal;
    int32_t n_heads, group, head_dim;
    float scale;
    const float *q, *k, *v;
    size_t ldq, ldk, ldv;
    float *out;
    size_t ldo;
    int32_t block;    /* query rows per attention task */
    int32_t n_blocks; /* ceil(q_len / block) */
    size_t ld_s;      /* row stride of a score block */
    float *scores;    /* per worker: block * ld_s scores, then block inverse sums */
    size_t scores_per_worker;
    /* projection phases (forward only) */
    const sa_linear *proj; /* the projection being run */
    size_t valid_rows;
    int n_chunks;
    /* scheduling */
    atomic_int next;
    int n_tasks;
    sa_task_fn task;
};

static pthread_once_t sa_blas_once = PTHREAD_ONCE_INIT;

/* All parallel work is done by the library's workers, each calling BLAS on its own shapes; a
   multi-threaded OpenBLAS would start its own threads inside each call and oversubscribe the
   cores (and serialise concurrent callers on its level-3 lock). */
static void sa_blas_single_threaded(void)
{
#ifdef SELFATTN_HAVE_OPENBLAS
    const char *env = getenv("SELFATTN_BLAS_THREADS");
    if (env == NULL || strcmp(env, "keep") != 0)
        openblas_set_num_threads(1);
#endif
}

static int32_t sa_kv_length(const sa_run *run, int32_t b)
{
    return run->lengths != NULL ? run->lengths[b] : run->kv_len;
}

/* ---- Phase 2: attention ---- */

/* Keys visible to query row i of sequence b: causal keys j <= i + kv_len - q_len, and j below the
   sequence's length. */
static int32_t sa_visible_keys(const sa_run *run, int32_t b, int32_t i)
{
    int64_t n = sa_kv_length(run, b);
    if (run->causal) {
        const int64_t c = (int64_t)i + run->kv_len - run->q_len + 1;
        if (c < n)
            n = c;
    }
    return n < 0 ? 0 : (int32_t)n;
}

static void sa_attention_task(sa_run *run, int worker, int task)
{
    /* Largest blocks (last rows: most keys under a causal mask) first, for balance. */
    const int per_block = run->batch * run->n_heads;
    const int32_t blk = run->n_blocks - 1 - task / per_block;
    const int32_t b = (task % per_block) / run->n_heads;
    const int32_t h = task % run->n_heads;
    const int32_t hd = run->head_dim;

    const int32_t rows_b = run->pad_queries ? sa_kv_length(run, b) : run->q_len;
    const int32_t i0 = blk * run->block;
    if (i0 >= rows_b)
        return;
    const int32_t mb = (rows_b - i0 < run->block) ? rows_b - i0 : run->block;

    const float *qb = run->q + ((size_t)b * run->q_len + i0) * run->ldq + (size_t)h * hd;
    const size_t kvh = (size_t)(h / run->group) * hd;
    const float *kh = run->k + (size_t)b * run->kv_len * run->ldk + kvh;
    const float *vh = run->v + (size_t)b * run->kv_len * run->ldv + kvh;
    float *ob = run->out + ((size_t)b * run->q_len + i0) * run->ldo + (size_t)h * hd;

    const int32_t nk = sa_visible_keys(run, b, i0 + mb - 1); /* the most any row sees */
    if (nk == 0) {
        for (int32_t r = 0; r < mb; r++)
            memset(ob + (size_t)r * run->ldo, 0, (size_t)hd * sizeof(float));
        return;
    }

    float *s = run->scores + (size_t)worker * run->scores_per_worker;
    float *inv = s + (size_t)run->block * run->ld_s;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mb, nk, hd, 1.0f, qb, (int)run->ldq, kh,
                (int)run->ldk, 0.0f, s, (int)run->ld_s);
    for (int32_t r = 0; r < mb; r++) {
        const int32_t nv = sa_visible_keys(run, b, i0 + r);
        float *row = s + (size_t)r * run->ld_s;
        if (nv == 0) {
            memset(row, 0, (size_t)nk * sizeof(float));
            inv[r] = 0.0f;
        } else {
            inv[r] = 1.0f / run->softmax_exp(row, (size_t)nv, (size_t)nk, run->scale);
        }
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, mb, hd, nk, 1.0f, s, (int)run->ld_s, vh,
                (int)run->ldv, 0.0f, ob, (int)run->ldo);
    for (int32_t r = 0; r < mb; r++) {
        float *o = ob + (size_t)r * run->ldo;
        const float f = inv[r];
        for (int32_t c = 0; c < hd; c++)
            o[c] *= f;
    }
}

/* ---- Phases 1 and 3: projections over the valid rows ---- */

static void sa_add_bias(float *c, size_t n_rows, size_t width, size_t ldc, const float *bias)
{
    for (size_t r = 0; r < n_rows; r++) {
        float *row = c + r * ldc;
        for (size_t j = 0; j < width; j++)
            row[j] += bias[j];
    }
}

/* out[r] = in[r] * w^T + bias for rows [row0, row0 + n_rows) of the current projection. */
static void sa_project_rows(sa_run *run, size_t row0, size_t n_rows)
{
    const sa_linear *p = run->proj;
    float *c = p->out + row0 * p->n;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n_rows, (int)p->n, (int)p->k, 1.0f,
                p->in + row0 * p->k, (int)p->k, p->w, (int)p->k, 0.0f, c, (int)p->n);
    if (p->bias != NULL)
        sa_add_bias(c, n_rows, p->n, p->n, p->bias);
}

/* Projects the maximal runs of memory-contiguous rows among valid rows [v0, v1) (valid rows
   numbered across the batch in order), one GEMM per run. */
static void sa_for_valid_rows(sa_run *run, size_t v0, size_t v1)
{
    size_t seen = 0; /* valid rows before sequence b */
    size_t run0 = 0, run_n = 0;
    for (int32_t b = 0; b < run->batch && seen < v1; b++) {
        const size_t len = (size_t)sa_kv_length(run, b);
        const size_t lo = v0 > seen ? v0 - seen : 0;
        const size_t hi = v1 - seen < len ? v1 - seen : len;
        if (lo < hi) {
            const size_t r0 = (size_t)b * (size_t)run->q_len + lo;
            /* Merge with the previous run when contiguous and still an int row count. */
            if (run_n > 0 && run0 + run_n == r0 && run_n + (hi - lo) <= (size_t)INT32_MAX) {
                run_n += hi - lo;
            } else {
                if (run_n > 0)
                    sa_project_rows(run, run0, run_n);
                run0 = r0;
                run_n = hi - lo;
            }
        }
        seen += len;
    }
    if (run_n > 0)
        sa_project_rows(run, run0, run_n);
}

/* Task t of a projection phase: chunk t of the valid rows. */
static void sa_project_task(sa_run *run, int worker, int task)
{
    (void)worker;
    const size_t v0 = run->valid_rows * (size_t)task / (size_t)run->n_chunks;
    const size_t v1 = run->valid_rows * (size_t)(task + 1) / (size_t)run->n_chunks;
    sa_for_valid_rows(run, v0, v1);
}

/* ---- Workers ---- */

typedef struct sa_worker {
    sa_run *run;
    int id;
} sa_worker;

static void sa_work(sa_run *run, int worker)
{
    for (;;) {
        const int t = atomic_fetch_add_explicit(&run->next, 1, memory_order_relaxed);
        if (t >= run->n_tasks)
            return;
        run->task(run, worker, t);
    }
}

static void *sa_worker_main(void *arg)
{
    sa_worker *w = arg;
    sa_work(w->run, w->id);
    return NULL;
}

/* Runs n_tasks tasks on up to n_workers workers. If a helper thread cannot be started the
   others take its tasks: the result is the same, only slower. */
static void sa_parallel(sa_run *run, int n_workers, int n_tasks, sa_task_fn task)
{
    pthread_t tid[64];
    sa_worker args[64];
    int started[64];
    run->task = task;
    run->n_tasks = n_tasks;
    atomic_store_explicit(&run->next, 0, memory_order_relaxed);
    if (n_workers > n_tasks)
        n_workers = n_tasks;
    if (n_workers > 64)
        n_workers = 64;
    for (int i = 1; i < n_workers; i++) {
        args[i].run = run;
        args[i].id = i;
        started[i] = sa_thread_start_allowed() &&
                     pthread_create(&tid[i], NULL, sa_worker_main, &args[i]) == 0;
    }
    sa_work(run, 0);
    for (int i = 1; i < n_workers; i++)
        if (started[i])
            pthread_join(tid[i], NULL);
}

/* ---- Common set-up ---- */

/* Fills the attention part of run and the per-worker score workspace size (in floats). */
static selfattn_status sa_plan_attention(sa_run *run, const selfattn_layer *l, int32_t batch,
                                         int32_t q_len, int32_t kv_len)
{
    run->layer = l;
    run->softmax_exp = sa_kernels_get()->softmax_exp;
    run->batch = batch;
    run->q_len = q_len;
    run->kv_len = kv_len;
    run->causal = l->causal;
    run->n_heads = l->n_heads;
    run->group = l->n_heads / l->n_kv_heads;
    run->head_dim = l->head_dim;
    run->scale = l->scale_opt != 0.0f ? l->scale_opt : (float)(1.0 / sqrt((double)l->head_dim));
    run->block = sa_block_rows(q_len, kv_len, l->causal);
    run->n_blocks = (int32_t)(((int64_t)q_len + run->block - 1) / run->block);
    run->ld_s = ((size_t)kv_len + SA_SCORE_ALIGN - 1) / SA_SCORE_ALIGN * SA_SCORE_ALIGN;
    size_t per;
    if (!sa_mul_size((size_t)run->block, run->ld_s + 1, &per) ||
        !sa_add_size(per, SA_SCORE_ALIGN - 1, &per))
        return SELFATTN_ERR_OVERFLOW;
    per = per / SA_SCORE_ALIGN * SA_SCORE_ALIGN;
    run->scores_per_worker = per;
    if (run->ld_s > INT32_MAX || (int64_t)batch * l->n_heads * run->n_blocks > INT32_MAX)
        return SELFATTN_ERR_OVERFLOW; /* ld_s (a CBLAS leading dimension) and tasks are ints */
    return SELFATTN_OK;
}

/* Bytes of an array of rows x width floats, or 0 on overflow. */
static size_t sa_array_bytes(size_t rows, size_t width)
{
    size_t n;
    if (!sa_mul_size(rows, width, &n) || !sa_mul_size(n, sizeof(float), &n) ||
        n > (size_t)PTRDIFF_MAX)
        return 0;
    return n;
}

static int sa_workers_for(const selfattn_layer *l, double flops)
{
    /* Below about a millisecond of work a helper thread costs more than it saves. */
    if (flops < 2e7)
        return 1;
    return sa_layer_threads(l);
}

static selfattn_status sa_check_lengths(const int32_t *lengths, int32_t batch, int32_t max)
{
    if (lengths == NULL)
        return SELFATTN_OK;
    for (int32_t b = 0; b < batch; b++)
        SA_CHECK(lengths[b] >= 0 && lengths[b] <= max, SELFATTN_ERR_INVALID);
    return SELFATTN_OK;
}

/* ---- Entry points ---- */

selfattn_status selfattn_attend(const selfattn_layer *layer, int32_t batch, int32_t q_len,
                                int32_t kv_len, const float *q, const float *k, const float *v,
                                const int32_t *kv_lengths, float *out)
{
    SA_CHECK(layer != NULL && q != NULL && k != NULL && v != NULL && out != NULL,
             SELFATTN_ERR_NULL);
    SA_CHECK(batch >= 1 && q_len >= 1 && kv_len >= 1, SELFATTN_ERR_INVALID);
    SA_CHECK(layer->head_dim != 0, SELFATTN_ERR_STATE);
    const size_t nq = (size_t)layer->n_heads * (size_t)layer->head_dim;
    const size_t nkv = (size_t)layer->n_kv_heads * (size_t)layer->head_dim;
    SA_CHECK(sa_array_bytes((size_t)batch * (size_t)q_len, nq) != 0 &&
                 sa_array_bytes((size_t)batch * (size_t)kv_len, nkv) != 0,
             SELFATTN_ERR_OVERFLOW);
    /* Arrays are read only once the sizes are known to be addressable. */
    selfattn_status st = sa_check_lengths(kv_lengths, batch, kv_len);
    SA_CHECK(st == SELFATTN_OK, st);

    const double flops = 4.0 * batch * (double)q_len * kv_len * (double)nq;
    const int workers = sa_workers_for(layer, flops);
    sa_run run;
    memset(&run, 0, sizeof run);
    st = sa_plan_attention(&run, layer, batch, q_len, kv_len);
    SA_CHECK(st == SELFATTN_OK, st);
    const size_t ws_bytes = sa_array_bytes((size_t)workers, run.scores_per_worker);
    SA_CHECK(ws_bytes != 0, SELFATTN_ERR_OVERFLOW);
    float *ws = sa_malloc(ws_bytes);
    SA_CHECK(ws != NULL, SELFATTN_ERR_NOMEM);

    pthread_once(&sa_blas_once, sa_blas_single_threaded);
    run.lengths = kv_lengths;
    run.pad_queries = 0;
    run.q = q;
    run.k = k;
    run.v = v;
    run.ldq = nq;
    run.ldk = nkv;
    run.ldv = nkv;
    run.out = out;
    run.ldo = nq;
    run.scores = ws;
    sa_parallel(&run, workers, batch * layer->n_heads * run.n_blocks, sa_attention_task);
    sa_free(ws);
    return SELFATTN_OK;
}

selfattn_status selfattn_forward(const selfattn_layer *layer, int32_t batch, int32_t seq_len,
                                 const float *x, const int32_t *lengths, float *y)
{
    SA_CHECK(layer != NULL && x != NULL && y != NULL, SELFATTN_ERR_NULL);
    SA_CHECK(batch >= 1 && seq_len >= 1, SELFATTN_ERR_INVALID);
    const unsigned need = SA_HAVE_Q | SA_HAVE_K | SA_HAVE_V | (layer->out_proj ? SA_HAVE_O : 0u);
    SA_CHECK(layer->head_dim != 0 && (layer->have & need) == need, SELFATTN_ERR_STATE);

    const size_t dm = (size_t)layer->d_model;
    const size_t nq = (size_t)layer->n_heads * (size_t)layer->head_dim;
    const size_t nkv = (size_t)layer->n_kv_heads * (size_t)layer->head_dim;
    const size_t nqkv = nq + 2 * nkv;
    const size_t rows = (size_t)batch * (size_t)seq_len; /* < 2^62 */
    SA_CHECK(sa_array_bytes(rows, dm) != 0, SELFATTN_ERR_OVERFLOW);
    /* Arrays are read only once the sizes are known to be addressable. */
    selfattn_status st = sa_check_lengths(lengths, batch, seq_len);
    SA_CHECK(st == SELFATTN_OK, st);

    size_t valid = 0;
    for (int32_t b = 0; b < batch; b++)
        valid += lengths != NULL ? (size_t)lengths[b] : (size_t)seq_len;
    const double flops = 2.0 * (double)valid * (double)dm * (double)(nqkv + nq) +
                         4.0 * (double)valid * seq_len * (double)nq;
    const int workers = sa_workers_for(layer, flops);

    sa_run run;
    memset(&run, 0, sizeof run);
    st = sa_plan_attention(&run, layer, batch, seq_len, seq_len);
    SA_CHECK(st == SELFATTN_OK, st);

    /* One workspace: qkv [rows][nqkv], attn [rows][nq] (unless y takes it), scores per worker. */
    const size_t qkv_bytes = sa_array_bytes(rows, nqkv);
    const size_t attn_bytes = layer->out_proj ? sa_array_bytes(rows, nq) : 0;
    const size_t s_bytes = sa_array_bytes((size_t)workers, run.scores_per_worker);
    SA_CHECK(qkv_bytes != 0 && s_bytes != 0 && (attn_bytes != 0 || !layer->out_proj),
             SELFATTN_ERR_OVERFLOW);
    /* Each part starts on a 64-byte (16-float) boundary; every size is below PTRDIFF_MAX, so
       the padded offsets (in floats) cannot wrap. */
    const size_t attn_off = (qkv_bytes / sizeof(float) + 15) / 16 * 16;
    const size_t s_off = attn_off + (attn_bytes / sizeof(float) + 15) / 16 * 16;
    size_t total;
    SA_CHECK(sa_add_size(s_off * sizeof(float), s_bytes, &total) && total <= (size_t)PTRDIFF_MAX,
             SELFATTN_ERR_OVERFLOW);
    float *ws = sa_malloc(total);
    SA_CHECK(ws != NULL, SELFATTN_ERR_NOMEM);

    pthread_once(&sa_blas_once, sa_blas_single_threaded);
    run.lengths = lengths;
    run.pad_queries = 1;
    float *qkv = ws, *attn = layer->out_proj ? ws + attn_off : y;
    run.scores = ws + s_off;
    run.valid_rows = valid;
    run.q = qkv;
    run.k = qkv + nq;
    run.v = qkv + nq + nkv;
    run.ldq = run.ldk = run.ldv = nqkv;
    run.out = attn;
    run.ldo = nq;

    if (valid > 0) {
        const sa_linear in_proj = {x, dm, layer->w_qkv, layer->b_qkv, qkv, nqkv};
        const sa_linear out_proj = {attn, nq, layer->w_o, layer->b_o, y, dm};
        run.n_chunks = workers;
        run.proj = &in_proj;
        sa_parallel(&run, workers, run.n_chunks, sa_project_task);
        sa_parallel(&run, workers, batch * layer->n_heads * run.n_blocks, sa_attention_task);
        if (layer->out_proj) {
            run.proj = &out_proj;
            sa_parallel(&run, workers, run.n_chunks, sa_project_task);
        }
    }
    /* Padding rows are zeros. */
    for (int32_t b = 0; b < batch; b++) {
        const size_t len = lengths != NULL ? (size_t)lengths[b] : (size_t)seq_len;
        if (len < (size_t)seq_len)
            memset(y + ((size_t)b * seq_len + len) * dm, 0,
                   ((size_t)seq_len - len) * dm * sizeof(float));
    }
    sa_free(ws);
    return SELFATTN_OK;
}
