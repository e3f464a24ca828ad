/* The sgemm ceiling: the fastest formulation of the same FLOPs as bare BLAS calls that this file
   could find, independent of the library's own choices (it includes nothing from src/). Timing
   it beside the library in the same process gives "fraction of the ceiling" as a ratio read off
   one run.

   What the ceiling does, and why it is a ceiling and not a replay of the library:
   - buffers are allocated, filled with random data (not constants: sgemm on constant inputs runs
     a few percent faster) and touched once, in ce_create; nothing is allocated per run;
   - Q, K and V live in whichever layout is fastest: one fused [rows][nq+2nkv] array, separate
     token-major arrays [rows][n*hd], or per-head arrays [head][rows][hd];
   - attention per (sequence, head) is either S = Q_blk K^T then O_blk = S V over all the keys a
     query block can see (query block Bq), or key-chunked: S = Q_blk K_chunk^T then
     O_blk += S V_chunk (beta = 1) per key chunk Bk; no softmax, no scaling, no bias;
   - under a causal mask, query blocks and key chunks lying entirely in the future are skipped
     and a chunk is cut off at the block's last visible key; the tiles on the diagonal are
     computed whole (their upper triangle is wasted work, part of this formulation);
   - the formulation (layout, Bq, Bk, sgemm or sgemv for one-row projections) is chosen by a short
     calibration in ce_create (each candidate timed a few times, median, fastest kept) and cached
     per shape for the process; ce_formulation() names the choice;
   - threads: a persistent set of workers started in ce_create and parked between runs, calling
     single-threaded BLAS (openblas_set_num_threads(1)), as the library's workers do when the
     program keeps OpenBLAS at one thread (the benchmarks and selfattn-run do).
   SELFATTN_CEILING_VERBOSE=1 in the environment prints every candidate's calibration time. */
#ifndef SELFATTN_BENCH_CEILING_H
#define SELFATTN_BENCH_CEILING_H

typedef struct ce_shape {
    int batch, seq_len, d_model, n_heads, n_kv_heads, head_dim, causal, threads;
} ce_shape;

typedef struct ce_ctx ce_ctx;

/* FLOPs the forward pass needs: projections plus 4 * head_dim per unmasked query-key pair per
   head (output projection included). */
double ce_forward_flops(const ce_shape *s);

/* FLOPs of attention alone (selfattn_attend with q_len = kv_len = seq_len): 4 * head_dim per
   unmasked query-key pair per head, i.e. 4 L^2 H D per sequence, 4 H D L (L + 1) / 2 causal. */
double ce_attend_flops(const ce_shape *s);

/* The ceiling of one selfattn_forward (projections, attention, output projection). */
ce_ctx *ce_create(const ce_shape *s); /* NULL on failure */
/* The ceiling of one selfattn_attend on already projected Q, K, V (d_model is ignored). */
ce_ctx *ce_create_attend(const ce_shape *s);
void ce_run(ce_ctx *c); /* one pass of the BLAS calls, on the ceiling's own threads */
const char *ce_formulation(const ce_ctx *c); /* the formulation chosen, as short text */
void ce_destroy(ce_ctx *c);

/* Quick calibration (one run per candidate instead of a median): for smoke runs, which check
   that everything runs, not how fast. */
void ce_quick_calibration(int on);

#endif
