/* Set-up shared by the benchmarks that go through the public API: a layer with random weights.
   Plain C over <selfattn/selfattn.h> only (bench_kernels.c, which links the internal archive
   instead of the shared library, does not use it). */
#ifndef SELFATTN_BENCH_UTIL_H
#define SELFATTN_BENCH_UTIL_H

#include <stddef.h>
#include <stdint.h>

#include <selfattn/selfattn.h>

/* Which biases sb_make_layer sets (the others stay unset). */
enum { SB_BIAS_Q = 1, SB_BIAS_K = 2, SB_BIAS_V = 4, SB_BIAS_O = 8, SB_BIAS_ALL = 15 };

/* The options of a benchmark layer, for a designated initializer: a field left 0 leaves the
   library's default, as 0 does for selfattn_layer_set (n_kv_heads n_heads, head_dim
   d_model / n_heads, not causal, no RoPE, threads the number of online CPUs). */
typedef struct sb_layer_opts {
    int d_model, n_heads, n_kv_heads, head_dim;
    int causal, rope, threads;
    unsigned biases;              /* SB_BIAS_* */
    int weight_dtype, kv_dtype;   /* 1.3 SELFATTN_OPT_WEIGHT_DTYPE / KV_DTYPE (0: float32) */
} sb_layer_opts;

/* A layer with W_Q, W_K, W_V, W_O and the biases o->biases names set to random values of the
   nn.Linear initialisation range, U(-1/sqrt(in), 1/sqrt(in)) (in: d_model for Q, K, V and
   n_heads * head_dim for the output projection), drawn from one fixed sequence: two layers made
   with the same options have the same weights. NULL on failure. */
selfattn_layer *sb_make_layer(const sb_layer_opts *o);

/* The BLAS of a benchmark process: sets OpenBLAS (when it is the BLAS) to one thread, so that the
   library's own workers run every call and the ceilings call BLAS as the library's workers do
   (the library leaves the count to the program), and records in the JSON context the BLAS
   (blas_info, blas_mismatch, blas_advice, blas_threads) and the cores' FMA peak
   (fma_peak_gflops_per_thread, one thread running, and fma_peak_isa; bench/fmapeak.h). Call
   first in main. */
void sb_blas_setup(void);
/* Sets OpenBLAS to n threads; returns 0 when the BLAS is not OpenBLAS (nothing set). */
int sb_blas_set_threads(int n);

/* A plain read of n 8-byte words at memory speed, returning their sum: four independent integer
   sums, which the compiler vectorises (an integer sum may be reordered; a float one may not). */
uint64_t sb_plain_read(const uint64_t *p, size_t n);

/* Evicts what the last calls left in the caches: the calling thread reads (sb_plain_read) the
   whole of a SB_EVICT_MB buffer (allocated and written on the first call, kept until exit). For
   benchmarks of memory-bound calls that must start cold, as a decoding step does in a model of
   many layers (every other layer's weights and cache pass through the caches between two steps
   of one layer). The caches reach further than the L3 on some machines: on the 2-vCPU AMD EPYC (Zen 5)
   VM a buffer read again and again ran at 38 GB/s up to 96 MB, 35 GB/s at 128 MB and 29 GB/s
   from 256 MB, and a 16 MB buffer was evicted for both CPUs by a 256 MB read on either one.
   The calling thread alone: reads on helper threads (pinned to each CPU, or not) left the next
   call's two threads on one CPU (sched_getcpu), so that a 2-thread product ran 1.9x slower. */
#define SB_EVICT_MB 256
void sb_evict_caches(void);

#endif
