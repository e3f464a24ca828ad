#include "ceiling.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "internal.h" /* sa_block_rows: the library's own query blocks */

struct ce_ctx {
    ce_shape s;
    int nq, nkv, nqkv, block, n_blocks;
    float *x, *wqkv, *wo, *qkv, *attn, *y, *scores;
    size_t ld_s;
    atomic_int next;
    int phase, n_tasks;
};

double ce_forward_flops(const ce_shape *s)
{
    const double nq = (double)s->n_heads * s->head_dim, nkv = (double)s->n_kv_heads * s->head_dim;
    const double rows = (double)s->batch * s->seq_len;
    const double L = s->seq_len;
    const double pairs = s->causal ? L * (L + 1) / 2 : L * L;
    return 2.0 * rows * s->d_model * (2 * nq + 2 * nkv) +
           4.0 * s->head_dim * pairs * s->n_heads * s->batch;
}

/* n floats uniform in [-a, a). Random rather than constant data: on the machine this was
   written on, sgemm on constant inputs ran about 4% faster than on random ones (less switching
   activity, higher clocks), which made the ceiling unfairly high. */
static float *ce_alloc(size_t n, float a)
{
    float *p = malloc((n ? n : 1) * sizeof *p);
    unsigned seed = 12345u;
    if (p)
        for (size_t i = 0; i < n; i++) {
            seed = seed * 1103515245u + 12345u;
            p[i] = a * ((float)((seed >> 8) & 0xffff) / 32768.0f - 1.0f);
        }
    return p;
}

ce_ctx *ce_create(const ce_shape *s)
{
#ifdef SELFATTN_HAVE_OPENBLAS
    /* as the library does: its own threads, single-threaded BLAS inside them */
    openblas_set_num_threads(1);
#endif
    ce_ctx *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->s = *s;
    c->nq = s->n_heads * s->head_dim;
    c->nkv = s->n_kv_heads * s->head_dim;
    c->nqkv = c->nq + 2 * c->nkv;
    c->block = sa_block_rows(s->seq_len, s->seq_len, s->causal);
    c->n_blocks = (s->seq_len + c->block - 1) / c->block;
    c->ld_s = ((size_t)s->seq_len + 15) / 16 * 16;
    const size_t rows = (size_t)s->batch * s->seq_len;
    const float a_in = 1.0f / sqrtf((float)s->d_model), a_out = 1.0f / sqrtf((float)c->nq);
    c->x = ce_alloc(rows * s->d_model, 1.0f);
    c->wqkv = ce_alloc((size_t)c->nqkv * s->d_model, a_in);
    c->wo = ce_alloc((size_t)s->d_model * c->nq, a_out);
    c->qkv = ce_alloc(rows * c->nqkv, 0.0f);
    c->attn = ce_alloc(rows * c->nq, 0.0f);
    c->y = ce_alloc(rows * s->d_model, 0.0f);
    c->scores = ce_alloc((size_t)s->threads * c->block * c->ld_s, 0.0f);
    if (!c->x || !c->wqkv || !c->wo || !c->qkv || !c->attn || !c->y || !c->scores) {
        ce_destroy(c);
        return NULL;
    }
    return c;
}

void ce_destroy(ce_ctx *c)
{
    if (!c)
        return;
    free(c->x);
    free(c->wqkv);
    free(c->wo);
    free(c->qkv);
    free(c->attn);
    free(c->y);
    free(c->scores);
    free(c);
}

static void ce_task(ce_ctx *c, int worker, int t)
{
    const ce_shape *s = &c->s;
    const size_t rows = (size_t)s->batch * s->seq_len;
    if (c->phase != 1) { /* projections: chunk t of the rows */
        const size_t r0 = rows * t / s->threads, r1 = rows * (t + 1) / s->threads;
        if (r1 == r0)
            return;
        if (c->phase == 0)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)(r1 - r0), c->nqkv,
                        s->d_model, 1.0f, c->x + r0 * s->d_model, s->d_model, c->wqkv, s->d_model,
                        0.0f, c->qkv + r0 * c->nqkv, c->nqkv);
        else
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)(r1 - r0), s->d_model, c->nq,
                        1.0f, c->attn + r0 * c->nq, c->nq, c->wo, c->nq, 0.0f,
                        c->y + r0 * s->d_model, s->d_model);
        return;
    }
    const int per_block = s->batch * s->n_heads;
    const int blk = c->n_blocks - 1 - t / per_block, b = (t % per_block) / s->n_heads;
    const int h = t % s->n_heads, hd = s->head_dim;
    const int i0 = blk * c->block;
    const int mb = s->seq_len - i0 < c->block ? s->seq_len - i0 : c->block;
    const int nk = s->causal ? i0 + mb : s->seq_len;
    const size_t kvh = (size_t)(h / (s->n_heads / s->n_kv_heads)) * hd;
    const float *q = c->qkv + ((size_t)b * s->seq_len + i0) * c->nqkv + (size_t)h * hd;
    const float *k = c->qkv + (size_t)b * s->seq_len * c->nqkv + c->nq + kvh;
    const float *v = k + c->nkv;
    float *sc = c->scores + (size_t)worker * c->block * c->ld_s;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mb, nk, hd, 1.0f, q, c->nqkv, k, c->nqkv,
                0.0f, sc, (int)c->ld_s);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, mb, hd, nk, 1.0f, sc, (int)c->ld_s, v,
                c->nqkv, 0.0f, c->attn + ((size_t)b * s->seq_len + i0) * c->nq + (size_t)h * hd,
                c->nq);
}

typedef struct ce_arg {
    ce_ctx *c;
    int worker;
} ce_arg;

static void *ce_worker(void *p)
{
    ce_arg *a = p;
    for (int t; (t = atomic_fetch_add(&a->c->next, 1)) < a->c->n_tasks;)
        ce_task(a->c, a->worker, t);
    return NULL;
}

void ce_run(ce_ctx *c)
{
    const ce_shape *s = &c->s;
    const int tasks[3] = {s->threads, s->batch * s->n_heads * c->n_blocks, s->threads};
    for (int phase = 0; phase < 3; phase++) {
        pthread_t tid[64];
        ce_arg args[64];
        c->phase = phase;
        c->n_tasks = tasks[phase];
        atomic_store(&c->next, 0);
        const int n = s->threads < 64 ? s->threads : 64;
        for (int i = 1; i < n; i++) {
            args[i].c = c;
            args[i].worker = i;
            pthread_create(&tid[i], NULL, ce_worker, &args[i]);
        }
        args[0].c = c;
        args[0].worker = 0;
        ce_worker(&args[0]);
        for (int i = 1; i < n; i++)
            pthread_join(tid[i], NULL);
    }
}
