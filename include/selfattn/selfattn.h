/*
 * libselfattn: transformer self-attention on the CPU behind a stable C ABI.
 *
 * This header is the whole public API and its documentation. Anything not declared here is not
 * API. It compiles as C99 and as C++11.
 *
 * Conventions (fixed, ABI version 1)
 * ----------------------------------
 * - All tensors are dense, row-major float32 arrays owned by the caller. The library never keeps
 *   a pointer to caller memory after a call returns: weights are copied into the layer.
 * - Activations x and y are [batch][seq_len][d_model].
 * - Weights use the PyTorch nn.Linear layout [out_features][in_features], i.e. y = x * W^T + b:
 *     W_Q  [n_heads * head_dim][d_model]       B_Q  [n_heads * head_dim]
 *     W_K  [n_kv_heads * head_dim][d_model]    B_K  [n_kv_heads * head_dim]
 *     W_V  [n_kv_heads * head_dim][d_model]    B_V  [n_kv_heads * head_dim]
 *     W_O  [d_model][n_heads * head_dim]       B_O  [d_model]
 *   (1.3: with SELFATTN_OPT_V_HEAD_DIM, W_V, B_V and W_O take the value heads' width dv in place
 *   of head_dim.)
 *     W_QKV [3 * d_model][d_model]: PyTorch's packed in_proj_weight (Q rows, then K, then V);
 *       only valid when n_kv_heads == n_heads and n_heads * head_dim == d_model. B_QKV likewise
 *       ([3 * d_model]). Setting W_QKV is the same as setting W_Q, W_K and W_V.
 * - Head h of Q is columns [h * head_dim, (h + 1) * head_dim) of the projected Q. With grouped-query
 *   attention (n_kv_heads < n_heads) query head h uses key/value head h / (n_heads / n_kv_heads),
 *   as PyTorch's repeat_interleave and Llama do.
 * - scores = Q K^T * scale, scale defaulting to 1 / sqrt(head_dim); weights = softmax over each
 *   row of the unmasked keys; output = weights * V per head, then the output projection.
 * - Masking: a key position is masked when it is causal-future or at or past its sequence's
 *   length. Causal masking is aligned to the bottom right: with q_len queries over kv_len keys,
 *   query i may see keys j <= i + kv_len - q_len (1.3: SELFATTN_OPT_CAUSAL 2 and 3 choose the
 *   top-left and the per-sequence bottom-right alignments). A query row whose keys are all
 *   masked outputs zeros, never NaN. In selfattn_forward, rows of padding (position >=
 *   lengths[b]) are written as zeros and are not computed.
 * - Errors: every function that can fail returns a selfattn_status. On any status other than
 *   SELFATTN_OK the call has written nothing to caller outputs and changed no handle.
 *
 * Threading
 * ---------
 * Functions that take no handle are thread-safe. A layer handle may be used by any number of
 * threads at once through selfattn_forward and selfattn_attend (they only read it) once its
 * options and weights are no longer being changed; selfattn_layer_set, _set_scale, _set_weight
 * and _destroy need exclusive access to the handle. Each forward/attend call uses up to
 * SELFATTN_OPT_THREADS worker threads: the calling thread and helpers from one pool per process,
 * started on first need, reused by every later call on every layer, and sleeping (not spinning)
 * between calls. A process that forks may call the library in the child, which starts a pool of
 * its own. Each layer keeps the workspaces of its calls between calls (one per call running at
 * once), so a call in steady state allocates nothing; they are freed by selfattn_layer_destroy.
 *
 * The BLAS's threads (1.3): the library never changes the BLAS's thread count (a process-wide
 * setting of OpenBLAS that NumPy and others share). Each call reads it instead: when the linked
 * OpenBLAS runs more than one thread (openblas_get_num_threads() > 1) the call runs on one worker
 * and lets OpenBLAS parallelise its matrix products; with a single-threaded BLAS (or a BLAS that
 * is not OpenBLAS) it uses SELFATTN_OPT_THREADS workers. The second is faster: on a 2-core AMD
 * EPYC (Zen 5, OpenBLAS 0.3.21 Haswell kernels), a forward at seq_len 2048, d_model 768, 12 heads
 * took 122 ms with 2 workers and OpenBLAS at 1 thread, 166 ms with 1 worker and OpenBLAS at 2
 * threads (and 298 ms when both ran 2 threads, which the library now avoids). For full speed make
 * the BLAS single-threaded in the program: OPENBLAS_NUM_THREADS=1 in the environment, or
 * openblas_set_num_threads(1), or in Python threadpoolctl's
 * threadpool_limits(1, user_api="blas"). The environment variable SELFATTN_BLAS_THREADS=1 (read
 * once) has the library do it itself: it sets OpenBLAS to one thread, process-wide, at its first
 * call, a global change that every other user of that OpenBLAS in the process sees (the 1.2
 * behaviour, then the default). SELFATTN_BLAS_THREADS=keep, now the default, changes nothing.
 */
#ifndef SELFATTN_SELFATTN_H
#define SELFATTN_SELFATTN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Export macro --------------------------------------------------------------------------- */
#if defined(_WIN32) && defined(SELFATTN_BUILDING)
#define SELFATTN_API __declspec(dllexport)
#elif defined(__GNUC__) && __GNUC__ >= 4
#define SELFATTN_API __attribute__((visibility("default")))
#else
#define SELFATTN_API
#endif

/* ---- Version -------------------------------------------------------------------------------- */
/* Same major version = ABI compatible. A changed signature gets a new name (_v2), never an edit. */
#define SELFATTN_VERSION_MAJOR 1
#define SELFATTN_VERSION_MINOR 3
#define SELFATTN_VERSION_PATCH 0
#define SELFATTN_VERSION_NUMBER \
    (SELFATTN_VERSION_MAJOR * 10000 + SELFATTN_VERSION_MINOR * 100 + SELFATTN_VERSION_PATCH)
#define SELFATTN_VERSION_STR2_(x) #x
#define SELFATTN_VERSION_STR_(a, b, c) \
    SELFATTN_VERSION_STR2_(a) "." SELFATTN_VERSION_STR2_(b) "." SELFATTN_VERSION_STR2_(c)
#define SELFATTN_VERSION_STRING \
    SELFATTN_VERSION_STR_(SELFATTN_VERSION_MAJOR, SELFATTN_VERSION_MINOR, SELFATTN_VERSION_PATCH)

/* Version of the library actually loaded, as SELFATTN_VERSION_NUMBER / _STRING; compare with the
   macros to detect a header/library mismatch. Thread-safe; the string is static. */
SELFATTN_API uint32_t selfattn_version_number(void);
SELFATTN_API const char *selfattn_version_string(void);

/* ---- Status codes --------------------------------------------------------------------------- */
/* Values are fixed forever. New codes may be added in later minor versions: treat any non-zero
   value as failure and use selfattn_status_string for text. */
typedef enum selfattn_status {
    SELFATTN_OK = 0,
    SELFATTN_ERR_NULL = 1,        /* a required pointer argument is NULL */
    SELFATTN_ERR_INVALID = 2,     /* a dimension, option, value or element count is out of range
                                     or inconsistent */
    SELFATTN_ERR_NOMEM = 3,       /* memory could not be allocated */
    SELFATTN_ERR_OVERFLOW = 4,    /* a size computed from the arguments does not fit */
    SELFATTN_ERR_STATE = 5,       /* not allowed in the handle's current state (e.g. a required
                                     weight not set) */
    SELFATTN_ERR_UNSUPPORTED = 6  /* a valid request this build cannot serve */
} selfattn_status;

/* Static, NUL-terminated English text for a status; never NULL (unknown codes give a generic
   text). Thread-safe. */
SELFATTN_API const char *selfattn_status_string(selfattn_status s);

/* ---- The layer handle ----------------------------------------------------------------------- */
/* Opaque: one multi-head self-attention layer (its shape, options and a copy of its weights). */
typedef struct selfattn_layer selfattn_layer;

/* Options, set with selfattn_layer_set. Value 0 means the default where a default exists.
   Values are fixed forever; new options may be added. */
typedef enum selfattn_option {
    SELFATTN_OPT_N_KV_HEADS = 1, /* key/value heads, default n_heads; must divide n_heads. */
    SELFATTN_OPT_HEAD_DIM = 2,   /* default d_model / n_heads (which must then divide exactly).
                                    selfattn_layer_get reports 0 while it is undetermined. */
    SELFATTN_OPT_CAUSAL = 3,     /* 0 (default): none. 1: causal, aligned to the bottom right:
                                    query i sees keys j <= i + kv_len - q_len. 1.3: 2: top-left,
                                    query i sees keys j <= i (PyTorch SDPA is_causal; ONNX
                                    Attention is_causal without past); 3: bottom-right of each
                                    sequence's valid keys, query i of sequence b sees keys
                                    j <= i + kv_lengths[b] - q_len (FlashAttention's varlen rule;
                                    ONNX with nonpad_kv_seqlen), which is 1 without kv_lengths.
                                    Positions for ALiBi and windows follow the alignment (query i
                                    at position i for 2, i + kv_lengths[b] - q_len for 3); with
                                    q_len == kv_len and no lengths the three agree.
                                    selfattn_attend* and selfattn_attend_backward honour all four
                                    values; the calls whose queries have known positions
                                    (selfattn_forward*, selfattn_forward_cached,
                                    selfattn_backward*, the train state) treat 2 and 3 as 1. A
                                    row that sees no key outputs zeros (lse -INFINITY, dq 0). */
    SELFATTN_OPT_OUT_PROJ = 4,   /* 0 or 1, default 1: apply W_O. With 0 the attention output is y
                                    itself and n_heads * head_dim (n_heads * dv with
                                    SELFATTN_OPT_V_HEAD_DIM) must equal d_model. */
    SELFATTN_OPT_THREADS = 5,    /* worker threads one call may use, the caller's included;
                                    0 = library default (the number of online CPUs, at most 64,
                                    counted once per process, at the first call).
                                    A call uses one while OpenBLAS runs several threads itself:
                                    set the BLAS to 1 thread for full speed ("The BLAS's threads"
                                    at the top of this header). */
    /* 1.1. Positions: in selfattn_forward* token t of a sequence is at position t; in
       selfattn_attend* query i is at position kv_len - q_len + i (with CAUSAL 2: i, with 3:
       kv_lengths[b] - q_len + i) and key j at position j. None of
       these changes a weight's shape: they may be set whenever the layer is not in use. */
    SELFATTN_OPT_WINDOW = 6,     /* 0 = none (default). w >= 1: the query at position p sees the
                                    keys at positions j with p - w < j <= p when causal,
                                    |p - j| < w otherwise (Mistral, Longformer-style local
                                    attention). Keys outside are masked and their blocks never
                                    computed: a call costs O(L w), not O(L^2). */
    SELFATTN_OPT_ROPE = 7,       /* rotary position embedding of Q and K after projection and
                                    bias, in selfattn_forward* (selfattn_attend* takes q and k
                                    already rotated): 0 = none (default), 1 = rotate-half pairs
                                    (d, d + r/2) (GPT-NeoX, Hugging Face Llama), 2 = adjacent
                                    pairs (2d, 2d + 1) (GPT-J, Meta's Llama reference). Pair d at
                                    position p turns by the angle p * theta^(-2d/r). */
    SELFATTN_OPT_ROPE_DIMS = 8,  /* r: the leading dimensions of each head that rotate; default
                                    (0) head_dim; even, <= head_dim (partial rotary). A value that
                                    cannot fit the current head_dim (odd, > head_dim) is
                                    SELFATTN_ERR_INVALID at set time, and so is a later HEAD_DIM
                                    that would break it. */
    SELFATTN_OPT_ALIBI = 9,      /* 0 or 1: add -slope_h * (p - j) to the score of query position
                                    p and key position j (|p - j| when not causal), with the
                                    standard ALiBi slopes for n_heads (Press et al. 2022, as in
                                    BLOOM and MPT: for n not a power of two, the slopes of the
                                    largest power of two below n, then every other slope of the
                                    next power of two). */
    /* 1.3. Half-precision storage (see selfattn_dtype below). */
    SELFATTN_OPT_WEIGHT_DTYPE = 10, /* how the layer stores W_Q, W_K, W_V, W_O (and W_QKV): a
                                    selfattn_dtype, default F32. Biases always stay float32. Like
                                    the shape options it is SELFATTN_ERR_STATE once any weight is
                                    set. */
    SELFATTN_OPT_KV_DTYPE = 11,     /* how a key/value cache created from now on stores K and V: a
                                    selfattn_dtype, default F32. A cache keeps the dtype it was
                                    created with; a call on it while the layer's value differs is
                                    SELFATTN_ERR_STATE (setting it back makes the cache usable
                                    again), like the other options a cache records. */
    /* 1.3. A value head size of its own. */
    SELFATTN_OPT_V_HEAD_DIM = 12    /* dv, the width of each value head; default (0) head_dim
                                    (selfattn_layer_get reports the effective dv). A shape option:
                                    SELFATTN_ERR_STATE once any weight is set. With dv != head_dim
                                    W_V is [n_kv_heads * dv][d_model], B_V [n_kv_heads * dv], W_O
                                    [d_model][n_heads * dv], and W_QKV/B_QKV are
                                    SELFATTN_ERR_INVALID; with OUT_PROJ 0, n_heads * dv must equal
                                    d_model (the HEAD_DIM, V_HEAD_DIM or OUT_PROJ setting that
                                    would break it is SELFATTN_ERR_INVALID and changes nothing).
                                    In selfattn_attend* v (and dv) are
                                    [batch][kv_len][n_kv_heads * dv], out (and dout)
                                    [batch][q_len][n_heads * dv]; a cache stores V at width dv
                                    (and records it, as it records KV_DTYPE). Q and K keep
                                    head_dim; RoPE never touches V. */
} selfattn_option;

/* Storage types (1.3). Whatever the storage, arithmetic stays float32 (products, softmax,
   accumulation) and activations (x, y, q, k, v, out, gradients) are float32. A stored value is
   rounded once, to nearest with ties to even; the results equal, within float32 rounding, what
   the float32 library computes with every stored weight, K and V replaced by its rounded value
   (in selfattn_forward_cached that includes the tokens of the same call: attention reads every
   K and V as the cache stores it). Gradients with half-precision weights are the gradients at
   the rounded weights. A layer's weight matrices then take 2 bytes an element, a cache 2 bytes
   per stored K or V element; no float32 copy of the whole weights or cache outlives a call
   (calls convert blocks of them, in the layer's workspace, just before their products). */
typedef enum selfattn_dtype {
    SELFATTN_DTYPE_F32 = 0,
    SELFATTN_DTYPE_F16 = 1, /* IEEE 754 binary16 */
    SELFATTN_DTYPE_BF16 = 2 /* bfloat16: the upper 16 bits of a binary32 */
} selfattn_dtype;

/* Real-valued options (1.1), set with selfattn_layer_set_float. Values are fixed forever. */
typedef enum selfattn_float_option {
    SELFATTN_FOPT_SCALE = 1,      /* as selfattn_layer_set_scale; 0 = 1/sqrt(head_dim) */
    SELFATTN_FOPT_ROPE_THETA = 2, /* rotary base theta, > 0; default (0) 10000 */
    SELFATTN_FOPT_SOFTCAP = 3     /* 0 = off (default); c > 0: score -> c * tanh(score / c)
                                     (Gemma 2) */
} selfattn_float_option;

/* Weights and biases, set with selfattn_layer_set_weight. Values are fixed forever. */
typedef enum selfattn_weight {
    SELFATTN_W_Q = 1,
    SELFATTN_W_K = 2,
    SELFATTN_W_V = 3,
    SELFATTN_W_O = 4,
    SELFATTN_B_Q = 5,
    SELFATTN_B_K = 6,
    SELFATTN_B_V = 7,
    SELFATTN_B_O = 8,
    SELFATTN_W_QKV = 9,
    SELFATTN_B_QKV = 10
} selfattn_weight;

/* Create a layer of model width d_model with n_heads query heads (both >= 1). All options take
   their defaults and no weight is set. On success *out owns a new handle, to be released with
   selfattn_layer_destroy; on failure *out is left unchanged.
   Returns SELFATTN_ERR_NULL (out NULL), SELFATTN_ERR_INVALID (d_model or n_heads < 1),
   SELFATTN_ERR_OVERFLOW (the weight sizes implied do not fit: row counts must fit an int32 for
   CBLAS), SELFATTN_ERR_NOMEM. d_model need not be divisible by n_heads if SELFATTN_OPT_HEAD_DIM is set
   before any weight. */
SELFATTN_API selfattn_status selfattn_layer_create(int32_t d_model, int32_t n_heads,
                                                   selfattn_layer **out);

/* Release a layer and its weights. NULL is a no-op. Not to be called while another thread uses
   the layer. */
SELFATTN_API void selfattn_layer_destroy(selfattn_layer *layer);

/* Set an integer option (see selfattn_option for values and defaults).
   Returns SELFATTN_ERR_NULL (layer NULL), SELFATTN_ERR_INVALID (unknown option, value out of
   range, or a value inconsistent with the other options: e.g. N_KV_HEADS not dividing n_heads,
   HEAD_DIM * n_heads != d_model while OUT_PROJ is 0), SELFATTN_ERR_OVERFLOW (the weight sizes the
   value implies do not fit), SELFATTN_ERR_STATE (N_KV_HEADS, HEAD_DIM or OUT_PROJ after any weight
   was set). Requires exclusive access to the layer. */
SELFATTN_API selfattn_status selfattn_layer_set(selfattn_layer *layer, selfattn_option opt,
                                                int64_t value);

/* Read the effective value of an option into *value (defaults resolved: N_KV_HEADS gives n_heads
   when unset, THREADS gives the thread count a call will use).
   Returns SELFATTN_ERR_NULL or SELFATTN_ERR_INVALID (unknown option); *value is unchanged then. */
SELFATTN_API selfattn_status selfattn_layer_get(const selfattn_layer *layer, selfattn_option opt,
                                                int64_t *value);

/* Set the score scale; 0 restores the default 1 / sqrt(head_dim). Any finite value is accepted
   (NaN and infinities give SELFATTN_ERR_INVALID). Requires exclusive access to the layer. */
SELFATTN_API selfattn_status selfattn_layer_set_scale(selfattn_layer *layer, float scale);

/* Copy a weight or bias into the layer. count is the number of floats at data and must equal the
   exact element count of that weight for the layer's current shape (see the table above).
   Setting a weight fixes the shape: N_KV_HEADS, HEAD_DIM and OUT_PROJ can no longer change.
   A bias never set is zero. Setting the same weight again replaces it. With a half-precision
   WEIGHT_DTYPE (1.3) a weight is rounded to it (see selfattn_layer_set_weight_typed: a finite
   weight that would round to infinity is SELFATTN_ERR_INVALID).
   Returns SELFATTN_ERR_NULL (layer or data NULL), SELFATTN_ERR_INVALID (unknown weight, wrong
   count, W_QKV/B_QKV on a layer where they are not valid, W_O/B_O with OUT_PROJ 0),
   SELFATTN_ERR_STATE (head_dim undetermined: d_model not divisible by n_heads and HEAD_DIM unset),
   SELFATTN_ERR_OVERFLOW, SELFATTN_ERR_NOMEM. Requires exclusive access to the layer. */
SELFATTN_API selfattn_status selfattn_layer_set_weight(selfattn_layer *layer,
                                                       selfattn_weight which, const float *data,
                                                       int64_t count);

/* As selfattn_layer_set_weight (1.3), with the data given in dtype: float for F32, uint16_t bit
   patterns for F16 and BF16 (count elements either way). Weights are converted once to the
   layer's WEIGHT_DTYPE (given in that dtype already, they are stored bit for bit), biases to
   float32. A finite weight whose rounded value is infinite (F16: |w| >= 65520; BF16: beyond
   FLT_MAX after rounding) is SELFATTN_ERR_INVALID and nothing changes; a weight that is already
   +-inf or NaN is stored as such, as in float32. Returns what selfattn_layer_set_weight returns,
   and SELFATTN_ERR_INVALID for a dtype out of range. Requires exclusive access to the layer. */
SELFATTN_API selfattn_status selfattn_layer_set_weight_typed(selfattn_layer *layer,
                                                             selfattn_weight which,
                                                             selfattn_dtype dtype,
                                                             const void *data, int64_t count);

/* Set a real-valued option (1.1). Non-finite or out-of-range values (a negative softcap, a
   theta <= 0 other than 0) give SELFATTN_ERR_INVALID and change nothing; 0 restores the default.
   SCALE and SOFTCAP are kept as float: a value beyond FLT_MAX, or a non-zero value so small that
   it would round to the float 0 (which means "default" or "off"), is SELFATTN_ERR_INVALID too;
   any other value is stored rounded to float, and selfattn_layer_get_float reads that back.
   Returns SELFATTN_ERR_NULL (layer NULL), SELFATTN_ERR_INVALID (unknown option or bad value).
   Requires exclusive access to the layer. */
SELFATTN_API selfattn_status selfattn_layer_set_float(selfattn_layer *layer,
                                                      selfattn_float_option opt, double value);

/* Read the effective value of a real-valued option (1.1): the default resolved, e.g.
   1/sqrt(head_dim) for SCALE (0 while head_dim is undetermined), 10000 for ROPE_THETA, 0 for an
   unset SOFTCAP. Returns SELFATTN_ERR_NULL or SELFATTN_ERR_INVALID (unknown option); *value is
   unchanged then. Thread-safe on a layer that is not being modified. */
SELFATTN_API selfattn_status selfattn_layer_get_float(const selfattn_layer *layer,
                                                      selfattn_float_option opt, double *value);

/* Bounds of an option's accepted values (inclusive; 0 = default is always accepted as well).
   Returns SELFATTN_ERR_NULL or SELFATTN_ERR_INVALID (unknown option). Thread-safe. */
SELFATTN_API selfattn_status selfattn_option_bounds(selfattn_option opt, int64_t *lower,
                                                    int64_t *upper);

/* ---- Running -------------------------------------------------------------------------------- */
/* The whole layer: y = attention(x W_Q^T + b_Q, x W_K^T + b_K, x W_V^T + b_V) W_O^T + b_O.
   x and y are [batch][seq_len][d_model] and must not overlap. lengths is NULL (every sequence is
   seq_len long) or [batch] valid lengths, each in [0, seq_len]: keys at or past lengths[b] are
   masked and query rows at or past it are written as zeros.
   Needs W_Q, W_K, W_V (or W_QKV) and, with OUT_PROJ on, W_O; otherwise SELFATTN_ERR_STATE.
   Returns SELFATTN_ERR_NULL (layer, x or y NULL), SELFATTN_ERR_INVALID (batch or seq_len < 1, a
   length out of range), SELFATTN_ERR_OVERFLOW (sizes do not fit in memory's address range),
   SELFATTN_ERR_NOMEM, SELFATTN_ERR_STATE. Thread-safe on a layer that is not being modified;
   uses up to SELFATTN_OPT_THREADS threads.
   Non-finite and extreme values: positions at or past lengths[b] are never read, so anything
   there (NaN included) has no effect. A NaN or infinity at a valid position of sequence b (or in
   a weight) makes the output rows of sequence b that attend to it non-finite, and possibly other
   rows of sequence b (a masked weight is a zero, and 0 * NaN is NaN, as in PyTorch's math
   attention); it never reaches another sequence of the batch. Finite scores of any magnitude
   saturate the softmax (the largest score's key gets all the weight) without overflow; values
   whose projections or scaled scores overflow float32 give undefined (non-NaN-safe) rows of
   their own sequence only. */
SELFATTN_API selfattn_status selfattn_forward(const selfattn_layer *layer, int32_t batch,
                                              int32_t seq_len, const float *x,
                                              const int32_t *lengths, float *y);

/* Attention alone on already projected tensors (for callers that project themselves, e.g. with
   rotary embeddings). Uses the layer's n_heads, n_kv_heads, head_dim, causal flag and scale
   (and, 1.1, its WINDOW, ALIBI and SOFTCAP; not ROPE: q and k come rotated); needs no weights. q and out are [batch][q_len][n_heads * head_dim]; k and v are
   [batch][kv_len][n_kv_heads * head_dim] (1.3, SELFATTN_OPT_V_HEAD_DIM: v is
   [batch][kv_len][n_kv_heads * dv], out [batch][q_len][n_heads * dv]); out must not overlap the
   inputs. kv_lengths is NULL or
   [batch] valid key counts in [0, kv_len]. Every query row is computed (rows that can see no key
   are zeros). Returns SELFATTN_ERR_NULL, SELFATTN_ERR_INVALID (sizes < 1, a length out of range),
   SELFATTN_ERR_STATE (head_dim undetermined), SELFATTN_ERR_OVERFLOW, SELFATTN_ERR_NOMEM.
   Thread-safe on a layer that is not being modified. Non-finite values behave as in
   selfattn_forward: keys at or past kv_lengths[b] are never read. */
SELFATTN_API selfattn_status selfattn_attend(const selfattn_layer *layer, int32_t batch,
                                             int32_t q_len, int32_t kv_len, const float *q,
                                             const float *k, const float *v,
                                             const int32_t *kv_lengths, float *out);

/* ---- Incremental decoding (1.1): the key/value cache ---------------------------------------- */
/* Opaque: keys and values (after bias and RoPE) of n_seqs sequences for one causal layer, so that
   generation runs each new token against every earlier position without recomputing them.
   Memory, allocated once at create: n_seqs * capacity * n_kv_heads * (head_dim + dv) (K and V;
   dv = head_dim unless SELFATTN_OPT_V_HEAD_DIM)
   * 4 bytes (2 bytes with a half-precision KV_DTYPE, recorded at create), twice that with SELFATTN_OPT_WINDOW set (a window's cache is a ring whose rows are
   stored twice, so that any run of positions is contiguous). A cache is used by one call at a
   time; distinct caches of one layer may run concurrently (each with the layer, which they only
   read). */
typedef struct selfattn_cache selfattn_cache;

/* A cache for n_seqs sequences (>= 1) of up to capacity positions (>= 1) each, bound to layer,
   which must outlive it. The layer's WINDOW, ROPE, ROPE_DIMS, ROPE_THETA, N_KV_HEADS, HEAD_DIM and KV_DTYPE
   are recorded: a later change makes selfattn_forward_cached answer SELFATTN_ERR_STATE. On success
   *out owns the cache (selfattn_cache_destroy); on failure *out is unchanged.
   Returns SELFATTN_ERR_NULL, SELFATTN_ERR_INVALID (n_seqs or capacity < 1), SELFATTN_ERR_STATE
   (head_dim undetermined), SELFATTN_ERR_OVERFLOW, SELFATTN_ERR_NOMEM. Thread-safe on a layer that
   is not being modified. */
SELFATTN_API selfattn_status selfattn_cache_create(const selfattn_layer *layer, int32_t n_seqs,
                                                   int32_t capacity, selfattn_cache **out);

/* Release a cache. NULL is a no-op. */
SELFATTN_API void selfattn_cache_destroy(selfattn_cache *cache);

/* Positions processed so far for sequence seq (the length before the next call; with a window it
   keeps counting past capacity). Returns SELFATTN_ERR_NULL or SELFATTN_ERR_INVALID (seq out of
   range). */
SELFATTN_API selfattn_status selfattn_cache_length(const selfattn_cache *cache, int32_t seq,
                                                   int32_t *length);

/* Forget the positions at and after length for sequence seq (-1: every sequence; those already
   that short are left as they are); length 0 resets (speculative decoding roll-back, a new prompt
   in the same slot). Returns SELFATTN_ERR_NULL, SELFATTN_ERR_INVALID (seq out of range, length < 0,
   length above the sequence's current one, or with a window a length whose next token would need
   positions the ring already overwrote); nothing changes then. */
SELFATTN_API selfattn_status selfattn_cache_truncate(selfattn_cache *cache, int32_t seq,
                                                     int32_t length);

/* Make sequence dst a copy of sequence src (beam search, parallel sampling from one prompt); src ==
   dst is a no-op. Returns SELFATTN_ERR_NULL or SELFATTN_ERR_INVALID (a sequence out of range). */
SELFATTN_API selfattn_status selfattn_cache_copy(selfattn_cache *cache, int32_t src_seq,
                                                 int32_t dst_seq);

/* Run the layer on new tokens appended to each sequence of the cache: x and y are
   [n_seqs][max_new][d_model]; sequence s takes n_new[s] tokens (n_new NULL: max_new each; 0 leaves
   s untouched); rows past n_new[s] are not read and are written as zeros. Token t of sequence s is
   at position cache_length(s) + t. K and V of the new tokens (after bias and RoPE) are appended
   to the cache, and each new token attends to every position before it and to itself (within the
   window, if any). A prompt of n tokens followed by m single-token steps gives the same rows,
   within float rounding, as one causal selfattn_forward over the n + m tokens.
   Returns SELFATTN_ERR_NULL, SELFATTN_ERR_INVALID (cache of another layer; max_new < 1; an
   n_new[s] outside [0, max_new]; without a window, a sequence that would pass capacity; with
   window w, min(L, w - 1) + n_new[s] > capacity for a sequence of length L),
   SELFATTN_ERR_STATE (the layer is not causal, lacks a required weight, or changed WINDOW, ROPE,
   ROPE_DIMS, ROPE_THETA, N_KV_HEADS, HEAD_DIM or KV_DTYPE since the cache was created),
   SELFATTN_ERR_OVERFLOW, SELFATTN_ERR_NOMEM. Any failure leaves the cache and y exactly as they
   were. One call at a time per cache. */
SELFATTN_API selfattn_status selfattn_forward_cached(const selfattn_layer *layer,
                                                     selfattn_cache *cache, int32_t max_new,
                                                     const float *x, const int32_t *n_new,
                                                     float *y);

/* ---- Extras (1.1): additive bias, attention weights, log-sum-exp ----------------------------- */
/* The score of query i and key j is, in this order: s = (q_i . k_j) * scale; with a softcap c,
   s = c * tanh(s / c); plus the ALiBi term; plus attn_bias; keys masked by causality, window or
   length are removed; the softmax runs over what is left. */
typedef struct selfattn_extras {
    uint32_t struct_size;   /* sizeof(selfattn_extras) as the caller compiled it: set it first */
    const float *attn_bias; /* NULL, or an additive bias on the scores: element (b, h, i, j) is
                               attn_bias[b*bias_stride_batch + h*bias_stride_head
                                         + i*bias_stride_row + j];
                               strides in floats, >= 0, 0 broadcasts that dimension; -INFINITY
                               masks the key (PyTorch's float attn_mask, ONNX's attention_bias).
                               Every element of the view [batch][n_heads][q_len][kv_len] must be
                               readable; elements at keys masked by causality, window or length
                               have no effect (NaN there included). */
    int64_t bias_stride_batch;
    int64_t bias_stride_head;
    int64_t bias_stride_row;
    float *weights;         /* NULL, or out: [batch][n_heads][q_len][kv_len] softmax
                               probabilities; 0 at masked keys; rows of padding and rows that see
                               no key all 0 (PyTorch's need_weights, per head) */
    float *lse;             /* NULL, or out: [batch][n_heads][q_len] natural log of each row's
                               softmax denominator over its visible keys (of the final scores);
                               -INFINITY for a row that sees no key. With it, attentions over
                               separate key chunks merge exactly: lse = log(e^lse_a + e^lse_b),
                               out = e^(lse_a - lse) out_a + e^(lse_b - lse) out_b. */
    /* 1.3: scores out (a 1.1 caller's struct_size ends before them: they read as NULL and 0) */
    float *scores;          /* NULL, or out: [batch][n_heads][q_len][kv_len], the scores before
                               the softmax at the stage below. Stages 0 and 1 hold the value at
                               every key j < kv_lengths[b] (kv_len without lengths), whether
                               causality or a window masks it or not (as ONNX Attention's
                               qk_matmul_output modes 0 and 1): asking for them computes the
                               blocks that those masks would skip. Keys at or past kv_lengths[b]
                               (which are never read) are -INFINITY at every stage, and so are
                               all keys of a padding row in selfattn_forward_ex. */
    int32_t scores_stage;   /* 0: (q . k) * scale; 1: after the softcap (= 0 without one); 2: the
                               final score (after ALiBi and attn_bias), -INFINITY at keys masked
                               by causality, window or length: the value the softmax takes (ONNX's
                               mode 2, plus ALiBi). Any other value is SELFATTN_ERR_INVALID;
                               checked only when scores is not NULL. */
} selfattn_extras;

/* selfattn_forward with extras (NULL = none: then it is selfattn_forward). A struct_size below
   the 1.1 struct's size (offsetof(selfattn_extras, scores)) is SELFATTN_ERR_INVALID; one that
   ends at a field boundary reads the fields it covers and takes the others as NULL / 0 (a 1.1
   caller's struct stays valid), one that ends inside a field is SELFATTN_ERR_INVALID; a larger
   one than this header's sizeof (a newer caller) is accepted when every byte past this header's
   struct is zero, else SELFATTN_ERR_UNSUPPORTED.
   Negative bias strides and a scores_stage out of range (with scores) are SELFATTN_ERR_INVALID;
   a bias view, weights, lse or scores too large to address is SELFATTN_ERR_OVERFLOW. A query row that sees no key (all masked, by any mechanism)
   has a zero attention output, so its y row is b_O (zero without an output projection), its
   weights row all 0 and its lse -INFINITY. Rows of padding (position >= lengths[b]) have y = 0,
   weights 0 and lse -INFINITY. weights, lse and scores must not overlap x, y or each other.
   Otherwise as selfattn_forward. */
SELFATTN_API selfattn_status selfattn_forward_ex(const selfattn_layer *layer, int32_t batch,
                                                 int32_t seq_len, const float *x,
                                                 const int32_t *lengths,
                                                 const selfattn_extras *extras, float *y);

/* selfattn_attend with extras (NULL = none: then it is selfattn_attend); the extras as in
   selfattn_forward_ex. Rows that see no key have out 0, weights 0 and lse -INFINITY. */
SELFATTN_API selfattn_status selfattn_attend_ex(const selfattn_layer *layer, int32_t batch,
                                                int32_t q_len, int32_t kv_len, const float *q,
                                                const float *k, const float *v,
                                                const int32_t *kv_lengths,
                                                const selfattn_extras *extras, float *out);

/* ---- Gradients (1.1): the backward pass ------------------------------------------------------ */
/* Where selfattn_backward writes the weight and bias gradients. Each pointer is NULL (not wanted)
   or an output of the same layout and element count as the weight it belongs to (see the table
   at the top: grad W_Q is [n_heads * head_dim][d_model], grad W_O [d_model][n_heads * head_dim],
   and so on). A layer whose weights were set through W_QKV / B_QKV gets W_Q, W_K, W_V (B_Q, B_K,
   B_V) gradients all the same: PyTorch's in_proj_weight gradient is w_q, w_k and w_v stacked.
   With the output projection off, w_o and b_o must be NULL. */
typedef struct selfattn_grads {
    uint32_t struct_size; /* sizeof(selfattn_grads) as the caller compiled it: set it first */
    float *w_q, *w_k, *w_v, *w_o;
    float *b_q, *b_k, *b_v, *b_o;
} selfattn_grads;

/* Gradients of selfattn_forward. Given dy = dL/dy for the call
   selfattn_forward(layer, batch, seq_len, x, lengths, y), writes dx = dL/dx
   ([batch][seq_len][d_model]; NULL: not wanted) and the weight and bias gradients that grads asks
   for (grads NULL: none). Outputs are overwritten, not accumulated (add them up yourself across
   micro-batches). Every layer option is honoured: heads, GQA, causal, window, RoPE (modes 1 and
   2, ROPE_DIMS, ROPE_THETA), ALiBi, softcap, scale, output projection on or off, and lengths.
   The forward pass is recomputed inside (nothing is kept from the forward call; see
   selfattn_backward_train for a backward that reads kept activations), and memory stays
   linear in seq_len: scores are recomputed block by block, never an L x L matrix (FlashAttention-2
   style). Rows of padding (position >= lengths[b]) get dx = 0 and their dy is not read (NaN there
   has no effect); they contribute nothing to the weight gradients. A weight gradient is a sum
   over the batch's valid rows.
   x and dy are [batch][seq_len][d_model]; no output may overlap an input or another output.
   grads->struct_size below this header's sizeof(selfattn_grads) is SELFATTN_ERR_INVALID; a larger
   one (a newer caller) is accepted when every byte past this header's struct is zero, else
   SELFATTN_ERR_UNSUPPORTED.
   Returns SELFATTN_ERR_NULL (layer, x or dy NULL), SELFATTN_ERR_INVALID (batch or seq_len < 1, a
   length out of range, grads->w_o or grads->b_o non-NULL with OUT_PROJ 0, struct_size too small),
   SELFATTN_ERR_STATE (a weight selfattn_forward needs is not set), SELFATTN_ERR_OVERFLOW,
   SELFATTN_ERR_NOMEM, SELFATTN_ERR_UNSUPPORTED; on any of them nothing was written. The results
   do not depend on the thread count (bit for bit). Thread-safe on a layer that is not being
   modified; uses up to SELFATTN_OPT_THREADS threads; a call in steady state allocates nothing
   (the workspace is kept by the layer, as for selfattn_forward). Non-finite values spread as in
   selfattn_forward: never to another sequence of the batch, but into every weight gradient. */
SELFATTN_API selfattn_status selfattn_backward(const selfattn_layer *layer, int32_t batch,
                                               int32_t seq_len, const float *x,
                                               const int32_t *lengths, const float *dy, float *dx,
                                               const selfattn_grads *grads);

/* Gradients of selfattn_attend. Given dout = dL/dout for the call
   selfattn_attend(layer, batch, q_len, kv_len, q, k, v, kv_lengths, out), writes dq (the shape of
   q), dk and dv (the shape of k and v), each NULL when not wanted; asking for fewer skips their
   work. With grouped-query attention dk and dv sum over the query heads that share a key/value
   head. Rows of dk and dv at or past kv_lengths[b] are written as zeros (and those of keys that no
   query sees), and so are the dq rows of queries that see no key. Uses the layer's heads,
   head_dim, causal flag, window, ALiBi, softcap and scale (q and k are taken as already rotated:
   ROPE is not applied); needs no weights. Outputs are overwritten, not accumulated, and may not
   overlap the inputs or each other. Returns SELFATTN_ERR_NULL (layer, q, k, v or dout NULL),
   SELFATTN_ERR_INVALID (sizes < 1, a length out of range), SELFATTN_ERR_STATE (head_dim
   undetermined), SELFATTN_ERR_OVERFLOW, SELFATTN_ERR_NOMEM; nothing is written then. Memory is
   linear in the lengths; results do not depend on the thread count. Thread-safe on a layer that
   is not being modified. */
SELFATTN_API selfattn_status selfattn_attend_backward(const selfattn_layer *layer, int32_t batch,
                                                      int32_t q_len, int32_t kv_len,
                                                      const float *q, const float *k,
                                                      const float *v, const int32_t *kv_lengths,
                                                      const float *dout, float *dq, float *dk,
                                                      float *dv);

/* ---- Training with kept activations (1.2: this library's addition to the 1.1 contract) ------ */
/* selfattn_backward recomputes the forward (nothing is kept between calls). A training loop that
   can spare the memory keeps the forward's activations instead, in a buffer it owns (the "train
   state"): selfattn_forward_train is selfattn_forward that also fills it, and
   selfattn_backward_train is selfattn_backward that reads it instead of recomputing the input
   projection and the attention's forward (about 2.3x the forward's work rather than 3.2x at
   seq_len 2048, d_model 768). Results match selfattn_backward to rounding.

   The state holds Q, K and V after RoPE, the attention output before the output projection and
   each row's log-sum-exp: (batch * seq_len * (n_heads + n_kv_heads) * (head_dim + dv) +
   batch * n_heads * seq_len) floats plus a small header, linear in seq_len (dv: the value
   heads' width, head_dim unless SELFATTN_OPT_V_HEAD_DIM).
   selfattn_train_state_size gives its bytes for (batch, seq_len) on this layer in *bytes;
   returns SELFATTN_ERR_NULL, SELFATTN_ERR_INVALID (batch or seq_len < 1), SELFATTN_ERR_STATE
   (head_dim undetermined), SELFATTN_ERR_OVERFLOW. */
SELFATTN_API selfattn_status selfattn_train_state_size(const selfattn_layer *layer, int32_t batch,
                                                       int32_t seq_len, size_t *bytes);

/* selfattn_forward(layer, batch, seq_len, x, lengths, y), and fills state (state_bytes long, at
   least selfattn_train_state_size, 8-byte aligned: malloc's is) for selfattn_backward_train of
   the same call. Returns what selfattn_forward returns, and SELFATTN_ERR_NULL (state NULL),
   SELFATTN_ERR_INVALID (state_bytes too small or state misaligned); on any error neither y nor
   state was written. A state serves one call at a time; it holds no pointer and no resource (free
   or reuse it freely). */
SELFATTN_API selfattn_status selfattn_forward_train(const selfattn_layer *layer, int32_t batch,
                                                    int32_t seq_len, const float *x,
                                                    const int32_t *lengths, float *y, void *state,
                                                    size_t state_bytes);

/* selfattn_backward(layer, batch, seq_len, x, lengths, dy, dx, grads) for the call whose
   selfattn_forward_train filled state: x must be the same values (it is read for the weight
   gradients, and not checked against the state). Returns what selfattn_backward returns, and
   SELFATTN_ERR_NULL (state NULL), SELFATTN_ERR_INVALID (state_bytes too small or state
   misaligned), SELFATTN_ERR_STATE (state was not filled by selfattn_forward_train on this layer
   with this batch, seq_len and lengths (both NULL or equal), or the layer's weights or options
   other than THREADS changed since); nothing is written then. The state is only read: one state
   may serve several backward calls (different dy). Results do not depend on the thread count. */
SELFATTN_API selfattn_status selfattn_backward_train(const selfattn_layer *layer, int32_t batch,
                                                     int32_t seq_len, const float *x,
                                                     const int32_t *lengths, const float *dy,
                                                     float *dx, const selfattn_grads *grads,
                                                     const void *state, size_t state_bytes);

/* ---- Introspection -------------------------------------------------------------------------- */
/* What went wrong (1.3): a message for the most recent call on this thread that returned a status
   other than SELFATTN_OK, naming the function, the check that failed and the argument with its
   values, e.g. "selfattn_forward: lengths[0] = 9 exceeds seq_len 8". Empty ("") when no call on
   this thread has failed yet; a successful call leaves it unchanged. Thread-local: valid until
   this thread's next selfattn_ call; never NULL. (Calls that return no status, and
   selfattn_status_string, never change it.) */
SELFATTN_API const char *selfattn_last_error(void);

/* The BLAS in use (1.3): static text naming the CBLAS the library runs on and, for OpenBLAS, its
   version, threading and the core (kernel family) it chose, e.g. "OpenBLAS 0.3.21 pthread, core
   Haswell"; for a BLAS that is not OpenBLAS e.g. "CBLAS (not OpenBLAS; version unknown)". Found
   once, at the first call of any of these three functions. Never NULL; thread-safe. */
SELFATTN_API const char *selfattn_blas_info(void);

/* libselfattn's addition beyond the API (1.3): 1 when OpenBLAS runs a core whose instruction set
   is below the CPU's, else 0 (also for a BLAS that is not OpenBLAS, a core name it does not know,
   or a CPU that is not x86). Such a core is much slower: OpenBLAS 0.3.21 does not know some newer
   CPUs and falls back to its SSE3 (Prescott) kernels, about 4x slower than its AVX-512 ones.
   Counted as below: SSE cores (Prescott, Core2, Penryn, Dunnington, Nehalem, Atom, Nano, Opteron,
   Barcelona, Bobcat, ...) on an AVX or AVX2 CPU, AVX cores (Sandybridge, Bulldozer, Piledriver,
   Steamroller, Excavator) on an AVX2 CPU, and those and Haswell or Zen on an AVX-512F CPU.
   Thread-safe. */
SELFATTN_API int selfattn_blas_mismatch(void);

/* libselfattn's addition beyond the API (1.3): when selfattn_blas_mismatch() is 1, static text
   naming the fix, e.g. "OpenBLAS runs its Prescott kernels (SSE) on a CPU with AVX-512F: set
   OPENBLAS_CORETYPE=SkylakeX in the environment before the program starts" (Cooperlake on CPUs
   with AVX512-BF16, Haswell on AVX2 CPUs), adding "(this environment already sets
   OPENBLAS_CORETYPE=...)" when the environment chose the core. "" otherwise. OpenBLAS reads
   OPENBLAS_CORETYPE when it is loaded: the fix applies to the next process. Never NULL;
   thread-safe. */
SELFATTN_API const char *selfattn_blas_advice(void);

/* Name of the softmax kernel this process uses, e.g. "f32-softmax-avx512-u64", chosen once from
   the CPU's features. The environment variable SELFATTN_ISA=scalar|avx2|avx512, read once, forces
   a lower kernel family (a higher one than the CPU supports is ignored). Static string; thread-safe. */
SELFATTN_API const char *selfattn_kernel_name(void);

#ifdef __cplusplus
}
#endif

#endif /* SELFATTN_SELFATTN_H */
