/* AVX2+FMA small-M products for decoding: up to 8 query rows (the query heads of one GQA group
   for one token) against n keys and values, streaming each K and V row once and packing nothing
   (BLAS packs a whole operand first, which for M <= 8 costs more memory traffic than the product
   itself). K and V may be stored in 16 bits (f16: F16C's vcvtph2ps; bf16: a shift), converted in
   registers as they stream in, so that a half-precision cache or weight matrix is read at 2 bytes
   an element. Compiled with -mavx2 -mfma -mf16c on this file only. */
#include <immintrin.h>
#include <stdint.h>

#include "kernels.h"
#include "exp-avx2.h"

/* How K or V is stored: T is a constant at every call site, so each variant compiles apart. */
enum { SA_T_F32 = 0, SA_T_F16 = 1, SA_T_BF16 = 2 };

static inline __attribute__((always_inline)) __m256 sa_ld8(const int T, const void *base, size_t i)
{
    if (T == SA_T_F32)
        return _mm256_loadu_ps((const float *)base + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + i));
    if (T == SA_T_F16)
        return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline __attribute__((always_inline)) float sa_ld1(const int T, const void *base, size_t i)
{
    if (T == SA_T_F32)
        return ((const float *)base)[i];
    const uint16_t h = ((const uint16_t *)base)[i];
    if (T == SA_T_F16)
        return _cvtsh_ss(h);
    const uint32_t x = (uint32_t)h << 16;
    float f;
    __builtin_memcpy(&f, &x, sizeof f);
    return f;
}

/* The 8 sums of a[0..7] in one vector, in order: three rounds of pairwise adds (hadd) and one
   across the two 128-bit halves, 9 instructions instead of 8 horizontal sums of ~5 each. */
static inline __attribute__((always_inline)) __m256 sa_sum8_avx2(const __m256 a[8])
{
    const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);
    /* lo holds a0..a3 as partial sums per 128-bit half, hi a4..a7: add the halves */
    return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

/* s[r][j0 + g] = q_r . k_{j0 + g} for rows r < M and G keys g < G (M G <= 8): one accumulator per
   (row, key), so up to 8 independent FMA chains whatever M (one row against one key alone would
   be bound by the FMA latency), and the M G dot products reduced together at the end (one
   horizontal sum per product made the loop compute-bound once K is read at 2 bytes). M and G
   are constants at each call site, so the loops unroll into registers. */
static inline __attribute__((always_inline)) void
sa_qkt_group(const int T, const size_t M, const size_t G, size_t j0, size_t d, const float *q,
             size_t ldq, const void *k, size_t ldk, float *s, size_t lds)
{
    const size_t d8 = d / 8 * 8;
    __m256 acc[8];
    for (size_t i = 0; i < 8; i++)
        acc[i] = _mm256_setzero_ps();
    for (size_t c = 0; c < d8; c += 8) {
        __m256 kv[8];
        for (size_t g = 0; g < G; g++)
            kv[g] = sa_ld8(T, k, (j0 + g) * ldk + c);
        for (size_t r = 0; r < M; r++) {
            const __m256 qr = _mm256_loadu_ps(q + r * ldq + c);
            for (size_t g = 0; g < G; g++)
                acc[r * G + g] = _mm256_fmadd_ps(qr, kv[g], acc[r * G + g]);
        }
    }
    float t[8];
    _mm256_storeu_ps(t, sa_sum8_avx2(acc));
    for (size_t r = 0; r < M; r++)
        for (size_t g = 0; g < G; g++) {
            float u = t[r * G + g];
            for (size_t c = d8; c < d; c++) /* fewer than 8 dimensions left */
                u += q[r * ldq + c] * sa_ld1(T, k, (j0 + g) * ldk + c);
            s[r * lds + j0 + g] = u;
        }
}

/* s[r][j] = q_r . k_j for rows r < M: keys in groups of 8 / M (the last few one at a time). */
static inline __attribute__((always_inline)) void
sa_qkt_rows(const int T, const size_t M, size_t n, size_t d, const float *q, size_t ldq,
            const void *k, size_t ldk, float *s, size_t lds)
{
    const size_t G = 8 / M;
    size_t j = 0;
    for (; j + G <= n; j += G)
        sa_qkt_group(T, M, G, j, d, q, ldq, k, ldk, s, lds);
    for (; j < n; j++)
        sa_qkt_group(T, M, 1, j, d, q, ldq, k, ldk, s, lds);
}

#define SA_QKT_SWITCH(T)                                                                           \
    switch (m) {                                                                                   \
    case 1: sa_qkt_rows(T, 1, n, d, q, ldq, k, ldk, s, lds); break;                                \
    case 2: sa_qkt_rows(T, 2, n, d, q, ldq, k, ldk, s, lds); break;                                \
    case 3: sa_qkt_rows(T, 3, n, d, q, ldq, k, ldk, s, lds); break;                                \
    case 4: sa_qkt_rows(T, 4, n, d, q, ldq, k, ldk, s, lds); break;                                \
    case 5: sa_qkt_rows(T, 5, n, d, q, ldq, k, ldk, s, lds); break;                                \
    case 6: sa_qkt_rows(T, 6, n, d, q, ldq, k, ldk, s, lds); break;                                \
    case 7: sa_qkt_rows(T, 7, n, d, q, ldq, k, ldk, s, lds); break;                                \
    default: sa_qkt_rows(T, 8, n, d, q, ldq, k, ldk, s, lds); break;                               \
    }

void sa_f32_qkt_avx2_g8(size_t m, size_t n, size_t d, const float *q, size_t ldq, const float *k,
                        size_t ldk, float *s, size_t lds)
{
    SA_QKT_SWITCH(SA_T_F32)
}

void sa_f16_qkt_avx2_g8(size_t m, size_t n, size_t d, const float *q, size_t ldq,
                        const uint16_t *k, size_t ldk, float *s, size_t lds)
{
    SA_QKT_SWITCH(SA_T_F16)
}

void sa_bf16_qkt_avx2_g8(size_t m, size_t n, size_t d, const float *q, size_t ldq,
                         const uint16_t *k, size_t ldk, float *s, size_t lds)
{
    SA_QKT_SWITCH(SA_T_BF16)
}

/* o[r][c] (+)= sum_{j0 <= j < j1} p[r][j] v_j[c] for columns [c, c1), a slice of W (8 or 16)
   columns at a time: the M x W accumulators stay in registers (loaded from o unless `first`). */
static inline __attribute__((always_inline)) size_t
sa_pv_cols(const int T, const size_t M, const size_t W, size_t c, size_t c1, size_t j0, size_t j1,
           int first, const float *p, size_t ldp, const void *v, size_t ldv, float *o, size_t ldo)
{
    for (; c + W <= c1; c += W) {
        __m256 acc[8][2];
        for (size_t r = 0; r < M; r++)
            for (size_t u = 0; u < W / 8; u++)
                acc[r][u] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(o + r * ldo + c + 8 * u);
        for (size_t j = j0; j < j1; j++) {
            const size_t vj = j * ldv + c;
            __m256 vv[2];
            for (size_t u = 0; u < W / 8; u++)
                vv[u] = sa_ld8(T, v, vj + 8 * u);
            for (size_t r = 0; r < M; r++) {
                const __m256 pj = _mm256_broadcast_ss(p + r * ldp + j);
                for (size_t u = 0; u < W / 8; u++)
                    acc[r][u] = _mm256_fmadd_ps(pj, vv[u], acc[r][u]);
            }
        }
        for (size_t r = 0; r < M; r++)
            for (size_t u = 0; u < W / 8; u++)
                _mm256_storeu_ps(o + r * ldo + c + 8 * u, acc[r][u]);
    }
    return c;
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
        size_t c = 0;
        if (M <= 4) /* 16-column slices while 2 x M accumulators fit the 16 registers */
            c = sa_pv_cols(T, M, 16, c, d, j0, j1, first, p, ldp, v, ldv, o, ldo);
        c = sa_pv_cols(T, M, 8, c, d, j0, j1, first, p, ldp, v, ldv, o, ldo);
        for (; c < d; c++) /* fewer than 8 columns left */
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

#define SA_PV_SWITCH(T)                                                                            \
    switch (m) {                                                                                   \
    case 1: sa_pv_rows(T, 1, n, d, p, ldp, v, ldv, o, ldo); break;                                 \
    case 2: sa_pv_rows(T, 2, n, d, p, ldp, v, ldv, o, ldo); break;                                 \
    case 3: sa_pv_rows(T, 3, n, d, p, ldp, v, ldv, o, ldo); break;                                 \
    case 4: sa_pv_rows(T, 4, n, d, p, ldp, v, ldv, o, ldo); break;                                 \
    case 5: sa_pv_rows(T, 5, n, d, p, ldp, v, ldv, o, ldo); break;                                 \
    case 6: sa_pv_rows(T, 6, n, d, p, ldp, v, ldv, o, ldo); break;                                 \
    case 7: sa_pv_rows(T, 7, n, d, p, ldp, v, ldv, o, ldo); break;                                 \
    default: sa_pv_rows(T, 8, n, d, p, ldp, v, ldv, o, ldo); break;                                \
    }

void sa_f32_pv_avx2_g8(size_t m, size_t n, size_t d, const float *p, size_t ldp, const float *v,
                       size_t ldv, float *o, size_t ldo)
{
    SA_PV_SWITCH(SA_T_F32)
}

void sa_f16_pv_avx2_g8(size_t m, size_t n, size_t d, const float *p, size_t ldp, const uint16_t *v,
                       size_t ldv, float *o, size_t ldo)
{
    SA_PV_SWITCH(SA_T_F16)
}

void sa_bf16_pv_avx2_g8(size_t m, size_t n, size_t d, const float *p, size_t ldp,
                        const uint16_t *v, size_t ldv, float *o, size_t ldo)
{
    SA_PV_SWITCH(SA_T_BF16)
}
