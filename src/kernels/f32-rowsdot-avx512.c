/* AVX-512 small-M products for decoding: f32-rowsdot-avx2.c's kernels (the same contract and
   loop structure) with 16-float vectors and 32 registers. Once K and V are read at 2 bytes an
   element the AVX2 kernels are bound by their FMAs (M d / 8 per key and per product); a CPU that
   executes 512-bit FMAs at full width does the same work in half the instructions. Compiled with
   -mavx512f -mfma on this file only, chosen at run time. */
#include <immintrin.h>
#include <stdint.h>

#include "kernels.h"
#include "rowsdot-common.h"

#define SA_RD_ISA avx512
#define SA_RD_VEC 16
#define SA_RD_GROUP 24 /* accumulators of a group of dot products */
/* keys a group for M rows: M G accumulators, G keys and a row of q in the 32 registers (with one
   or two rows, 16 accumulators, the loads of K folded into the FMAs). One row against long rows
   (L: a projection's weights, which the hardware prefetcher streams alone) takes 8 keys, 8
   streams from memory at a time instead of 16: against 3072 x 2048 weights from memory, one
   thread, alternating in one process, bf16 ran in 0.92-0.94 of the time, f16 0.93-0.98, float32
   0.95-0.98 (24 keys: 1.6 and 2.6 times the time in bf16 and float32). A cache's short rows keep
   16 (8 took 1.07 times as long in f16 and 1.16 in float32). AMD EPYC (Zen 5), medians of 201. */
#define SA_RD_KEYS(M, L)                                                                           \
    ((M) == 1 && (L)             ? 8                                                               \
     : (M) <= 2                  ? 16 / (M)                                                        \
     : 24 / (M) < 31 / ((M) + 1) ? 24 / (M)                                                        \
                                 : 31 / ((M) + 1))

static inline __attribute__((always_inline)) __m512 sa_ld16(const int T, const void *base, size_t i)
{
    if (T == SA_T_F32)
        return _mm512_loadu_ps((const float *)base + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i));
    if (T == SA_T_F16)
        return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* The 8 sums of a[0..7] (16 floats each, folded to 8) in one 8-float vector, in order. */
static inline __attribute__((always_inline)) __m256 sa_sum8_avx512(const __m512 *a)
{
    __m256 h[8];
    for (int i = 0; i < 8; i++)
        h[i] = _mm256_add_ps(_mm512_castps512_ps256(a[i]),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[i]), 1)));
    const __m256 h01 = _mm256_hadd_ps(h[0], h[1]), h23 = _mm256_hadd_ps(h[2], h[3]);
    const __m256 h45 = _mm256_hadd_ps(h[4], h[5]), h67 = _mm256_hadd_ps(h[6], h[7]);
    const __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);
    return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

/* The bf16 group for one or two rows, 32 dimensions a step: a 64-byte line of a key holds 32
   bf16 values, whose even elements (the low halves of its 32-bit words) become floats by a
   shift and whose odd elements by a mask, one instruction each, without widening; q's 32
   dimensions are split into even and odd the same way (two permutes a row, shared by the G
   keys). The sums run over the dimensions in another order than the 16-wide loop's. Fewer than
   32 dimensions left (never for d_model-wide weights, whose chunks are multiples of 64) go through
   sa_qkt_finish's scalar loop. Against bf16 weights of 3072 x 2048 one row, K out of cache, one
   thread, ran 511 and 582 us against 536 and 612 before (widening 16 values at a time), a plain
   read of the same bytes 471 and 475 us (AMD EPYC, Zen 5, two runs). */
static inline __attribute__((always_inline)) void
sa_qkt_group_bf16_pairs(const size_t M, const size_t G, size_t j0, size_t c0, size_t c1, int add,
                        size_t pf, const float *q, size_t ldq, const void *k, size_t ldk, float *s,
                        size_t lds)
{
    const uint16_t *k16 = (const uint16_t *)k;
    const size_t cv = c0 + (c1 - c0) / 32 * 32;
    const __m512i even =
        _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd =
        _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    __m512 acc[SA_RD_GROUP];
    for (size_t i = 0; i < SA_RD_GROUP; i++)
        acc[i] = _mm512_setzero_ps();
    for (size_t c = c0; c < cv; c += 32) {
        __m512 qe[2], qo[2];
        for (size_t r = 0; r < M; r++) {
            const __m512 a = _mm512_loadu_ps(q + r * ldq + c),
                         b = _mm512_loadu_ps(q + r * ldq + c + 16);
            qe[r] = _mm512_permutex2var_ps(a, even, b);
            qo[r] = _mm512_permutex2var_ps(a, odd, b);
        }
        if (pf != 0)
            for (size_t g = 0; g < G; g++)
                sa_prefetch(SA_T_BF16, k, (j0 + g) * ldk + c + pf, 32);
        for (size_t g = 0; g < G; g++) {
            const __m512i w = _mm512_loadu_si512((const void *)(k16 + (j0 + g) * ldk + c));
            const __m512 ke = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
            const __m512 ko = _mm512_castsi512_ps(_mm512_and_si512(w, high));
            for (size_t r = 0; r < M; r++) {
                acc[r * G + g] = _mm512_fmadd_ps(qe[r], ke, acc[r * G + g]);
                acc[r * G + g] = _mm512_fmadd_ps(qo[r], ko, acc[r * G + g]);
            }
        }
    }
    float t[SA_RD_GROUP];
    for (size_t i = 0; i < M * G; i += 8)
        _mm256_storeu_ps(t + i, sa_sum8_avx512(acc + i));
    sa_qkt_finish(SA_T_BF16, M, G, j0, cv, c1, add, t, q, ldq, k, ldk, s, lds);
}

/* q packed (rowsdot-template.h) for 5 to 8 rows (3 or 4 keys a group). 8 rows of 2048
   dimensions against 3072 x 2048 weights, one thread, out of cache: 1170, 1189 and 1346 us
   against 1346, 1309 and 1631 us unpacked (hot in L2, 96 keys: 122-154 against 94-139 GFLOP/s);
   on two threads, each half the keys, 605-645 against 651-743 us. With 3 or 4 rows (more keys
   a group, fewer rows to load) it ran 3-5% slower. AMD EPYC (Zen 5), medians of 41 and 61. */
#define SA_RD_PACK(M) ((M) >= 5)

/* s[r][j0 + g] (+)= q_r . k_{j0 + g} over dimensions [c0, c1) for rows r < M and keys g < G
   (M G <= 24): one accumulator per (row, key), reduced together at the end. */
static inline __attribute__((always_inline)) void
sa_qkt_group(const int T, const size_t M, const size_t G, size_t j0, size_t c0, size_t c1, int add,
             size_t pf, const float *qp, const float *q, size_t ldq, const void *k, size_t ldk,
             float *s, size_t lds)
{
    if (T == SA_T_BF16 && M <= 2) {
        sa_qkt_group_bf16_pairs(M, G, j0, c0, c1, add, pf, q, ldq, k, ldk, s, lds);
        return;
    }
    const size_t cv = c0 + (c1 - c0) / 16 * 16;
    __m512 acc[SA_RD_GROUP];
    for (size_t i = 0; i < SA_RD_GROUP; i++)
        acc[i] = _mm512_setzero_ps();
    for (size_t c = c0; c < cv; c += 16) {
        __m512 kv[SA_RD_GROUP];
        for (size_t g = 0; g < G; g++)
            kv[g] = sa_ld16(T, k, (j0 + g) * ldk + c);
        if (pf != 0) /* rows ahead (rowsdot-template.h) */
            for (size_t g = 0; g < G; g++)
                sa_prefetch(T, k, (j0 + g) * ldk + c + pf, 16);
        for (size_t r = 0; r < M; r++) {
            __m512 qr = SA_RD_PACK(M) ? _mm512_load_ps(qp + (c - c0) * M + r * 16)
                                      : _mm512_loadu_ps(q + r * ldq + c);
            if (G > 1) /* one load of q_r for the G keys (GCC would fold one into each FMA) */
                __asm__("" : "+v"(qr));
            for (size_t g = 0; g < G; g++)
                acc[r * G + g] = _mm512_fmadd_ps(qr, kv[g], acc[r * G + g]);
        }
    }
    float t[SA_RD_GROUP];
    for (size_t i = 0; i < M * G; i += 8) /* the unused accumulators past M G hold zeros */
        _mm256_storeu_ps(t + i, sa_sum8_avx512(acc + i));
    /* and the fewer than 16 dimensions left */
    sa_qkt_finish(T, M, G, j0, cv, c1, add, t, q, ldq, k, ldk, s, lds);
}

/* o[r][c] (+)= sum_{j0 <= j < j1} p[r][j] v_j[c] for columns [c, c1), a slice of W (16, 32 or
   64) columns at a time: the M x W / 16 accumulators stay in registers. */
static inline __attribute__((always_inline)) size_t
sa_pv_cols(const int T, const size_t M, const size_t W, size_t c, size_t c1, size_t j0, size_t j1,
           int first, size_t pf, size_t jp, const float *p, size_t ldp, const void *v, size_t ldv,
           float *o, size_t ldo)
{
    for (; c + W <= c1; c += W) {
        __m512 acc[8][4];
        for (size_t r = 0; r < M; r++)
            for (size_t u = 0; u < W / 16; u++)
                acc[r][u] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(o + r * ldo + c + 16 * u);
        for (size_t j = j0; j < j1; j++) {
            const size_t vj = j * ldv + c;
            if (pf != 0 && j < jp) /* the slice's bytes of a row ahead (rowsdot-template.h) */
                sa_prefetch(T, v, vj + pf, W);
            __m512 vv[4];
            for (size_t u = 0; u < W / 16; u++)
                vv[u] = sa_ld16(T, v, vj + 16 * u);
            for (size_t r = 0; r < M; r++) {
                const __m512 pj = _mm512_set1_ps(p[r * ldp + j]);
                for (size_t u = 0; u < W / 16; u++)
                    acc[r][u] = _mm512_fmadd_ps(pj, vv[u], acc[r][u]);
            }
        }
        for (size_t r = 0; r < M; r++)
            for (size_t u = 0; u < W / 16; u++)
                _mm512_storeu_ps(o + r * ldo + c + 16 * u, acc[r][u]);
    }
    return c;
}

/* The columns of o from c on in slices of whole vectors, for keys [j0, j1); returns the first
   of the fewer than 16 columns left. */
static inline __attribute__((always_inline)) size_t
sa_pv_slices(const int T, const size_t M, size_t c, size_t d, size_t j0, size_t j1, int first,
             size_t pf, size_t jp, const float *p, size_t ldp, const void *v, size_t ldv, float *o,
             size_t ldo)
{
    if (M <= 4) /* 64-column slices while 4 x M accumulators fit half the 32 registers */
        c = sa_pv_cols(T, M, 64, c, d, j0, j1, first, pf, jp, p, ldp, v, ldv, o, ldo);
    c = sa_pv_cols(T, M, 32, c, d, j0, j1, first, pf, jp, p, ldp, v, ldv, o, ldo);
    c = sa_pv_cols(T, M, 16, c, d, j0, j1, first, pf, jp, p, ldp, v, ldv, o, ldo);
    return c;
}

#include "rowsdot-template.h"
