/* Rotary position embeddings of the projected Q and K heads, in place (SELFATTN_OPT_ROPE): pair d
 * of each head's leading r dimensions turns by the angle pos * theta^(-2d/r), pairs (d, d + r/2)
 * for mode 1 (rotate-half) and (2d, 2d + 1) for mode 2 (adjacent). The angle is formed in double
 * so that long positions keep their precision; the backward pass turns by the opposite angle.
 * Consecutive rows step their angles by rotation (sa_rope_pairs): one thread turned 2048 rows of
 * 12 heads of 64 (K and Q) in 1.2-1.5 ms against 5.4-5.8 ms with a pow, a cos and a sin per pair
 * and row, 16 heads of 128 in 4.0-4.1 ms against 12.5-13.2, with the same floats (AMD EPYC, Zen
 * 5; not warm in cache). */
#include <math.h>

#include "internal.h"

typedef struct sa_rope_job {
    const selfattn_layer *l;
    float *qkv;
    size_t ld;
    sa_rows rows;
    size_t valid;
    const int64_t *pos0;
    double sign;
    int n_chunks;
} sa_rope_job;

/* Pairs a chunk: their angles' cosines and sines fit the stack. */
#define SA_ROPE_PAIRS 32
/* Rows a block: the first row's angles are evaluated exactly, each next row's reached by one
   rotation by the pair's frequency (angle addition in double: a few ulp of double a step, far
   below float's), instead of a pow, a cos and a sin per pair and row. The block's rows stay in
   L2 while each chunk of pairs goes over them. */
#define SA_ROPE_ROWS 32

/* Turns pairs [d0, d0 + nd) of every Q and K head of n <= SA_ROPE_ROWS rows (row stride ld) at
   the consecutive positions pos, pos + 1, ... */
static void sa_rope_pairs(const selfattn_layer *l, float *rows, size_t ld, size_t n, int64_t pos,
                          double sign, int32_t d0, int32_t nd)
{
    const int32_t hd = l->head_dim, r = l->rope_dims != 0 ? l->rope_dims : hd;
    const int32_t heads = l->n_heads + l->n_kv_heads;
    const double theta = l->rope_theta != 0.0 ? l->rope_theta : 10000.0;
    double c[SA_ROPE_PAIRS], s[SA_ROPE_PAIRS], step_c[SA_ROPE_PAIRS], step_s[SA_ROPE_PAIRS];
    for (int32_t k = 0; k < nd; k++) {
        const double freq = sign * pow(theta, -2.0 * (d0 + k) / r);
        c[k] = cos((double)pos * freq);
        s[k] = sin((double)pos * freq);
        if (n > 1) { /* a decoding step's one row takes no step */
            step_c[k] = cos(freq);
            step_s[k] = sin(freq);
        }
    }
    for (size_t t = 0; t < n; t++) {
        if (t > 0) /* the previous row's angle plus freq */
            for (int32_t k = 0; k < nd; k++) {
                const double ct = c[k] * step_c[k] - s[k] * step_s[k];
                s[k] = s[k] * step_c[k] + c[k] * step_s[k];
                c[k] = ct;
            }
        float cf[SA_ROPE_PAIRS], sf[SA_ROPE_PAIRS];
        for (int32_t k = 0; k < nd; k++) {
            cf[k] = (float)c[k];
            sf[k] = (float)s[k];
        }
        /* head by head, the chunk's pairs in order (mode 1: two contiguous runs, which the
           compiler vectorises) */
        for (int32_t h = 0; h < heads; h++) {
            float *x = rows + t * ld + (size_t)h * hd;
            if (l->rope == 1) {
                float *x1 = x + d0, *x2 = x + d0 + r / 2;
                for (int32_t k = 0; k < nd; k++) {
                    const float a = x1[k], b = x2[k];
                    x1[k] = a * cf[k] - b * sf[k];
                    x2[k] = a * sf[k] + b * cf[k];
                }
            } else {
                float *xp = x + 2 * (size_t)d0;
                for (size_t k = 0; k < (size_t)nd; k++) {
                    const float a = xp[2 * k], b = xp[2 * k + 1];
                    xp[2 * k] = a * cf[k] - b * sf[k];
                    xp[2 * k + 1] = a * sf[k] + b * cf[k];
                }
            }
        }
    }
}

/* Turns every Q and K head of n rows of one sequence at positions pos, pos + 1, ..., a block of
   rows at a time. */
static void sa_rope_rows(const selfattn_layer *l, float *rows, size_t ld, size_t n, int64_t pos,
                         double sign)
{
    const int32_t half = (l->rope_dims != 0 ? l->rope_dims : l->head_dim) / 2;
    for (size_t t0 = 0; t0 < n; t0 += SA_ROPE_ROWS) {
        const size_t m = n - t0 < SA_ROPE_ROWS ? n - t0 : SA_ROPE_ROWS;
        for (int32_t d0 = 0; d0 < half; d0 += SA_ROPE_PAIRS)
            sa_rope_pairs(l, rows + t0 * ld, ld, m, pos + (int64_t)t0, sign, d0,
                          half - d0 < SA_ROPE_PAIRS ? half - d0 : SA_ROPE_PAIRS);
    }
}

static void sa_rope_task(void *arg, int worker, int task)
{
    (void)worker;
    const sa_rope_job *j = arg;
    const size_t L = (size_t)j->rows.seq_len;
    sa_rows_it it;
    sa_rows_begin(&it, &j->rows, j->valid * (size_t)task / (size_t)j->n_chunks,
                  j->valid * (size_t)(task + 1) / (size_t)j->n_chunks);
    size_t r0, n;
    while (sa_rows_next(&it, &r0, &n))
        while (n > 0) { /* a run may go on into the next sequence: one sequence at a time */
            const size_t b = r0 / L, t = r0 % L, m = L - t < n ? L - t : n;
            const int64_t pos = (j->pos0 != NULL ? j->pos0[b] : 0) + (int64_t)t;
            sa_rope_rows(j->l, j->qkv + r0 * j->ld, j->ld, m, pos, j->sign);
            r0 += m;
            n -= m;
        }
}

void sa_rope_apply(const selfattn_layer *l, float *qkv, size_t ld, int32_t batch, int32_t seq_len,
                   const int32_t *lengths, const int64_t *pos0, int inverse, int workers)
{
    if (l->rope == 0)
        return;
    const sa_rope_job j = {.l = l,
                           .qkv = qkv,
                           .ld = ld,
                           .rows = {.batch = batch, .seq_len = seq_len, .lengths = lengths},
                           .valid = sa_valid_rows(lengths, batch, seq_len),
                           .pos0 = pos0,
                           .sign = inverse ? -1.0 : 1.0,
                           .n_chunks = workers};
    sa_run_tasks(workers, workers, sa_rope_task, (void *)&j);
}
