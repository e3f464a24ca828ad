/* Work over the valid rows of a padded batch: one iterator over their runs of memory-contiguous
 * rows, the row-split product out = in op(w) (+ bias) that the projections, the output projection
 * and the backward's products share, and the weight gradients (sums over the valid rows).
 *
 * Products: many rows are split among tasks by rows (one GEMM per run); few rows (decoding, short
 * prompts) cannot be split usefully, so the tasks take slices of the output columns instead, i.e.
 * of the weight matrix, which is what such a call streams from memory. Up to SA_ROWS_MAX rows of
 * an nn.Linear product go through the small-M kernel, which reads the weights once; sgemm with a
 * few rows packs the whole weight matrix first. With fixed_chunks (the backward) the split is a
 * function of the shapes alone (SA_ROWS_CHUNK valid rows a task), so results do not depend on the
 * worker count. */
#include <string.h>

#include <cblas.h>

#include "internal.h"

#define SA_ROWS_PER_WORKER_MIN 32 /* fewer rows per worker: split the columns instead */
#define SA_COLS_PER_SLICE_MIN 64
/* Column slices a worker when few rows split the columns: more tasks than workers, so that a
   helper thread that starts late (waking an idle CPU took 100-180 us, median 160, on the 2-vCPU
   AMD EPYC VM) finds part of the first product left, instead of the caller waiting for it to do
   its one half. */
#define SA_COL_TASKS_PER_WORKER 4
/* Fixed chunks (never a function of the worker count), large enough that the operand BLAS packs
   once per task (the weight matrix of a row-split product, the activations of a weight gradient)
   is packed a few times per call rather than tens of times: 128 rows and 64 columns ran about 7%
   slower overall at L 2048, d_model 768. */
#define SA_ROWS_CHUNK 256 /* valid rows per task of a fixed-chunk product */
#define SA_COLS_CHUNK 256 /* weight rows per task of the weight gradients */

static size_t sa_rows_len(const sa_rows *r, int32_t b)
{
    return r->lengths != NULL ? (size_t)r->lengths[b] : (size_t)r->seq_len;
}

void sa_rows_begin(sa_rows_it *it, const sa_rows *rows, size_t v0, size_t v1)
{
    it->rows = *rows;
    it->v = v0;
    it->v1 = v1;
    it->b = 0;
    it->seen = 0;
}

int sa_rows_next(sa_rows_it *it, size_t *r0, size_t *n)
{
    const size_t L = (size_t)it->rows.seq_len;
    *n = 0;
    while (it->v < it->v1 && it->b < it->rows.batch) {
        const size_t len = sa_rows_len(&it->rows, it->b);
        if (it->v >= it->seen + len) { /* sequence b holds none of them */
            it->seen += len;
            it->b++;
            continue;
        }
        const size_t lo = it->v - it->seen;
        const size_t hi = it->v1 - it->seen < len ? it->v1 - it->seen : len;
        const size_t start = (size_t)it->b * L + lo;
        /* a run goes on into the next sequence only when contiguous (the sequences between are
           full) and still an int row count */
        if (*n > 0 && (*r0 + *n != start || *n + (hi - lo) > (size_t)INT32_MAX))
            break;
        if (*n == 0)
            *r0 = start;
        *n += hi - lo;
        it->v += hi - lo;
        if (hi < len)
            break;
        it->seen += len;
        it->b++;
    }
    return *n > 0;
}

/* ---- Row-split products ---------------------------------------------------------------------- */

typedef struct sa_rowprod_job {
    const sa_rowprod *p;
    int row_chunks, col_chunks;
} sa_rowprod_job;

/* The bias (if any) added to rows [r0, r0 + n_rows), columns [c0, c1) of the output. */
static void sa_rowprod_bias(const sa_rowprod *p, size_t r0, size_t n_rows, size_t c0, size_t c1)
{
    if (p->bias != NULL)
        for (size_t r = 0; r < n_rows; r++)
            for (size_t j = c0; j < c1; j++)
                p->out[(r0 + r) * p->ld_out + j] += p->bias[j];
}

/* Rows [r0, r0 + n_rows) of the batch, output columns [c0, c1). */
static void sa_rowprod_rows(const sa_rowprod *p, size_t r0, size_t n_rows, size_t c0, size_t c1)
{
    float *c = p->out + r0 * p->ld_out + c0;
    const float *in = p->in + r0 * p->ld_in;
    if (p->w_dtype != SELFATTN_DTYPE_F32) { /* few rows of an nn.Linear product (see task) */
        sa_kernels_get()->qkt_x16[p->w_dtype - 1](n_rows, c1 - c0, p->k, in, p->ld_in,
                                                  p->w16 + c0 * p->ld_w, p->ld_w, c, p->ld_out);
    } else if (p->w_is_linear) { /* w [n][k]: out = in w^T */
        const float *w = p->w + c0 * p->ld_w;
        if (n_rows <= SA_ROWS_MAX) /* few rows: stream the weights once, unpacked */
            sa_kernels_get()->qkt(n_rows, c1 - c0, p->k, in, p->ld_in, w, p->ld_w, c, p->ld_out);
        else
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n_rows, (int)(c1 - c0),
                        (int)p->k, 1.0f, in, (int)p->ld_in, w, (int)p->ld_w, 0.0f, c,
                        (int)p->ld_out);
    } else { /* w [k][n]: out = in w */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n_rows, (int)(c1 - c0),
                    (int)p->k, 1.0f, in, (int)p->ld_in, p->w + c0, (int)p->ld_w, 0.0f, c,
                    (int)p->ld_out);
    }
    sa_rowprod_bias(p, r0, n_rows, c0, c1);
}

/* 16-bit weights: output columns per converted panel, as many as fit about 4 MiB of floats
   (few panels: each sgemm packs its activation rows again), at least 64. */
static size_t sa_panel_cols(size_t k)
{
    size_t p = ((size_t)1 << 20) / (k ? k : 1);
    p = p > 1024 ? 1024 : p < 64 ? 64 : p;
    return p / SA_ALIGN_FLOATS * SA_ALIGN_FLOATS;
}

size_t sa_rowprod_panel_floats(size_t k)
{
    return sa_panel_cols(k) * k;
}

/* Columns [c0, c1) of a 16-bit product over valid rows [v0, v1), one converted weight panel at
   a time (each panel converted once for all the task's rows). */
static void sa_rowprod_x16(const sa_rowprod *p, float *panel, size_t v0, size_t v1, size_t c0,
                           size_t c1)
{
    const sa_x16_to_f32_fn to_f32 = sa_kernels_get()->to_f32[p->w_dtype - 1];
    const size_t pw = sa_panel_cols(p->k);
    for (size_t cp = c0; cp < c1; cp += pw) {
        const size_t pc = c1 - cp < pw ? c1 - cp : pw;
        if (p->w_is_linear) /* rows [cp, cp + pc) of w [n][k] */
            for (size_t r = 0; r < pc; r++)
                to_f32(p->w16 + (cp + r) * p->ld_w, panel + r * p->k, p->k);
        else /* columns [cp, cp + pc) of w [k][n] */
            for (size_t i = 0; i < p->k; i++)
                to_f32(p->w16 + i * p->ld_w + cp, panel + i * pc, pc);
        sa_rows_it it;
        sa_rows_begin(&it, &p->rows, v0, v1);
        size_t r0, n;
        while (sa_rows_next(&it, &r0, &n)) {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, p->w_is_linear ? CblasTrans : CblasNoTrans,
                        (int)n, (int)pc, (int)p->k, 1.0f, p->in + r0 * p->ld_in, (int)p->ld_in,
                        panel, (int)(p->w_is_linear ? p->k : pc), 0.0f,
                        p->out + r0 * p->ld_out + cp, (int)p->ld_out);
            sa_rowprod_bias(p, r0, n, cp, cp + pc);
        }
    }
}

/* Column slice edges, on 64-byte boundaries. */
static size_t sa_col_edge(size_t n, int slice, int slices)
{
    if (slice >= slices)
        return n;
    const size_t e = n * (size_t)slice / (size_t)slices / SA_ALIGN_FLOATS * SA_ALIGN_FLOATS;
    return e < n ? e : n;
}

static void sa_rowprod_task(void *arg, int worker, int task)
{
    const sa_rowprod_job *job = arg;
    const sa_rowprod *p = job->p;
    const int rc = task / job->col_chunks, cc = task % job->col_chunks;
    size_t v0, v1;
    if (p->fixed_chunks) {
        v0 = (size_t)rc * SA_ROWS_CHUNK;
        v1 = v0 + SA_ROWS_CHUNK < p->valid_rows ? v0 + SA_ROWS_CHUNK : p->valid_rows;
    } else {
        v0 = p->valid_rows * (size_t)rc / (size_t)job->row_chunks;
        v1 = p->valid_rows * (size_t)(rc + 1) / (size_t)job->row_chunks;
    }
    const size_t c0 = sa_col_edge(p->n, cc, job->col_chunks);
    const size_t c1 = sa_col_edge(p->n, cc + 1, job->col_chunks);
    if (v0 >= v1 || c0 >= c1)
        return;
    if (p->w_dtype != SELFATTN_DTYPE_F32 && !(p->w_is_linear && v1 - v0 <= SA_ROWS_MAX)) {
        sa_rowprod_x16(p, p->panel + (size_t)worker * sa_rowprod_panel_floats(p->k), v0, v1, c0,
                       c1);
        return;
    }
    sa_rows_it it;
    sa_rows_begin(&it, &p->rows, v0, v1);
    size_t r0, n;
    while (sa_rows_next(&it, &r0, &n))
        sa_rowprod_rows(p, r0, n, c0, c1);
}

int sa_rowprod_chunks_fit(size_t valid_rows)
{
    return valid_rows / SA_ROWS_CHUNK < (size_t)INT32_MAX;
}

void sa_rowprod_run(const sa_rowprod *p, int workers)
{
    sa_rowprod_job job = {.p = p, .row_chunks = workers, .col_chunks = 1};
    if (p->valid_rows == 0)
        return;
    if (p->fixed_chunks)
        job.row_chunks = (int)((p->valid_rows + SA_ROWS_CHUNK - 1) / SA_ROWS_CHUNK);
    else if (p->valid_rows < (size_t)workers * SA_ROWS_PER_WORKER_MIN &&
             p->n >= (size_t)workers * SA_COLS_PER_SLICE_MIN) { /* few rows, enough columns */
        const size_t most = p->n / SA_COLS_PER_SLICE_MIN;
        const size_t want = workers > 1 ? (size_t)workers * SA_COL_TASKS_PER_WORKER : 1;
        job.row_chunks = 1;
        job.col_chunks = (int)(want < most ? want : most);
    }
    sa_run_tasks(workers, job.row_chunks * job.col_chunks, sa_rowprod_task, &job);
}

/* ---- Weight gradients --------------------------------------------------------------------------
 */

void sa_wgrad_add(sa_wgrad *j, const sa_wgrad_part *part)
{
    if (part->dw == NULL && part->db == NULL)
        return;
    sa_wgrad_part *p = &j->part[j->n_parts++];
    *p = *part;
    p->first_task = j->n_tasks;
    j->n_tasks += (int)((p->c1 - p->c0 + SA_COLS_CHUNK - 1) / SA_COLS_CHUNK);
}

static void sa_wgrad_task(void *arg, int worker, int task)
{
    (void)worker;
    const sa_wgrad *j = arg;
    int pi = j->n_parts - 1;
    while (j->part[pi].first_task > task)
        pi--;
    const sa_wgrad_part *p = &j->part[pi];
    const size_t a0 = p->c0 + (size_t)(task - p->first_task) * SA_COLS_CHUNK;
    const size_t a1 = a0 + SA_COLS_CHUNK < p->c1 ? a0 + SA_COLS_CHUNK : p->c1;
    const size_t m = a1 - a0, off = a0 - p->c0;
    double acc[SA_COLS_CHUNK] = {0};
    sa_rows_it it;
    sa_rows_begin(&it, &j->rows, 0, SIZE_MAX);
    size_t r0, n;
    int started = 0;
    while (sa_rows_next(&it, &r0, &n)) {
        const float *gr = p->g + r0 * p->ld_g + a0;
        if (p->dw != NULL)
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)m, (int)p->n_in, (int)n, 1.0f,
                        gr, (int)p->ld_g, p->in + r0 * p->ld_in, (int)p->ld_in,
                        started ? 1.0f : 0.0f, p->dw + off * p->n_in, (int)p->n_in);
        if (p->db != NULL)
            for (size_t r = 0; r < n; r++)
                for (size_t c = 0; c < m; c++)
                    acc[c] += (double)gr[r * p->ld_g + c];
        started = 1;
    }
    if (!started && p->dw != NULL) /* no valid row at all */
        memset(p->dw + off * p->n_in, 0, m * p->n_in * sizeof(float));
    if (p->db != NULL)
        for (size_t c = 0; c < m; c++)
            p->db[off + c] = (float)acc[c];
}

void sa_wgrad_run(const sa_wgrad *j, int workers)
{
    if (j->n_tasks > 0)
        sa_run_tasks(workers, j->n_tasks, sa_wgrad_task, (void *)j);
}
