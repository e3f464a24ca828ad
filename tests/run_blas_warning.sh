#!/bin/sh
# selfattn-run prints a WARNING naming the fix when OpenBLAS runs kernels below the CPU's
# instruction set: here OpenBLAS's SSE3 (Prescott) kernels on a CPU with AVX2. Skipped (77) on a
# CPU without AVX2 and when the BLAS is not OpenBLAS.   usage: run_blas_warning.sh SELFATTN_RUN
set -u
run=$1
grep -qw avx2 /proc/cpuinfo 2>/dev/null || { echo "the CPU lacks AVX2: skipped"; exit 77; }
out=$(OPENBLAS_CORETYPE=Prescott "$run" --seq 64 --d-model 64 --heads 4 --repeat 1 --threads 1) \
  || { echo "$out"; echo "selfattn-run failed"; exit 1; }
echo "$out"
echo "$out" | grep -q '^blas: *OpenBLAS .*core Prescott' \
  || { echo "the BLAS is not OpenBLAS: skipped"; exit 77; }
echo "$out" | grep -q '^WARNING: .*OPENBLAS_CORETYPE=' || { echo "no WARNING line"; exit 1; }
# and none when the core matches (SkylakeX on AVX-512F CPUs, Haswell on AVX2 ones)
core=Haswell
grep -qw avx512f /proc/cpuinfo && core=SkylakeX
out=$(OPENBLAS_CORETYPE=$core "$run" --seq 64 --d-model 64 --heads 4 --repeat 1 --threads 1) \
  || { echo "$out"; echo "selfattn-run failed"; exit 1; }
if echo "$out" | grep -q '^WARNING'; then echo "$out"; echo "a WARNING with core $core"; exit 1; fi
echo "no WARNING with OPENBLAS_CORETYPE=$core: as expected"
