/* Softmax kernel benchmarks (internal kernels, through the static archive of the library's
 * objects):
 *   softmax/<kernel>/<n>         one row of n scores, each compiled kernel the CPU can run
 *   softmax/naive-libm/<n>       the same work as a plain loop calling libm expf
 *   softmax_in_forward/<config>  the kernel in use over exactly the score rows one forward pass
 *                                of that shape gives it (its time / the forward's time = the
 *                                softmax share of the forward; bench/report divides them)
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "shim.h"

static const size_t lengths[] = {128, 512, 2048, 8192};
#define N_LEN (sizeof lengths / sizeof lengths[0])

typedef struct kcfg {
    const sa_kernels *k; /* NULL = naive libm loop */
    size_t n;
} kcfg;

static float naive_softmax_exp(float *row, size_t n, float scale)
{
    float m = -INFINITY, sum = 0.0f;
    for (size_t i = 0; i < n; i++)
        m = fmaxf(m, row[i] * scale);
    for (size_t i = 0; i < n; i++) {
        row[i] = expf(row[i] * scale - m);
        sum += row[i];
    }
    return sum;
}

static void bm_softmax(sb_state *s, const void *arg)
{
    const kcfg *c = arg;
    float *src = sa_malloc(c->n * sizeof(float)), *row = sa_malloc(c->n * sizeof(float));
    sb_fill(src, c->n, 8.0f, 1); /* scores in [-8, 8) */
    volatile float sink = 0.0f;
    float m_sink;
    while (sb_keep_running(s)) {
        /* the kernel works in place: restore the scores first (a copy, counted in the time;
           the same for every variant) */
        memcpy(row, src, c->n * sizeof(float));
        sink += c->k ? c->k->softmax_exp(row, c->n, c->n, 0.125f, &m_sink)
                     : naive_softmax_exp(row, c->n, 0.125f);
    }
    (void)sink;
    sb_items_processed(s, sb_iterations(s) * (int64_t)c->n);
    sb_bytes_processed(s, sb_iterations(s) * (int64_t)c->n * 8); /* read + write */
    sa_free(src);
    sa_free(row);
}

/* One forward pass's score rows: per (sequence, head, block of query rows) the block's rows over
   the keys the block can see, with the library's own blocks (sa_block_rows). */
typedef struct fcfg {
    int batch, seq, heads, causal;
} fcfg;

static const fcfg fcfgs[] = {
    {1, 128, 12, 0}, {1, 128, 12, 1},  {8, 128, 12, 0},  {8, 128, 12, 1},  {1, 512, 12, 0},
    {1, 512, 12, 1}, {1, 2048, 12, 0}, {1, 2048, 12, 1}, {1, 4096, 8, 0},  {1, 4096, 8, 1},
    {1, 8192, 8, 0}, {1, 8192, 8, 1},  {1, 2048, 16, 0}, {1, 2048, 16, 1},
};

static void bm_softmax_in_forward(sb_state *s, const void *arg)
{
    const fcfg *c = arg;
    const sa_kernels *k = sa_kernels_get();
    const int block = sa_block_rows(c->seq, c->seq, c->causal, 1); /* as the forward's */
    const size_t ld = ((size_t)c->seq + 15) / 16 * 16;
    float *src = sa_malloc((size_t)block * ld * sizeof(float));
    float *S = sa_malloc((size_t)block * ld * sizeof(float));
    sb_fill(src, (size_t)block * ld, 8.0f, 1);
    int64_t elems = 0;
    float m_sink;
    while (sb_keep_running(s)) {
        elems = 0;
        for (int b = 0; b < c->batch; b++)
            for (int h = 0; h < c->heads; h++)
                for (int i0 = 0; i0 < c->seq; i0 += block) {
                    const int mb = c->seq - i0 < block ? c->seq - i0 : block;
                    const int nk = c->causal ? i0 + mb : c->seq;
                    sb_pause(s);
                    memcpy(S, src, (size_t)block * ld * sizeof(float));
                    sb_resume(s);
                    for (int r = 0; r < mb; r++) {
                        const int nv = c->causal ? i0 + r + 1 : c->seq;
                        k->softmax_exp(S + (size_t)r * ld, (size_t)nv, (size_t)nk, 0.125f,
                                       &m_sink);
                        elems += nk;
                    }
                }
    }
    sb_items_processed(s, elems * sb_iterations(s));
    sb_label(s, k->softmax_name);
    sa_free(src);
    sa_free(S);
}

int main(int argc, char **argv)
{
    const int smoke = sb_smoke(argc, argv);
    static kcfg kc[4 * N_LEN];
    static char names[4 * N_LEN][64];
    size_t n = 0;
    for (int isa = -1; isa <= SA_ISA_AVX512; isa++) {
        const sa_kernels *k = isa < 0 ? NULL : sa_kernels_for_isa((sa_isa)isa);
        if (isa >= 0 && k == NULL)
            continue;
        for (size_t j = 0; j < N_LEN; j++, n++) {
            kc[n].k = k;
            kc[n].n = lengths[j];
            snprintf(names[n], sizeof names[n], "softmax/%s/%zu",
                     k ? k->softmax_name : "naive-libm", lengths[j]);
            sb_register(names[n], bm_softmax, &kc[n], 0);
        }
    }
    static char fnames[sizeof fcfgs / sizeof fcfgs[0]][80];
    for (size_t i = 0; i < sizeof fcfgs / sizeof fcfgs[0]; i++) {
        if (smoke && fcfgs[i].seq > 512)
            continue;
        snprintf(fnames[i], sizeof fnames[i], "softmax_in_forward/%d/%d/%d/%s", fcfgs[i].batch,
                 fcfgs[i].seq, fcfgs[i].heads, fcfgs[i].causal ? "causal" : "full");
        sb_register(fnames[i], bm_softmax_in_forward, &fcfgs[i], 0);
    }
    return sb_main(argc, argv);
}
