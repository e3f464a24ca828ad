#!/usr/bin/env bash
# Runs examples/ring_attention under MPI with --check on 1, 2 and 4 ranks, full and causal, and
# once with grouped-query heads; fails on the first run that fails.
#   usage: run_ring.sh MPIEXEC RING_ATTENTION_BINARY
# Open MPI: --oversubscribe (4 ranks on a 2-core machine), --bind-to none (ranks are not pinned,
# so concurrent tests share the cores), and --allow-run-as-root when running as root (CI).
set -euo pipefail
mpiexec=$1
bin=$2
flags=()
if "$mpiexec" --version 2>&1 | grep -qE 'Open MPI|OpenRTE'; then # 4.x mpiexec says OpenRTE
  flags+=(--oversubscribe --bind-to none)
  if [ "$(id -u)" -eq 0 ]; then
    flags+=(--allow-run-as-root)
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  fi
fi
export OPENBLAS_NUM_THREADS=1 # one worker per rank (--threads 1); no OpenBLAS pool to spin
run() { # ranks, args...
  local n=$1
  shift
  echo "--- $mpiexec -n $n ${flags[*]} ring_attention $*"
  "$mpiexec" -n "$n" "${flags[@]}" "$bin" "$@"
}
shape=(--L 512 --heads 4 --head-dim 32 --check --threads 1)
for n in 1 2 4; do
  run "$n" "${shape[@]}"
  run "$n" "${shape[@]}" --causal
done
run 4 --L 512 --heads 8 --kv-heads 2 --head-dim 32 --check --threads 1 --causal
run 2 --L 768 --heads 6 --kv-heads 3 --head-dim 16 --check --threads 1 --seed 7
echo "ring attention: all runs passed"
