/* The ISA-independent structure of the small-M product kernels, included at the end of
   f32-rowsdot-avx2.c and f32-rowsdot-avx512.c (after rowsdot-common.h and their own pieces),
   which stay separate translation units compiled with their own -m flags. The including file
   defines:
     SA_RD_ISA     the suffix of the entry points (avx2, avx512);
     SA_RD_GROUP   the accumulators of one group of dot products (M G <= SA_RD_GROUP);
     SA_RD_KEYS(M, L) the keys G of a group for M rows, with rows of K longer than
                   SA_QKT_SHORT_ROW_BYTES when L (a projection's weights) or not (a cache's K);
     SA_RD_VEC     floats a vector;
     SA_RD_PACK(M) whether q's rows are packed for M rows (below);
     sa_qkt_group  (T, M, G, j0, c0, c1, add, pf, qp, q, ldq, k, ldk, s, lds): s[r][j0 + g] (+)=
                   the part of q_r . k_{j0 + g} over dimensions [c0, c1) (added when `add`), K
                   prefetched into L1 pf elements ahead when pf != 0; with SA_RD_PACK(M), q_r's
                   vector at dimension c (c - c0 a multiple of SA_RD_VEC) is at
                   qp + (c - c0) M + r SA_RD_VEC;
     sa_pv_slices  (T, M, c, d, j0, j1, first, p, ldp, v, ldv, o, ldo): the vector columns of o
                   from c on for keys [j0, j1), returning the first column left over.
   Everything is static inline and always inlined, and T and M are constants at every call site
   (the switches below), so each entry point compiles its loops unrolled into registers. */
#ifndef SA_RD_ISA
#error "define SA_RD_ISA, SA_RD_GROUP, sa_qkt_group and sa_pv_slices before this header"
#endif

/* The bytes of q a chunk of dimensions (the chunk of every row stays in L1 while the keys of a
   block stream past it, their partial sums in s staying in L1 too), the bytes of K a block of
   keys, how far ahead the rows of K are prefetched (at least a group of keys, at least
   SA_QKT_PREFETCH_BYTES), and the longest row that is prefetched whatever M.
   - Before, 8 rows of 2048 dimensions against a weight matrix (the projections of 8 decoded
     tokens) held 64 KB of q, more than L1, re-read from L2 for each group of keys: that product
     read the weights at about a third of the 1-row speed; now at about 0.6 of it.
   - With 3 or more rows each byte of K meets more arithmetic, the core runs fewer bytes ahead,
     and the hardware prefetcher alone left the memory idle part of the time: 4 rows of 128
     dimensions (a GQA group's scores over the cache) read K 1.1-1.4 times faster with it.
   - Short rows (a cache's K, 128 dimensions in 16 bits) read 1.3-1.8 times faster with it
     whatever M, except one key a group (AVX2 with 5-8 rows, bound by its FMAs: about 20%
     slower with it); long rows with 1 or 2 rows ran up to 30% slower with it (the hardware
     kept up with their 16 streams, now 8, and the prefetches only took load slots).
   All measured on AMD EPYC (Zen 5), one thread, medians of 30-40 calls, K out of cache. */
#define SA_QKT_Q_BYTES (16 * 1024)
#define SA_QKT_BLOCK_BYTES (256 * 1024)
#define SA_QKT_PREFETCH_BYTES (8 * 1024)
#define SA_QKT_SHORT_ROW_BYTES 1024

/* q's chunk [c0, c1) packed for SA_RD_PACK(M): the vectors of its M rows at each step of
   SA_RD_VEC dimensions side by side, [(c - c0) / VEC][M][VEC], so that a group's loads of q come
   from one pointer (8 row pointers took GPRs the loop then reloaded from the stack on every step)
   and from consecutive lines. The dimensions past the last whole vector stay where they are
   (sa_qkt_finish reads them from q). */
static inline __attribute__((always_inline)) void sa_qkt_pack(const size_t M, size_t c0, size_t c1,
                                                              const float *q, size_t ldq, float *qp)
{
    const size_t cv = c0 + (c1 - c0) / SA_RD_VEC * SA_RD_VEC;
    for (size_t c = c0; c < cv; c += SA_RD_VEC)
        for (size_t r = 0; r < M; r++)
            __builtin_memcpy(qp + (c - c0) * M + r * SA_RD_VEC, q + r * ldq + c,
                             SA_RD_VEC * sizeof(float));
}

/* Keys [j0, j1) over dimensions [c0, c1) in groups of G (the last few one at a time), the groups
   before jm (jm - j0 a multiple of the group) prefetching K pf elements ahead. `add` is a constant
   at every call site, and so is pf = 0 in the loops after jm, so that neither costs a test in the
   inner loop (either one as a run-time flag slowed the 1-row product by 10-25%). */
static inline __attribute__((always_inline)) void
sa_qkt_chunk(const int T, const size_t M, const size_t G, const int add, size_t j0, size_t jm,
             size_t j1, size_t c0, size_t c1, size_t pf, const float *qp, const float *q,
             size_t ldq, const void *k, size_t ldk, float *s, size_t lds)
{
    size_t j = j0;
    for (; j < jm; j += G)
        sa_qkt_group(T, M, G, j, c0, c1, add, pf, qp, q, ldq, k, ldk, s, lds);
    for (; j + G <= j1; j += G)
        sa_qkt_group(T, M, G, j, c0, c1, add, 0, qp, q, ldq, k, ldk, s, lds);
    for (; j < j1; j++)
        sa_qkt_group(T, M, 1, j, c0, c1, add, 0, qp, q, ldq, k, ldk, s, lds);
}

/* s[r][j] = q_r . k_j for rows r < M in groups of G keys: keys in blocks, each block's
   dimensions in chunks. */
static inline __attribute__((always_inline)) void
sa_qkt_rows_g(const int T, const size_t M, const size_t G, size_t n, size_t d, const float *q,
              size_t ldq, const void *k, size_t ldk, float *s, size_t lds)
{
    const size_t row_bytes = ldk * SA_T_SIZE(T);
    float qbuf[SA_QKT_Q_BYTES / sizeof(float)] __attribute__((aligned(64))); /* SA_RD_PACK(M) */
    const int prefetch = row_bytes <= SA_QKT_SHORT_ROW_BYTES ? G > 1 : M >= 3;
    size_t kc = SA_QKT_Q_BYTES / (M * sizeof(float)) / 64 * 64;
    kc = kc < 64 ? 64 : kc;
    size_t kb = SA_QKT_BLOCK_BYTES / (d * SA_T_SIZE(T) + 1) / G * G;
    kb = kb < G ? G : kb;
    /* One block without prefetches, and with q packed: a packed chunk serves every key of the
       call, so that q is packed once per chunk rather than once per block and chunk. With blocks
       of 30 keys, 8 rows of 2048 dimensions repacked their 16 KB chunk for every 240 KB of the
       weights: hot in L2 (96 keys, one thread) that product ran at 105-113 GFLOP/s against
       125-136 with one block in the same runs, and decoding 8 sequences (d_model 2048, 2
       threads, weights and a 1024-position cache from memory) took 0.943 and 0.958 of the time,
       0.958 with the weights alone (AMD EPYC, Zen 5; the two libraries alternating step by step
       in one process). */
    if (!prefetch || SA_RD_PACK(M))
        kb = n;
    size_t pf_rows = SA_QKT_PREFETCH_BYTES / (row_bytes + 1);
    pf_rows = pf_rows < G ? G : pf_rows > kb ? kb : pf_rows;
    /* Every key whose row pf_rows on exists is prefetched, the last block's too. Prefetching
       only while the next block was whole left the last block without: half the keys of a
       1024-position float32 cache, all of a 1024-position f16 one (one block of 1020 keys and a
       rest). 4 rows over 1024 x 128 from memory, one thread: float32 26.7 and 25.9 us against
       30.2 and 29.6; f16 12.1 and 12.0 against 19.6 and 19.7; f16 over 4096 keys 48.0 and 49.3
       against 55.3 and 58.3 (AMD EPYC, Zen 5, medians of 101). */
    const size_t jp = prefetch && n > pf_rows ? n - pf_rows : 0;
    for (size_t j0 = 0; j0 < n; j0 += kb) {
        const size_t j1 = n - j0 < kb ? n : j0 + kb;
        /* [j0, jm) with prefetches, in whole groups; [jm, j1) without */
        size_t jm = jp < j0 ? j0 : jp > j1 ? j1 : jp;
        jm = j0 + (jm - j0) / G * G;
        const size_t pf = pf_rows * ldk;
        for (size_t c0 = 0; c0 < d || c0 == 0; c0 += kc) {
            const size_t c1 = d - c0 < kc ? d : c0 + kc;
            /* M kc floats fit qbuf (one block: each chunk is packed once) */
            if (SA_RD_PACK(M))
                sa_qkt_pack(M, c0, c1, q, ldq, qbuf);
            if (c0 == 0) /* the first chunk stores, the others add */
                sa_qkt_chunk(T, M, G, 0, j0, jm, j1, c0, c1, pf, qbuf, q, ldq, k, ldk, s, lds);
            else
                sa_qkt_chunk(T, M, G, 1, j0, jm, j1, c0, c1, pf, qbuf, q, ldq, k, ldk, s, lds);
            if (c1 >= d)
                break;
        }
    }
}

/* s[r][j] = q_r . k_j for rows r < M, in the group size for the length of K's rows (both sizes
   compile only where they differ). */
static inline __attribute__((always_inline)) void
sa_qkt_rows(const int T, const size_t M, size_t n, size_t d, const float *q, size_t ldq,
            const void *k, size_t ldk, float *s, size_t lds)
{
    if (SA_RD_KEYS(M, 1) != SA_RD_KEYS(M, 0) && ldk * SA_T_SIZE(T) > SA_QKT_SHORT_ROW_BYTES)
        sa_qkt_rows_g(T, M, SA_RD_KEYS(M, 1), n, d, q, ldq, k, ldk, s, lds);
    else
        sa_qkt_rows_g(T, M, SA_RD_KEYS(M, 0), n, d, q, ldq, k, ldk, s, lds);
}

/* Keys in blocks of SA_PV_KEYS: the first slice of a block reads its V rows from memory in order,
   the other slices find them in L2 (a slice per pass over all keys would stream V as many strided
   passes, 64 bytes of every row at a time, which the prefetchers follow poorly). */
#define SA_PV_KEYS 256

static inline __attribute__((always_inline)) void
sa_pv_rows(const int T, const size_t M, size_t n, size_t d, const float *p, size_t ldp,
           const void *v, size_t ldv, float *o, size_t ldo)
{
    const size_t row_bytes = ldv * SA_T_SIZE(T);
    const size_t pf_rows =
        row_bytes >= SA_QKT_PREFETCH_BYTES ? 1 : SA_QKT_PREFETCH_BYTES / (row_bytes + 1) + 1;
    const size_t jp = n > pf_rows ? n - pf_rows : 0; /* keys whose row pf_rows on exists */
    const size_t pf = pf_rows * ldv;
    for (size_t j0 = 0; j0 < n || j0 == 0; j0 += SA_PV_KEYS) {
        const size_t j1 = n - j0 < SA_PV_KEYS ? n : j0 + SA_PV_KEYS;
        const int first = j0 == 0;
        size_t c = sa_pv_slices(T, M, 0, d, j0, j1, first, pf, jp, p, ldp, v, ldv, o, ldo);
        for (; c < d; c++) /* fewer columns left than a vector */
            for (size_t r = 0; r < M; r++) {
                float t = first ? 0.0f : o[r * ldo + c];
                for (size_t j = j0; j < j1; j++)
                    t += p[r * ldp + j] * sa_ld1(T, v, j * ldv + c);
                o[r * ldo + c] = t;
            }
        if (j1 >= n)
            break;
    }
}

/* The entry points: m (1..8) and the element type become constants. */
#define SA_RD_SWITCH(rows, ...)                                                                    \
    switch (m) {                                                                                   \
    case 1: rows(T, 1, __VA_ARGS__); break;                                                        \
    case 2: rows(T, 2, __VA_ARGS__); break;                                                        \
    case 3: rows(T, 3, __VA_ARGS__); break;                                                        \
    case 4: rows(T, 4, __VA_ARGS__); break;                                                        \
    case 5: rows(T, 5, __VA_ARGS__); break;                                                        \
    case 6: rows(T, 6, __VA_ARGS__); break;                                                        \
    case 7: rows(T, 7, __VA_ARGS__); break;                                                        \
    default: rows(T, 8, __VA_ARGS__); break;                                                       \
    }

static inline __attribute__((always_inline)) void sa_qkt_entry(const int T, size_t m, size_t n,
                                                               size_t d, const float *q,
                                                               size_t ldq, const void *k,
                                                               size_t ldk, float *s, size_t lds)
{
    SA_RD_SWITCH(sa_qkt_rows, n, d, q, ldq, k, ldk, s, lds)
}

static inline __attribute__((always_inline)) void sa_pv_entry(const int T, size_t m, size_t n,
                                                              size_t d, const float *p, size_t ldp,
                                                              const void *v, size_t ldv, float *o,
                                                              size_t ldo)
{
    SA_RD_SWITCH(sa_pv_rows, n, d, p, ldp, v, ldv, o, ldo)
}

#define SA_RD_CAT_(a, b, c) a##b##c
#define SA_RD_CAT(a, b, c) SA_RD_CAT_(a, b, c) /* b expanded first */
#define SA_RD_NAME(a, c) SA_RD_CAT(a, SA_RD_ISA, c)

void SA_RD_NAME(sa_f32_qkt_, _g8)(size_t m, size_t n, size_t d, const float *q, size_t ldq,
                                  const float *k, size_t ldk, float *s, size_t lds)
{
    sa_qkt_entry(SA_T_F32, m, n, d, q, ldq, k, ldk, s, lds);
}

void SA_RD_NAME(sa_f16_qkt_, _g8)(size_t m, size_t n, size_t d, const float *q, size_t ldq,
                                  const uint16_t *k, size_t ldk, float *s, size_t lds)
{
    sa_qkt_entry(SA_T_F16, m, n, d, q, ldq, k, ldk, s, lds);
}

void SA_RD_NAME(sa_bf16_qkt_, _g8)(size_t m, size_t n, size_t d, const float *q, size_t ldq,
                                   const uint16_t *k, size_t ldk, float *s, size_t lds)
{
    sa_qkt_entry(SA_T_BF16, m, n, d, q, ldq, k, ldk, s, lds);
}

void SA_RD_NAME(sa_f32_pv_, _g8)(size_t m, size_t n, size_t d, const float *p, size_t ldp,
                                 const float *v, size_t ldv, float *o, size_t ldo)
{
    sa_pv_entry(SA_T_F32, m, n, d, p, ldp, v, ldv, o, ldo);
}

void SA_RD_NAME(sa_f16_pv_, _g8)(size_t m, size_t n, size_t d, const float *p, size_t ldp,
                                 const uint16_t *v, size_t ldv, float *o, size_t ldo)
{
    sa_pv_entry(SA_T_F16, m, n, d, p, ldp, v, ldv, o, ldo);
}

void SA_RD_NAME(sa_bf16_pv_, _g8)(size_t m, size_t n, size_t d, const float *p, size_t ldp,
                                  const uint16_t *v, size_t ldv, float *o, size_t ldo)
{
    sa_pv_entry(SA_T_BF16, m, n, d, p, ldp, v, ldv, o, ldo);
}
