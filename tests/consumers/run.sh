#!/usr/bin/env bash
# Consumer test: install the built library into a scratch prefix, then, with LD_LIBRARY_PATH unset
# (nothing but the programs' own rpaths tells the loader where the prefix is):
#   - run the installed programs (bin/selfattn-run, bin/selfattn-generate), which must find the
#     installed library through their $ORIGIN-relative rpath, also after the prefix is moved;
#   - build and run a C99 program through pkg-config, with the rpath flag the README gives users:
#     -Wl,-rpath,$(pkg-config --variable=libdir selfattn);
#   - build and run a C++11 program through CMake's find_package(selfattn 1)
# against the installed copy only.
# usage: run.sh BUILD_DIR WORK_DIR CMAKE [PROGRAM...]   (PROGRAMs: expected in the prefix's bin/)
set -euo pipefail
build=$1 work=$2 cmake=$3
shift 3
programs=("$@")
here=$(cd "$(dirname "$0")" && pwd)
unset LD_LIBRARY_PATH
rm -rf "$work"
mkdir -p "$work"
prefix=$work/prefix
"$cmake" --install "$build" --prefix "$prefix" >/dev/null
libdir=$(dirname "$(find "$prefix" -name 'libselfattn.so.1' | head -n 1)")
[ -f "$prefix/include/selfattn/selfattn.h" ] || { echo "header not installed"; exit 1; }
readlink "$libdir/libselfattn.so" >/dev/null || { echo "libselfattn.so link missing"; exit 1; }
passed=0

# PROGRAM's libselfattn.so.1 must be the one under DIR (not a copy elsewhere on the system).
loads_from() {
  local got
  got=$(ldd "$1" | sed -n 's/^[[:space:]]*libselfattn\.so\.1 => \(.*\)$/\1/p')
  case "$got" in
  "$2"/*) ;;
  *) echo "$1: libselfattn.so.1 resolves to '${got:-nothing}', not under $2"
     ldd "$1"; readelf -d "$1" | grep -E 'RPATH|RUNPATH' || echo "(no rpath)"; exit 1 ;;
  esac
}

if [ ${#programs[@]} -gt 0 ]; then
  echo "== installed programs, through their rpath"
  # a moved prefix: an rpath relative to $ORIGIN still finds the library, an absolute one would not
  moved=$work/moved-prefix
  cp -a "$prefix" "$moved"
  for dir in "$prefix" "$moved"; do
    for p in "${programs[@]}"; do
      [ -x "$dir/bin/$p" ] || { echo "$dir/bin/$p not installed"; exit 1; }
      loads_from "$dir/bin/$p" "$dir"
    done
  done
  readelf -d "$moved/bin/${programs[0]}" | grep -E 'RPATH|RUNPATH'
  "$moved/bin/selfattn-run" --batch 1 --seq 64 --d-model 64 --heads 4 --repeat 1 --threads 1 \
    | grep -E '^(libselfattn|check)'
  "$moved/bin/selfattn-generate" --d-model 64 --heads 4 --kv-heads 2 --prompt 16 --steps 4 \
    --vocab 32 --threads 1 | grep -E '^decode'
  passed=$((passed + 1))
fi

echo "== C99 through pkg-config"
export PKG_CONFIG_PATH=$libdir/pkgconfig
pkg-config --modversion selfattn
cc -std=c99 -Wall -Wextra -pedantic -Werror -o "$work/consumer_c" "$here/consumer.c" \
   $(pkg-config --cflags --libs selfattn) -lm -Wl,-rpath,"$(pkg-config --variable=libdir selfattn)"
loads_from "$work/consumer_c" "$prefix"
"$work/consumer_c"
passed=$((passed + 1))

echo "== C++11 through find_package"
"$cmake" -S "$here/cxx" -B "$work/cxx" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release >/dev/null
"$cmake" --build "$work/cxx" >/dev/null
loads_from "$work/cxx/consumer_cxx" "$prefix"
"$work/cxx/consumer_cxx"
passed=$((passed + 1))
echo "consumers: $passed passed, 0 failed"
