/* The ISA-independent structure of the small-M product kernels, included at the end of
   f32-rowsdot-avx2.c and f32-rowsdot-avx512.c (after rowsdot-common.h and their own pieces),
   which stay separate translation units compiled with their own -m flags. The including file
   defines:
     SA_RD_ISA     the suffix of the entry points (avx2, avx512);
     SA_RD_GROUP   the accumulators of one group of dot products (M G <= SA_RD_GROUP);
     sa_qkt_group  (T, M, G, j0, d, q, ldq, k, ldk, s, lds): s[r][j0 + g] = q_r . k_{j0 + g};
     sa_pv_slices  (T, M, c, d, j0, j1, first, p, ldp, v, ldv, o, ldo): the vector columns of o
                   from c on for keys [j0, j1), returning the first column left over.
   Everything is static inline and always inlined, and T and M are constants at every call site
   (the switches below), so each entry point compiles its loops unrolled into registers. */
#ifndef SA_RD_ISA
#error "define SA_RD_ISA, SA_RD_GROUP, sa_qkt_group and sa_pv_slices before this header"
#endif

/* s[r][j] = q_r . k_j for rows r < M: keys in groups of SA_RD_GROUP / M (the last few one at a
   time). */
static inline __attribute__((always_inline)) void
sa_qkt_rows(const int T, const size_t M, size_t n, size_t d, const float *q, size_t ldq,
            const void *k, size_t ldk, float *s, size_t lds)
{
    const size_t G = SA_RD_GROUP / M;
    size_t j = 0;
    for (; j + G <= n; j += G)
        sa_qkt_group(T, M, G, j, d, q, ldq, k, ldk, s, lds);
    for (; j < n; j++)
        sa_qkt_group(T, M, 1, j, d, q, ldq, k, ldk, s, lds);
}

/* Keys in blocks of SA_PV_KEYS: the first slice of a block reads its V rows from memory in order,
   the other slices find them in L2 (a slice per pass over all keys would stream V as many strided
   passes, 64 bytes of every row at a time, which the prefetchers follow poorly). */
#define SA_PV_KEYS 256

static inline __attribute__((always_inline)) void
sa_pv_rows(const int T, const size_t M, size_t n, size_t d, const float *p, size_t ldp,
           const void *v, size_t ldv, float *o, size_t ldo)
{
    for (size_t j0 = 0; j0 < n || j0 == 0; j0 += SA_PV_KEYS) {
        const size_t j1 = n - j0 < SA_PV_KEYS ? n : j0 + SA_PV_KEYS;
        const int first = j0 == 0;
        size_t c = sa_pv_slices(T, M, 0, d, j0, j1, first, p, ldp, v, ldv, o, ldo);
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
