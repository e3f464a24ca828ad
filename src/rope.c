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
    int32_t batch, seq_len;
    const int32_t *lengths;
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
    const size_t rows = (size_t)j->batch * (size_t)j->seq_len;
    const size_t r0 = rows * (size_t)task / (size_t)j->n_chunks;
    const size_t r1 = rows * (size_t)(task + 1) / (size_t)j->n_chunks;
    for (size_t r = r0; r < r1; r++) {
        const int32_t b = (int32_t)(r / (size_t)j->seq_len), t = (int32_t)(r % (size_t)j->seq_len);
        if (j->lengths != NULL && t >= j->lengths[b])
            continue;
        sa_rope_row(j->l, j->qkv + r * j->ld, (j->pos0 != NULL ? j->pos0[b] : 0) + t, j->sign);
    }
}

void sa_rope_apply(const selfattn_layer *l, float *qkv, size_t ld, int32_t batch, int32_t seq_len,
                   const int32_t *lengths, const int64_t *pos0, int inverse, int workers)
{
    if (l->rope == 0)
        return;
    sa_rope_job j = {l, qkv, ld, batch, seq_len, lengths, pos0, inverse ? -1.0 : 1.0, workers};
    sa_run_tasks(workers, workers, sa_rope_task, &j);
}
