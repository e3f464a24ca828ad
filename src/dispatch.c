/* Kernel selection: the CPU is probed once per process, the best kernel table it can run is
   chosen, and SELFATTN_ISA may force a lower family (for tests and bug reports). */
#include <pthread.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static const sa_kernels sa_kernels_scalar = {
    .isa = SA_ISA_SCALAR,
    .softmax_name = "f32-softmax-scalar-u1",
    .softmax_exp = sa_f32_softmax_exp_scalar_u1,
    .softmax_exp_above = sa_f32_softmax_exp_above_scalar_u1,
    .qkt = sa_f32_qkt_scalar_g8,
    .pv = sa_f32_pv_scalar_g8,
    .dot = sa_f32_dot_scalar,
    .dscores = sa_f32_dscores_scalar,
    .expsub = sa_f32_expsub_scalar,
    .softcap = sa_f32_softcap_scalar,
    .to_f32 = {sa_f16_to_f32_scalar, sa_bf16_to_f32_scalar},
    .from_f32 = {sa_f32_to_f16_scalar, sa_f32_to_bf16_scalar},
    .qkt_x16 = {sa_f16_qkt_scalar_g8, sa_bf16_qkt_scalar_g8},
    .pv_x16 = {sa_f16_pv_scalar_g8, sa_bf16_pv_scalar_g8},
};
#ifdef SELFATTN_HAVE_AVX2_KERNELS
static const sa_kernels sa_kernels_avx2 = {
    .isa = SA_ISA_AVX2,
    .softmax_name = "f32-softmax-avx2-u32",
    .softmax_exp = sa_f32_softmax_exp_avx2_u32,
    .softmax_exp_above = sa_f32_softmax_exp_above_avx2_u32,
    .qkt = sa_f32_qkt_avx2_g8,
    .pv = sa_f32_pv_avx2_g8,
    .dot = sa_f32_dot_avx2,
    .dscores = sa_f32_dscores_avx2,
    .expsub = sa_f32_expsub_avx2,
    .softcap = sa_f32_softcap_avx2,
    .to_f32 = {sa_f16_to_f32_avx2, sa_bf16_to_f32_avx2},
    .from_f32 = {sa_f32_to_f16_avx2, sa_f32_to_bf16_avx2},
    .qkt_x16 = {sa_f16_qkt_avx2_g8, sa_bf16_qkt_avx2_g8},
    .pv_x16 = {sa_f16_pv_avx2_g8, sa_bf16_pv_avx2_g8},
};
#endif
#ifdef SELFATTN_HAVE_AVX512_KERNELS
/* the backward's row kernels are a small part of the time: the AVX2 ones serve AVX-512 CPUs as
   well; the small-M products are FMA-bound once K and V are 16-bit, and have their own */
static const sa_kernels sa_kernels_avx512 = {
    .isa = SA_ISA_AVX512,
    .softmax_name = "f32-softmax-avx512-u64",
    .softmax_exp = sa_f32_softmax_exp_avx512_u64,
    .softmax_exp_above = sa_f32_softmax_exp_above_avx512_u64,
    .qkt = sa_f32_qkt_avx512_g8,
    .pv = sa_f32_pv_avx512_g8,
    .dot = sa_f32_dot_avx2,
    .dscores = sa_f32_dscores_avx2,
    .expsub = sa_f32_expsub_avx2,
    .softcap = sa_f32_softcap_avx2,
    .to_f32 = {sa_f16_to_f32_avx2, sa_bf16_to_f32_avx2},
    .from_f32 = {sa_f32_to_f16_avx2, sa_f32_to_bf16_avx2},
    .qkt_x16 = {sa_f16_qkt_avx512_g8, sa_bf16_qkt_avx512_g8},
    .pv_x16 = {sa_f16_pv_avx512_g8, sa_bf16_pv_avx512_g8},
};
#endif

static pthread_once_t sa_probe_once = PTHREAD_ONCE_INIT;
static sa_isa sa_cpu_isa = SA_ISA_SCALAR; /* best the CPU and this build support */
static sa_cpu_vec sa_cpu_vec_level = SA_CPU_VEC_UNKNOWN; /* the CPU's, whatever this build has */
static int sa_cpu_bf16 = 0;                               /* AVX512-BF16 */
static const sa_kernels *sa_chosen = &sa_kernels_scalar;

static const sa_kernels *sa_table(sa_isa isa)
{
    switch (isa) {
#ifdef SELFATTN_HAVE_AVX512_KERNELS
    case SA_ISA_AVX512:
        return &sa_kernels_avx512;
#endif
#ifdef SELFATTN_HAVE_AVX2_KERNELS
    case SA_ISA_AVX2:
        return &sa_kernels_avx2;
#endif
    case SA_ISA_SCALAR:
        return &sa_kernels_scalar;
    default:
        return NULL;
    }
}

#if (defined(__x86_64__) || defined(__i386__)) && defined(SELFATTN_HAVE_AVX2_KERNELS)
/* F16C (the 16-bit conversions the AVX2 kernels use): CPUID leaf 1, ECX bit 29. Every AVX2 CPU
   has it, but it is checked rather than assumed (and clang's __builtin_cpu_supports does not
   know the name). */
static int sa_cpu_has_f16c(void)
{
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29)) != 0;
}
#endif

#if defined(__x86_64__) || defined(__i386__)
/* The vector level of the CPU itself, for comparing the BLAS's kernels with it (blas.c). */
static void sa_probe_vector_level(void)
{
    sa_cpu_vec v = SA_CPU_VEC_SSE;
    if (__builtin_cpu_supports("avx"))
        v = SA_CPU_VEC_AVX;
    if (v == SA_CPU_VEC_AVX && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        v = SA_CPU_VEC_AVX2;
    if (v == SA_CPU_VEC_AVX2 && __builtin_cpu_supports("avx512f"))
        v = SA_CPU_VEC_AVX512;
    sa_cpu_vec_level = v;
    /* AVX512-BF16: CPUID leaf 7 sub-leaf 1, EAX bit 5 (OpenBLAS's Cooperlake core uses it) */
    unsigned a, b, c, d;
    sa_cpu_bf16 = v == SA_CPU_VEC_AVX512 && __get_cpuid_count(7, 1, &a, &b, &c, &d) &&
                  (a & (1u << 5)) != 0;
}
#endif

static void sa_probe(void)
{
    sa_isa best = SA_ISA_SCALAR;
#if defined(__x86_64__) || defined(__i386__)
    /* __builtin_cpu_supports also checks that the OS saves the wide registers (XGETBV). */
    __builtin_cpu_init();
    sa_probe_vector_level();
#ifdef SELFATTN_HAVE_AVX2_KERNELS
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && sa_cpu_has_f16c())
        best = SA_ISA_AVX2;
#endif
#ifdef SELFATTN_HAVE_AVX512_KERNELS
    if (best == SA_ISA_AVX2 && __builtin_cpu_supports("avx512f"))
        best = SA_ISA_AVX512;
#endif
#endif
    sa_cpu_isa = best;

    sa_isa want = best;
    const char *env = getenv("SELFATTN_ISA");
    if (env != NULL) {
        if (strcmp(env, "scalar") == 0)
            want = SA_ISA_SCALAR;
        else if (strcmp(env, "avx2") == 0)
            want = SA_ISA_AVX2;
        else if (strcmp(env, "avx512") == 0)
            want = SA_ISA_AVX512;
    }
    if (want > best)
        want = best;
    sa_chosen = sa_table(want);
}

const sa_kernels *sa_kernels_get(void)
{
    pthread_once(&sa_probe_once, sa_probe);
    return sa_chosen;
}

const sa_kernels *sa_kernels_for_isa(sa_isa isa)
{
    pthread_once(&sa_probe_once, sa_probe);
    if (isa > sa_cpu_isa)
        return NULL;
    return sa_table(isa);
}

sa_cpu_vec sa_cpu_vector_level(int *bf16)
{
    pthread_once(&sa_probe_once, sa_probe);
    if (bf16 != NULL)
        *bf16 = sa_cpu_bf16;
    return sa_cpu_vec_level;
}

const char *selfattn_kernel_name(void)
{
    return sa_kernels_get()->softmax_name;
}
