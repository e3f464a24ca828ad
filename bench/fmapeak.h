/* The measured peak of the CPU's cores: a short register-only loop of fused multiply-adds at the
   widest instruction set the CPU has (AVX-512F, else AVX2 + FMA, else SSE multiply + add), on
   one or more threads at once. A ceiling that does not depend on the BLAS, so that a BLAS running
   kernels below the CPU's (OpenBLAS's Prescott core on an AVX-512 CPU) cannot lower both the
   library's speed and the yardstick it is compared with. A measurement tool for the examples and
   the benchmarks, not part of the library. Needs only libc and pthreads; the SIMD loops are
   compiled with function target attributes, so no compiler flag is needed (and a build with
   -DSELFATTN_SIMD=OFF measures the same). */
#ifndef SELFATTN_FMAPEAK_H
#define SELFATTN_FMAPEAK_H

#ifdef __cplusplus
extern "C" {
#endif

/* GFLOP/s of one thread (2 flops per FMA lane; a multiply and an add count 1 each) while
   `threads` threads (>= 1) run the loop at once: each thread's best of 25 runs of about `seconds`
   (0: 0.002) each, the mean over the threads. *isa (when not NULL) is set to the loop's instruction
   set, "AVX-512F", "AVX2+FMA", "SSE" or "scalar". Returns 0 when a thread cannot be started. */
double fp_peak_gflops_per_thread(int threads, double seconds, const char **isa);

#ifdef __cplusplus
}
#endif

#endif
