/* Set-up shared by the public-API benchmarks (see bench_util.h). */
#define _GNU_SOURCE /* RTLD_DEFAULT */
#include "bench_util.h"

#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fmapeak.h"
#include "shim.h"

int sb_blas_set_threads(int n)
{
    /* found at run time, as the library finds it: any CBLAS links */
    void *set = dlsym(RTLD_DEFAULT, "openblas_set_num_threads");
    if (set == NULL)
        return 0;
    void (*set_threads)(int);
    memcpy(&set_threads, &set, sizeof set);
    set_threads(n);
    return 1;
}

void sb_blas_setup(void)
{
    const char *threads = sb_blas_set_threads(1)
                              ? "1 (OpenBLAS set to one thread by the benchmark)"
                              : "as the environment sets them (not OpenBLAS)";
    sb_context("blas_info", selfattn_blas_info());
    sb_context("blas_mismatch", selfattn_blas_mismatch() ? "1" : "0");
    sb_context("blas_advice", selfattn_blas_advice());
    sb_context("blas_threads", threads);
    const char *isa = "?";
    char peak[32];
    snprintf(peak, sizeof peak, "%.1f", fp_peak_gflops_per_thread(1, 0.0, &isa));
    sb_context("fma_peak_gflops_per_thread", peak);
    sb_context("fma_peak_isa", isa);
}

uint64_t sb_plain_read(const uint64_t *p, size_t n)
{
    uint64_t a = 0, b = 0, c = 0, d = 0;
    const size_t n4 = n / 4 * 4;
    size_t i = 0;
    for (; i < n4; i += 4) {
        a += p[i];
        b += p[i + 1];
        c += p[i + 2];
        d += p[i + 3];
    }
    for (; i < n; i++)
        a += p[i];
    return a + b + c + d;
}

void sb_evict_caches(void)
{
    static uint64_t *buf;
    static volatile uint64_t sink;
    const size_t n = ((size_t)SB_EVICT_MB << 20) / sizeof(uint64_t);
    if (buf == NULL) {
        buf = malloc(n * sizeof(uint64_t));
        if (buf == NULL) {
            fprintf(stderr, "sb_evict_caches: no memory for %d MB\n", SB_EVICT_MB);
            abort();
        }
        for (size_t i = 0; i < n; i++) /* written: real pages, not the shared zero page */
            buf[i] = i;
    }
    sink += sb_plain_read(buf, n);
}

selfattn_layer *sb_make_layer(const sb_layer_opts *o)
{
    const size_t dm = (size_t)o->d_model;
    const size_t hd = (size_t)(o->head_dim ? o->head_dim : o->d_model / o->n_heads);
    const size_t nq = (size_t)o->n_heads * hd;
    const size_t nkv = (size_t)(o->n_kv_heads ? o->n_kv_heads : o->n_heads) * hd;
    /* W_Q, W_K, W_V, W_O, B_Q, B_K, B_V, B_O one after the other in one buffer */
    const size_t size[8] = {nq * dm, nkv * dm, nkv * dm, dm * nq, nq, nkv, nkv, dm};
    const float amp_in = 1.0f / sqrtf((float)dm), amp_out = 1.0f / sqrtf((float)nq);
    size_t total = 0;
    for (int i = 0; i < 8; i++)
        total += size[i];
    float *w = sb_filled(total, 1.0f, 7);
    selfattn_layer *l = NULL;
    int ok = w && selfattn_layer_create(o->d_model, o->n_heads, &l) == SELFATTN_OK &&
             selfattn_layer_set(l, SELFATTN_OPT_N_KV_HEADS, o->n_kv_heads) == SELFATTN_OK &&
             selfattn_layer_set(l, SELFATTN_OPT_HEAD_DIM, o->head_dim) == SELFATTN_OK &&
             selfattn_layer_set(l, SELFATTN_OPT_CAUSAL, o->causal) == SELFATTN_OK &&
             selfattn_layer_set(l, SELFATTN_OPT_ROPE, o->rope) == SELFATTN_OK &&
             selfattn_layer_set(l, SELFATTN_OPT_THREADS, o->threads) == SELFATTN_OK &&
             selfattn_layer_set(l, SELFATTN_OPT_WEIGHT_DTYPE, o->weight_dtype) == SELFATTN_OK &&
             selfattn_layer_set(l, SELFATTN_OPT_KV_DTYPE, o->kv_dtype) == SELFATTN_OK;
    static const selfattn_weight which[8] = {SELFATTN_W_Q, SELFATTN_W_K, SELFATTN_W_V,
                                             SELFATTN_W_O, SELFATTN_B_Q, SELFATTN_B_K,
                                             SELFATTN_B_V, SELFATTN_B_O};
    float *p = w;
    for (int i = 0; ok && i < 8; p += size[i], i++) {
        if (i >= 4 && !(o->biases & (1u << (i - 4))))
            continue;
        const float amp = which[i] == SELFATTN_W_O || which[i] == SELFATTN_B_O ? amp_out : amp_in;
        for (size_t j = 0; j < size[i]; j++)
            p[j] *= amp;
        ok = selfattn_layer_set_weight(l, which[i], p, (int64_t)size[i]) == SELFATTN_OK;
    }
    free(w);
    if (!ok) {
        selfattn_layer_destroy(l);
        return NULL;
    }
    return l;
}
