#!/usr/bin/env bash
# Consumer test: install the built library into a scratch prefix, then build and run
#   - a C99 program through pkg-config, and
#   - a C++11 program through CMake's find_package(selfattn 1)
# against the installed copy only.
# usage: run.sh BUILD_DIR WORK_DIR CMAKE
set -euo pipefail
build=$1 work=$2 cmake=$3
here=$(cd "$(dirname "$0")" && pwd)
rm -rf "$work"
mkdir -p "$work"
prefix=$work/prefix
"$cmake" --install "$build" --prefix "$prefix" >/dev/null
libdir=$(dirname "$(find "$prefix" -name 'libselfattn.so.1' | head -n 1)")
[ -f "$prefix/include/selfattn/selfattn.h" ] || { echo "header not installed"; exit 1; }
readlink "$libdir/libselfattn.so" >/dev/null || { echo "libselfattn.so link missing"; exit 1; }

echo "== C99 through pkg-config"
export PKG_CONFIG_PATH=$libdir/pkgconfig
pkg-config --modversion selfattn
cc -std=c99 -Wall -Wextra -pedantic -Werror -o "$work/consumer_c" "$here/consumer.c" \
   $(pkg-config --cflags --libs selfattn) -lm -Wl,-rpath,"$libdir"
"$work/consumer_c"

echo "== C++11 through find_package"
"$cmake" -S "$here/cxx" -B "$work/cxx" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release >/dev/null
"$cmake" --build "$work/cxx" >/dev/null
"$work/cxx/consumer_cxx"
echo "consumers: 2 passed, 0 failed"
