/* Rotary position embeddings of the projected Q and K heads, in place (SELFATTN_OPT_ROPE): pair d
 * of each head's leading r dimensions turns by the angle pos * theta^(-2d/r), pairs (d, d + r/2)
 * for mode 1 (rotate-half) and (2d, 2d + 1) for mode 2 (adjacent). The angle is formed in double
 * so that long positions keep their precision; the backward pass turns by the opposite angle. */
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

/* Turns pair d of every Q and K head of one row (Q heads then K heads, contiguous). */
static void sa_rope_row(const selfattn_layer *l, float *row, int64_t pos, double sign)
{
    const int32_t hd = l->head_dim, r = l->rope_dims != 0 ? l->rope_dims : hd;
    const int32_t heads = l->n_heads + l->n_kv_heads;
    const double theta = l->rope_theta != 0.0 ? l->rope_theta : 10000.0;
    for (int32_t d = 0; d < r / 2; d++) {
        const double angle = sign * (double)pos * pow(theta, -2.0 * d / r);
        const float c = (float)cos(angle), s = (float)sin(angle);
        const int32_t i1 = l->rope == 1 ? d : 2 * d, i2 = l->rope == 1 ? d + r / 2 : 2 * d + 1;
        for (int32_t h = 0; h < heads; h++) {
            float *x = row + (size_t)h * hd;
            const float a = x[i1], b = x[i2];
            x[i1] = a * c - b * s;
            x[i2] = a * s + b * c;
        }
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
        for (size_t r = r0; r < r0 + n; r++) {
            const size_t b = r / L;
            const int64_t pos = (j->pos0 != NULL ? j->pos0[b] : 0) + (int64_t)(r % L);
            sa_rope_row(j->l, j->qkv + r * j->ld, pos, j->sign);
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
