/* The sgemm ceiling: the bare cblas_sgemm calls that one selfattn_forward needs (the same shapes,
   the same query blocks, the same causal block skipping, the same split over threads), with
   nothing between them: no softmax, no bias, no scaling. Timing it beside the forward pass in
   the same process gives "fraction of the ceiling" as a ratio read off one run. */
#ifndef SELFATTN_BENCH_CEILING_H
#define SELFATTN_BENCH_CEILING_H

typedef struct ce_shape {
    int batch, seq_len, d_model, n_heads, n_kv_heads, head_dim, causal, threads;
} ce_shape;

typedef struct ce_ctx ce_ctx;

/* FLOPs the forward pass needs: projections plus 4 * head_dim per unmasked query-key pair per
   head (output projection included). */
double ce_forward_flops(const ce_shape *s);

ce_ctx *ce_create(const ce_shape *s); /* NULL on allocation failure */
void ce_run(ce_ctx *c);               /* one pass of the GEMM calls */
void ce_destroy(ce_ctx *c);

#endif
