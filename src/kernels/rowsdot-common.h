/* The ISA-independent pieces of the small-M product kernels (f32-rowsdot-avx2.c,
   f32-rowsdot-avx512.c): the element types of K and V, one element's load, and the scalar tail
   of a group of dot products. Included by each of those files, which are compiled apart with
   their own -m flags; everything here is static inline and always inlined. */
#ifndef SELFATTN_ROWSDOT_COMMON_H
#define SELFATTN_ROWSDOT_COMMON_H

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

/* How K or V is stored: T is a constant at every call site, so each variant compiles apart. */
enum { SA_T_F32 = 0, SA_T_F16 = 1, SA_T_BF16 = 2 };
#define SA_T_SIZE(T) ((T) == SA_T_F32 ? 4 : 2) /* bytes an element */

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

/* Prefetch into L1 the elements [i, i + n) of base, a 64-byte line at a time (the rows ahead of
   the products, rowsdot-template.h). */
static inline __attribute__((always_inline)) void sa_prefetch(const int T, const void *base,
                                                              size_t i, size_t n)
{
    for (size_t b = 0; b < n * SA_T_SIZE(T); b += 64)
        _mm_prefetch((const char *)base + i * SA_T_SIZE(T) + b, _MM_HINT_T0);
}

/* s[r][j0 + g] (+)= t[r G + g] (the vector part of q_r . k_{j0 + g} over a chunk of the
   dimensions, ending at d0) plus the dimensions [d0, d1) left over, for rows r < M and keys
   g < G; `add` when an earlier chunk is already in s. */
static inline __attribute__((always_inline)) void
sa_qkt_finish(const int T, const size_t M, const size_t G, size_t j0, size_t d0, size_t d1, int add,
              const float *t, const float *q, size_t ldq, const void *k, size_t ldk, float *s,
              size_t lds)
{
    for (size_t r = 0; r < M; r++)
        for (size_t g = 0; g < G; g++) {
            float u = t[r * G + g];
            for (size_t c = d0; c < d1; c++)
                u += q[r * ldq + c] * sa_ld1(T, k, (j0 + g) * ldk + c);
            s[r * lds + j0 + g] = add ? s[r * lds + j0 + g] + u : u;
        }
}

#endif
