/* AVX2+FMA small-M products for decoding: up to 8 query rows (the query heads of one GQA group
   for one token) against n keys and values, streaming each K and V row once and packing nothing
   (BLAS packs a whole operand first, which for M <= 8 costs more memory traffic than the product
   itself). K and V may be stored in 16 bits (f16: F16C's vcvtph2ps; bf16: a shift), converted in
   registers as they stream in, so that a half-precision cache or weight matrix is read at 2 bytes
   an element. Compiled with -mavx2 -mfma -mf16c on this file only. */
#include <immintrin.h>
#include <stdint.h>

#include "exp-avx2.h"
#include "kernels.h"
#include "rowsdot-common.h"

#define SA_RD_ISA avx2
#define SA_RD_VEC 8
#define SA_RD_PACK(M) 0            /* one key a group for 5-8 rows: q is read where it is */
#define SA_RD_GROUP 8              /* accumulators of a group of dot products */
#define SA_RD_KEYS(M, L) (8 / (M)) /* keys a group for M rows, whatever the rows' length */

static inline __attribute__((always_inline)) __m256 sa_ld8(const int T, const void *base, size_t i)
{
    if (T == SA_T_F32)
        return _mm256_loadu_ps((const float *)base + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + i));
    if (T == SA_T_F16)
        return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
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

/* The bf16 group for one or two rows (one or two decoded tokens against bf16 weights, or one or
   two query heads against a bf16 cache), 16 dimensions a step: f32-rowsdot-avx512.c's
   sa_qkt_group_bf16_pairs with 8-float vectors. q's even and odd dimensions are gathered by a
   shuffle within 128-bit lanes and a 64-bit permute across them. */
static inline __attribute__((always_inline)) void
sa_qkt_group_bf16_pairs(const size_t M, const size_t G, size_t j0, size_t c0, size_t c1, int add,
                        size_t pf, const float *q, size_t ldq, const void *k, size_t ldk, float *s,
                        size_t lds)
{
    const uint16_t *k16 = (const uint16_t *)k;
    const size_t cv = c0 + (c1 - c0) / 16 * 16;
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    __m256 acc[8];
    for (size_t i = 0; i < 8; i++)
        acc[i] = _mm256_setzero_ps();
    for (size_t c = c0; c < cv; c += 16) {
        __m256 qe[2], qo[2];
        for (size_t r = 0; r < M; r++) {
            const __m256 a = _mm256_loadu_ps(q + r * ldq + c),
                         b = _mm256_loadu_ps(q + r * ldq + c + 8);
            /* [a0 a2 b0 b2 | a4 a6 b4 b6], then the middle 64-bit pairs swapped */
            qe[r] = _mm256_castpd_ps(
                _mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xd8));
            qo[r] = _mm256_castpd_ps(
                _mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xdd)), 0xd8));
        }
        if (pf != 0)
            for (size_t g = 0; g < G; g++)
                sa_prefetch(SA_T_BF16, k, (j0 + g) * ldk + c + pf, 16);
        for (size_t g = 0; g < G; g++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(k16 + (j0 + g) * ldk + c));
            const __m256 ke = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
            const __m256 ko = _mm256_castsi256_ps(_mm256_and_si256(w, high));
            for (size_t r = 0; r < M; r++) {
                acc[r * G + g] = _mm256_fmadd_ps(qe[r], ke, acc[r * G + g]);
                acc[r * G + g] = _mm256_fmadd_ps(qo[r], ko, acc[r * G + g]);
            }
        }
    }
    float t[8];
    _mm256_storeu_ps(t, sa_sum8_avx2(acc));
    sa_qkt_finish(SA_T_BF16, M, G, j0, cv, c1, add, t, q, ldq, k, ldk, s, lds);
}

/* s[r][j0 + g] (+)= q_r . k_{j0 + g} over dimensions [c0, c1) for rows r < M and G keys g < G
   (M G <= 8): one accumulator per (row, key), so up to 8 independent FMA chains whatever M (one
   row against one key alone would be bound by the FMA latency), and the M G dot products
   reduced together at the end (one horizontal sum per product made the loop compute-bound once
   K is read at 2 bytes). M and G are constants at each call site, so the loops unroll into
   registers. */
static inline __attribute__((always_inline)) void
sa_qkt_group(const int T, const size_t M, const size_t G, size_t j0, size_t c0, size_t c1, int add,
             size_t pf, const float *qp, const float *q, size_t ldq, const void *k, size_t ldk,
             float *s, size_t lds)
{
    (void)qp; /* never packed (SA_RD_PACK) */
    if (T == SA_T_BF16 && M <= 2) {
        sa_qkt_group_bf16_pairs(M, G, j0, c0, c1, add, pf, q, ldq, k, ldk, s, lds);
        return;
    }
    const size_t cv = c0 + (c1 - c0) / 8 * 8;
    __m256 acc[8];
    for (size_t i = 0; i < 8; i++)
        acc[i] = _mm256_setzero_ps();
    for (size_t c = c0; c < cv; c += 8) {
        __m256 kv[8];
        for (size_t g = 0; g < G; g++)
            kv[g] = sa_ld8(T, k, (j0 + g) * ldk + c);
        if (pf != 0) /* rows ahead (rowsdot-template.h) */
            for (size_t g = 0; g < G; g++)
                sa_prefetch(T, k, (j0 + g) * ldk + c + pf, 8);
        for (size_t r = 0; r < M; r++) {
            __m256 qr = _mm256_loadu_ps(q + r * ldq + c);
            if (G > 1) /* one load of q_r for the G keys (GCC would fold one into each FMA) */
                __asm__("" : "+x"(qr));
            for (size_t g = 0; g < G; g++)
                acc[r * G + g] = _mm256_fmadd_ps(qr, kv[g], acc[r * G + g]);
        }
    }
    float t[8];
    _mm256_storeu_ps(t, sa_sum8_avx2(acc));
    /* and the fewer than 8 dimensions left */
    sa_qkt_finish(T, M, G, j0, cv, c1, add, t, q, ldq, k, ldk, s, lds);
}

/* o[r][c] (+)= sum_{j0 <= j < j1} p[r][j] v_j[c] for columns [c, c1), a slice of W (8 or 16)
   columns at a time: the M x W accumulators stay in registers (loaded from o unless `first`). */
static inline __attribute__((always_inline)) size_t
sa_pv_cols(const int T, const size_t M, const size_t W, size_t c, size_t c1, size_t j0, size_t j1,
           int first, size_t pf, size_t jp, const float *p, size_t ldp, const void *v, size_t ldv,
           float *o, size_t ldo)
{
    for (; c + W <= c1; c += W) {
        __m256 acc[8][2];
        for (size_t r = 0; r < M; r++)
            for (size_t u = 0; u < W / 8; u++)
                acc[r][u] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(o + r * ldo + c + 8 * u);
        for (size_t j = j0; j < j1; j++) {
            const size_t vj = j * ldv + c;
            if (pf != 0 && j < jp) /* the slice's bytes of a row ahead (rowsdot-template.h) */
                sa_prefetch(T, v, vj + pf, W);
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

/* The columns of o from c on in slices of whole vectors, for keys [j0, j1); returns the first
   of the fewer than 8 columns left. */
static inline __attribute__((always_inline)) size_t
sa_pv_slices(const int T, const size_t M, size_t c, size_t d, size_t j0, size_t j1, int first,
             size_t pf, size_t jp, const float *p, size_t ldp, const void *v, size_t ldv, float *o,
             size_t ldo)
{
    if (M <= 4) /* 16-column slices while 2 x M accumulators fit the 16 registers */
        c = sa_pv_cols(T, M, 16, c, d, j0, j1, first, pf, jp, p, ldp, v, ldv, o, ldo);
    c = sa_pv_cols(T, M, 8, c, d, j0, j1, first, pf, jp, p, ldp, v, ldv, o, ldo);
    return c;
}

#include "rowsdot-template.h"
