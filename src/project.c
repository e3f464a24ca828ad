/* Projections out = in * w^T + bias over the valid rows of a batch, shared out among workers.
 *
 * Many rows: each worker takes a chunk of the rows (one GEMM per run of contiguous valid rows).
 * Few rows (decoding, short prompts): the rows cannot be split usefully, so each worker takes a
 * slice of the output columns instead, i.e. of the weight matrix, which is what such a call
 * streams from memory. Up to SA_ROWS_MAX rows go through the small-M kernel, which reads the
 * weights once; sgemm with a few rows packs the whole weight matrix first. */
#include <cblas.h>

#include "internal.h"

#define SA_ROWS_PER_WORKER_MIN 32 /* fewer rows per worker: split the columns instead */
#define SA_COLS_PER_SLICE_MIN 64
#define SA_COL_ALIGN 16

typedef struct sa_proj_job {
    const sa_proj *p;
    int row_chunks, col_chunks;
} sa_proj_job;

static void sa_add_bias(float *c, size_t n_rows, size_t width, size_t ldc, const float *bias)
{
    for (size_t r = 0; r < n_rows; r++) {
        float *row = c + r * ldc;
        for (size_t j = 0; j < width; j++)
            row[j] += bias[j];
    }
}

/* Rows [row0, row0 + n_rows), columns [c0, c1). */
static void sa_project_rows(const sa_proj *p, size_t row0, size_t n_rows, size_t c0, size_t c1)
{
    float *c = p->out + row0 * p->n + c0;
    const float *w = p->w + c0 * p->k;
    if (n_rows <= SA_ROWS_MAX) /* few rows: stream the weights once, unpacked */
        sa_kernels_get()->qkt(n_rows, c1 - c0, p->k, p->in + row0 * p->k, p->k, w, p->k, c, p->n);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n_rows, (int)(c1 - c0),
                    (int)p->k, 1.0f, p->in + row0 * p->k, (int)p->k, w, (int)p->k, 0.0f, c,
                    (int)p->n);
    if (p->bias != NULL)
        sa_add_bias(c, n_rows, c1 - c0, p->n, p->bias + c0);
}

/* Valid rows [v0, v1) (valid rows numbered across the batch in order), columns [c0, c1): one
   call per maximal run of memory-contiguous rows. */
static void sa_project_valid(const sa_proj *p, size_t v0, size_t v1, size_t c0, size_t c1)
{
    size_t seen = 0; /* valid rows before sequence b */
    size_t run0 = 0, run_n = 0;
    for (int32_t b = 0; b < p->batch && seen < v1; b++) {
        const size_t len = p->lengths != NULL ? (size_t)p->lengths[b] : (size_t)p->seq_len;
        const size_t lo = v0 > seen ? v0 - seen : 0;
        const size_t hi = v1 - seen < len ? v1 - seen : len;
        if (lo < hi) {
            const size_t r0 = (size_t)b * (size_t)p->seq_len + lo;
            /* Merge with the previous run when contiguous and still an int row count. */
            if (run_n > 0 && run0 + run_n == r0 && run_n + (hi - lo) <= (size_t)INT32_MAX) {
                run_n += hi - lo;
            } else {
                if (run_n > 0)
                    sa_project_rows(p, run0, run_n, c0, c1);
                run0 = r0;
                run_n = hi - lo;
            }
        }
        seen += len;
    }
    if (run_n > 0)
        sa_project_rows(p, run0, run_n, c0, c1);
}

/* Column slice edges, on 16-column (64-byte) boundaries. */
static size_t sa_col_edge(size_t n, int slice, int slices)
{
    if (slice >= slices)
        return n;
    const size_t e = n * (size_t)slice / (size_t)slices / SA_COL_ALIGN * SA_COL_ALIGN;
    return e < n ? e : n;
}

static void sa_proj_task(void *arg, int worker, int task)
{
    (void)worker;
    const sa_proj_job *job = arg;
    const sa_proj *p = job->p;
    const int rc = task / job->col_chunks, cc = task % job->col_chunks;
    const size_t v0 = p->valid_rows * (size_t)rc / (size_t)job->row_chunks;
    const size_t v1 = p->valid_rows * (size_t)(rc + 1) / (size_t)job->row_chunks;
    const size_t c0 = sa_col_edge(p->n, cc, job->col_chunks);
    const size_t c1 = sa_col_edge(p->n, cc + 1, job->col_chunks);
    if (v0 < v1 && c0 < c1)
        sa_project_valid(p, v0, v1, c0, c1);
}

void sa_project(const sa_proj *p, int workers)
{
    sa_proj_job job = {p, 1, 1};
    if (p->valid_rows == 0)
        return;
    /* few rows and enough columns: split the columns; otherwise the rows */
    if (p->valid_rows < (size_t)workers * SA_ROWS_PER_WORKER_MIN &&
        p->n >= (size_t)workers * SA_COLS_PER_SLICE_MIN)
        job.col_chunks = workers;
    else
        job.row_chunks = workers;
    sa_run_tasks(workers, job.row_chunks * job.col_chunks, sa_proj_task, &job);
}
