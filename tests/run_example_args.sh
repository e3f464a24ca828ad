#!/usr/bin/env bash
# The examples' command lines, strictly parsed: `--help` prints the usage on stdout and exits 0; a
# value that is not an integer, out of range or missing, or an unknown option, prints a message
# naming the option (and value) and the usage on stderr, and exits 2 before any work.
#   usage: run_example_args.sh SELFATTN_RUN SELFATTN_GENERATE EXAMPLE_TRAIN [MPIEXEC RING_ATTENTION]
set -uo pipefail
run=$1 gen=$2 train=$3 mpiexec=${4:-} ring=${5:-}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fails=0 n=0

# expect STATUS WHERE(stdout|stderr) PATTERN... -- PROGRAM ARGS...: the exit status, and each
# fixed-string PATTERN (case-insensitive) in that stream; the other stream must then be empty.
expect() {
  local want=$1 where=$2
  shift 2
  local pats=()
  while [ "$1" != "--" ]; do pats+=("$1"); shift; done
  shift
  n=$((n + 1))
  (cd "$work" && exec "$@" >"$work/out" 2>"$work/err" </dev/null) # any stray file lands in $work
  local got=$? bad="" p
  [ "$got" -eq "$want" ] || bad="exit status $got, expected $want"
  local f=$work/out other=$work/err
  [ "$where" = stderr ] && f=$work/err other=$work/out
  for p in "${pats[@]}"; do
    grep -qiF -- "$p" "$f" || bad="$bad; '$p' not on $where"
  done
  [ -s "$other" ] && bad="$bad; unexpected output on the other stream"
  if [ -n "$bad" ]; then
    fails=$((fails + 1))
    echo "FAIL: $(basename "$1") ${*:2}: ${bad#; }"
    sed 's/^/  stdout: /' "$work/out"
    sed 's/^/  stderr: /' "$work/err"
  else
    echo "ok:   $(basename "$1") ${*:2} -> $got"
  fi
}

for prog in "$run" "$gen" "$train"; do
  expect 0 stdout "usage" -- "$prog" --help
  expect 2 stderr "--bogus" "usage" -- "$prog" --bogus
done

expect 2 stderr "--seq" "1e3" "usage" -- "$run" --seq 1e3
expect 2 stderr "--seq" "needs a value" "usage" -- "$run" --seq
expect 2 stderr "--seq" "out of range" -- "$run" --seq 0
expect 2 stderr "--batch" "-1" -- "$run" --batch -1
expect 2 stderr "--threads" "2x" -- "$run" --threads 2x
expect 2 stderr "--seed" "99999999999999999999" -- "$run" --seed 99999999999999999999
expect 2 stderr "--heads 7" "--d-model 768" -- "$run" --heads 7
expect 2 stderr "--kv-heads 5" -- "$run" --kv-heads 5

expect 2 stderr "--steps" "needs a value" "usage" -- "$gen" --steps
expect 2 stderr "--heads 7" "usage" -- "$gen" --heads 7
expect 2 stderr "--prompt" "abc" -- "$gen" --prompt abc
expect 2 stderr "--window" "-3" -- "$gen" --window -3

expect 2 stderr "--steps" "ten" "usage" -- "$train" --steps ten
expect 2 stderr "--lr" "fast" -- "$train" --lr fast
expect 2 stderr "--lr" "-1" -- "$train" --lr -1
expect 2 stderr "--out" "needs a value" -- "$train" --out

if [ -n "$ring" ]; then # one rank under mpiexec (Open MPI flags as in run_ring.sh)
  flags=()
  if "$mpiexec" --version 2>&1 | grep -qE 'Open MPI|OpenRTE'; then
    flags+=(--oversubscribe --bind-to none)
    if [ "$(id -u)" -eq 0 ]; then
      flags+=(--allow-run-as-root)
      export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    fi
  fi
  expect 0 stdout "usage" -- "$mpiexec" -n 1 "${flags[@]}" "$ring" --help
  expect 2 stderr "--L" "1e3" -- "$mpiexec" -n 1 "${flags[@]}" "$ring" --L 1e3
fi

echo "example arguments: $((n - fails)) passed, $fails failed"
[ "$fails" -eq 0 ]
