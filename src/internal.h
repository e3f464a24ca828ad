/* Internal declarations shared by the library's source files. Not API. */
#ifndef SELFATTN_INTERNAL_H
#define SELFATTN_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "selfattn/selfattn.h"

#define SA_HIDDEN __attribute__((visibility("hidden")))

/* Return the status from the enclosing function when cond is false. */
#define SA_CHECK(cond, status)                                                                     \
    do {                                                                                           \
        if (!(cond))                                                                               \
            return (status);                                                                       \
    } while (0)

/* Set st and jump to the single cleanup label when cond is false. */
#define SA_CHECK_GOTO(cond, status, label)                                                         \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            st = (status);                                                                         \
            goto label;                                                                            \
        }                                                                                          \
    } while (0)

/* ---- Allocation: every allocation of the library goes through these. ---- */
SA_HIDDEN void *sa_malloc(size_t bytes);
SA_HIDDEN void *sa_calloc(size_t n, size_t size);
SA_HIDDEN void sa_free(void *p);
/* Tests only: make the n-th allocation from now fail (0 = none). Returns the previous
   countdown: > 0 means the previously armed failure has not happened. */
SA_HIDDEN long sa_test_fail_allocation(long n);
/* Tests only: make every helper-thread start fail (on = 1) or not (0). */
SA_HIDDEN void sa_test_fail_thread_starts(int on);
SA_HIDDEN int sa_thread_start_allowed(void);

/* a * b into *out without overflow; returns 0 on overflow. */
static inline int sa_mul_size(size_t a, size_t b, size_t *out)
{
    if (a != 0 && b > SIZE_MAX / a)
        return 0;
    *out = a * b;
    return 1;
}

static inline int sa_add_size(size_t a, size_t b, size_t *out)
{
    if (b > SIZE_MAX - a)
        return 0;
    *out = a + b;
    return 1;
}

/* ---- Kernels ---- */
/* Scaled-softmax numerator over one row of scores, in place:
     m = max_{i < n_valid} row[i] * scale
     row[i] = exp(row[i] * scale - m)    for i < n_valid
     row[i] = 0                          for n_valid <= i < n_total
   and returns the sum of the row[i]. Needs 1 <= n_valid <= n_total. Finite scores of any
   magnitude give finite results, the largest entry being about 1 (rows whose largest scaled
   score reaches SA_EXP_EXACT_MAX_FROM take an exact-max path); a NaN score makes the sum NaN.
   The caller normalises (divides the P*V product by the sum), so the division is done once per
   output element rather than once per score. Arguments of exp below ln(FLT_MIN) are clamped there:
   such an entry gives about 1.2e-38 instead of a smaller number, an absolute error below FLT_MIN.
 */
typedef float (*sa_f32_softmax_exp_fn)(float *row, size_t n_valid, size_t n_total, float scale);

typedef enum sa_isa { SA_ISA_SCALAR = 0, SA_ISA_AVX2 = 1, SA_ISA_AVX512 = 2 } sa_isa;

typedef struct sa_kernels {
    sa_isa isa;
    const char *softmax_name;
    sa_f32_softmax_exp_fn softmax_exp;
} sa_kernels;

SA_HIDDEN float sa_f32_softmax_exp_scalar_u1(float *row, size_t n_valid, size_t n_total,
                                             float scale);
#ifdef SELFATTN_HAVE_AVX2_KERNELS
SA_HIDDEN float sa_f32_softmax_exp_avx2_u32(float *row, size_t n_valid, size_t n_total,
                                            float scale);
#endif
#ifdef SELFATTN_HAVE_AVX512_KERNELS
SA_HIDDEN float sa_f32_softmax_exp_avx512_u64(float *row, size_t n_valid, size_t n_total,
                                              float scale);
#endif

/* The kernel table chosen for this process (CPU detection and SELFATTN_ISA, once). */
SA_HIDDEN const sa_kernels *sa_kernels_get(void);
/* The table for one ISA, or NULL when this build or this CPU cannot run it (for tests). */
SA_HIDDEN const sa_kernels *sa_kernels_for_isa(sa_isa isa);

/* ---- Attention blocking ---- */
/* Query rows per attention task. Each task multiplies its block by all the keys it can see, and
   BLAS packs those keys (and values) again for every block: bigger blocks amortise that packing
   (on the machine this was tuned on, blocks of 256 rows ran about 25% faster than 64 at
   seq_len 2048-8192), while the score block (block x kv_len floats per worker) must stay
   modest; under a causal mask the triangle inside each block is wasted work, so blocks stay at
   or under a quarter of the sequence. Kept here so that the benchmarks' sgemm ceiling uses the
   same blocks. */
#define SA_BLOCK_MAX 256
#define SA_BLOCK_MIN 32
#define SA_SCORE_BUDGET_BYTES (16u << 20)

static inline int32_t sa_block_rows(int32_t q_len, int32_t kv_len, int causal)
{
    int64_t b = (int64_t)(SA_SCORE_BUDGET_BYTES / sizeof(float)) / ((int64_t)kv_len + 16);
    if (causal && b > q_len / 4)
        b = q_len / 4;
    b = b / 16 * 16;
    if (b > SA_BLOCK_MAX)
        b = SA_BLOCK_MAX;
    if (b < SA_BLOCK_MIN)
        b = SA_BLOCK_MIN;
    return q_len < b ? q_len : (int32_t)b;
}

/* ---- The layer ---- */
enum { SA_HAVE_Q = 1u, SA_HAVE_K = 2u, SA_HAVE_V = 4u, SA_HAVE_O = 8u };

struct selfattn_layer {
    int32_t d_model;
    int32_t n_heads;
    int32_t n_kv_heads; /* resolved: never 0 */
    int32_t head_dim;   /* resolved; 0 while undetermined */
    int32_t causal;
    int32_t out_proj;
    int32_t threads_opt; /* 0 = library default */
    float scale_opt;     /* 0 = default */
    unsigned have;       /* SA_HAVE_* bits */
    int weights_set;     /* any weight or bias set: the shape is frozen */
    float *w_qkv;        /* [nq + 2 nkv][d_model], Q rows then K then V */
    float *b_qkv;        /* [nq + 2 nkv] or NULL (all zero) */
    float *w_o;          /* [d_model][nq] or NULL */
    float *b_o;          /* [d_model] or NULL (all zero) */
};

/* Number of worker threads a call on this layer uses. */
SA_HIDDEN int sa_layer_threads(const selfattn_layer *layer);

#endif /* SELFATTN_INTERNAL_H */
