/* The BLAS in use: what it is (selfattn_blas_info), whether OpenBLAS runs kernels below the CPU's
 * instruction set and what to set then (selfattn_blas_mismatch, selfattn_blas_advice), and how
 * many threads it runs, which decides how many workers a call gets (sa_workers_for).
 * OpenBLAS's own functions are looked up at run time (dlsym), so that a build against any CBLAS
 * links and runs; the library never changes the BLAS's thread count unless asked to
 * (SELFATTN_BLAS_THREADS=1). */
#define _GNU_SOURCE /* RTLD_DEFAULT */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "internal.h"

/* OpenBLAS's introspection and threading functions (cblas.h of OpenBLAS declares them; other
   CBLAS headers do not). NULL when the BLAS is not OpenBLAS. */
typedef struct sa_openblas {
    char *(*get_config)(void);   /* "OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH ... Haswell ..." */
    char *(*get_corename)(void); /* "Haswell" */
    int (*get_parallel)(void);   /* 0 sequential, 1 pthreads, 2 OpenMP */
    int (*get_num_threads)(void);
    void (*set_num_threads)(int);
} sa_openblas;

static pthread_once_t sa_blas_once = PTHREAD_ONCE_INIT;
static sa_openblas sa_ob;
static char sa_info[192];
static char sa_advice[384];
static int sa_mismatch;

/* *fn = the function `name` of the process (the BLAS linked with the library included), or NULL.
   dlsym returns a void *, which POSIX lets a function pointer hold: copied bytewise for ISO C. */
static void sa_lookup(void *fn, const char *name)
{
    void *p = dlsym(RTLD_DEFAULT, name);
    memcpy(fn, &p, sizeof p);
}

/* The vector level an OpenBLAS core's kernels use, from its name (SA_CPU_VEC_UNKNOWN: a name not
   listed, never reported as a mismatch). */
static sa_cpu_vec sa_core_level(const char *core)
{
    static const char *const sse[] = {
        "prescott",  "core2",  "penryn", "dunnington", "nehalem",   "atom",   "nano",
        "barcelona", "bobcat", "katmai", "coppermine", "northwood", "banias", "athlon"};
    static const char *const avx[] = {"sandybridge", "bulldozer", "piledriver", "steamroller",
                                      "excavator"};
    static const char *const avx2[] = {"haswell", "zen"};
    static const char *const avx512[] = {"skylakex", "cooperlake", "sapphirerapids"};
    static const struct {
        const char *const *names;
        size_t n;
        sa_cpu_vec level;
    } levels[] = {{sse, sizeof sse / sizeof *sse, SA_CPU_VEC_SSE},
                  {avx, sizeof avx / sizeof *avx, SA_CPU_VEC_AVX},
                  {avx2, sizeof avx2 / sizeof *avx2, SA_CPU_VEC_AVX2},
                  {avx512, sizeof avx512 / sizeof *avx512, SA_CPU_VEC_AVX512}};
    if (strncasecmp(core, "opteron", 7) == 0) /* Opteron, Opteron(SSE3) */
        return SA_CPU_VEC_SSE;
    for (size_t l = 0; l < sizeof levels / sizeof *levels; l++)
        for (size_t i = 0; i < levels[l].n; i++)
            if (strcasecmp(core, levels[l].names[i]) == 0)
                return levels[l].level;
    return SA_CPU_VEC_UNKNOWN;
}

static const char *sa_level_name(sa_cpu_vec v)
{
    switch (v) {
    case SA_CPU_VEC_SSE:
        return "SSE";
    case SA_CPU_VEC_AVX:
        return "AVX";
    case SA_CPU_VEC_AVX2:
        return "AVX2";
    case SA_CPU_VEC_AVX512:
        return "AVX-512F";
    default:
        return "?";
    }
}

/* The text and the mismatch check, once: OpenBLAS has chosen its core when it was loaded. */
static void sa_blas_probe(void)
{
    sa_lookup(&sa_ob.get_config, "openblas_get_config");
    sa_lookup(&sa_ob.get_corename, "openblas_get_corename");
    sa_lookup(&sa_ob.get_parallel, "openblas_get_parallel");
    sa_lookup(&sa_ob.get_num_threads, "openblas_get_num_threads");
    sa_lookup(&sa_ob.set_num_threads, "openblas_set_num_threads");

    if (sa_ob.get_config == NULL) {
        /* BLIS and MKL name themselves too; anything else stays anonymous */
        char *(*blis_version)(void) = NULL;
        void (*mkl_version)(char *, int) = NULL;
        sa_lookup(&blis_version, "bli_info_get_version_str");
        sa_lookup(&mkl_version, "mkl_get_version_string");
        if (blis_version != NULL) {
            snprintf(sa_info, sizeof sa_info, "BLIS %.40s (not OpenBLAS)", blis_version());
        } else if (mkl_version != NULL) {
            char v[128] = "";
            mkl_version(v, (int)sizeof v);
            v[sizeof v - 1] = '\0';
            snprintf(sa_info, sizeof sa_info, "%.120s (not OpenBLAS)", v);
        } else {
            snprintf(sa_info, sizeof sa_info, "CBLAS (not OpenBLAS; version unknown)");
        }
        return;
    }

    char version[32] = "(version unknown)";
    const char *config = sa_ob.get_config();
    if (config != NULL && strncmp(config, "OpenBLAS ", 9) == 0)
        sscanf(config + 9, "%31s", version);
    const int parallel = sa_ob.get_parallel != NULL ? sa_ob.get_parallel() : -1;
    const char *threading = parallel == 0   ? "sequential"
                            : parallel == 1 ? "pthread"
                            : parallel == 2 ? "OpenMP"
                                            : "threading unknown";
    const char *core = sa_ob.get_corename != NULL ? sa_ob.get_corename() : NULL;
    if (core == NULL || core[0] == '\0') {
        snprintf(sa_info, sizeof sa_info, "OpenBLAS %s %s, core unknown", version, threading);
        return;
    }
    snprintf(sa_info, sizeof sa_info, "OpenBLAS %s %s, core %.40s", version, threading, core);

    int bf16 = 0;
    const sa_cpu_vec cpu = sa_cpu_vector_level(&bf16), kernels = sa_core_level(core);
    if (kernels == SA_CPU_VEC_UNKNOWN || cpu < SA_CPU_VEC_AVX || kernels >= cpu)
        return;
    sa_mismatch = 1;
    const char *fix = cpu == SA_CPU_VEC_AVX512 ? (bf16 ? "Cooperlake" : "SkylakeX")
                      : cpu == SA_CPU_VEC_AVX2 ? "Haswell"
                                               : "Sandybridge";
    const char *env = getenv("OPENBLAS_CORETYPE");
    char set[96] = "";
    if (env != NULL && env[0] != '\0')
        snprintf(set, sizeof set, " (this environment already sets OPENBLAS_CORETYPE=%.32s)", env);
    snprintf(sa_advice, sizeof sa_advice,
             "OpenBLAS runs its %.40s kernels (%s) on a CPU with %s: set OPENBLAS_CORETYPE=%s in "
             "the environment before the program starts%s",
             core, sa_level_name(kernels), sa_level_name(cpu), fix, set);
}

const char *selfattn_blas_info(void)
{
    pthread_once(&sa_blas_once, sa_blas_probe);
    return sa_info;
}

int selfattn_blas_mismatch(void)
{
    pthread_once(&sa_blas_once, sa_blas_probe);
    return sa_mismatch;
}

const char *selfattn_blas_advice(void)
{
    pthread_once(&sa_blas_once, sa_blas_probe);
    return sa_advice;
}

/* SELFATTN_BLAS_THREADS=1 asks for the 1.2 behaviour: OpenBLAS set to one thread, process-wide,
   once, so that every call runs on the library's workers. */
static pthread_once_t sa_blas_threads_once = PTHREAD_ONCE_INIT;

static void sa_blas_apply_env(void)
{
    pthread_once(&sa_blas_once, sa_blas_probe);
    const char *env = getenv("SELFATTN_BLAS_THREADS");
    if (env != NULL && strcmp(env, "1") == 0 && sa_ob.set_num_threads != NULL)
        sa_ob.set_num_threads(1);
}

int sa_blas_threads(void)
{
    pthread_once(&sa_blas_threads_once, sa_blas_apply_env);
    if (sa_ob.get_num_threads == NULL)
        return 1; /* a BLAS that cannot tell: taken to be single-threaded */
    const int n = sa_ob.get_num_threads();
    return n > 1 ? n : 1;
}

/* Below about this much work handing tasks to a pool helper costs more than it saves: a
   one-token forward at d_model 768 (~6 MFLOP, ~0.2 ms) still gains from a second thread, a tiny
   test-sized call does not. */
#define SA_PARALLEL_MIN_FLOPS 2e6

/* The library's workers and a multi-threaded BLAS inside each of them would oversubscribe the
   cores (and serialise on OpenBLAS's level-3 lock): whichever is multi-threaded runs the call.
   The BLAS's thread count is the caller's to set; the library only reads it. */
int sa_workers_for(const selfattn_layer *l, double flops)
{
    const int blas_threads = sa_blas_threads();
    if (flops < SA_PARALLEL_MIN_FLOPS || blas_threads > 1)
        return 1;
    return sa_layer_threads(l);
}
