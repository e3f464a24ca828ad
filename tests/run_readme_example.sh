#!/usr/bin/env bash
# The README's C program is examples/minimal.c verbatim (the example is built and run by the
# tests; the README's copy is not): the ```c block after "`examples/minimal.c`, in full" must equal
# the file, line for line.
#   usage: run_readme_example.sh README.md examples/minimal.c
set -euo pipefail
readme=$1 example=$2
block=$(awk '/^`examples\/minimal.c`, in full/ {f = 1; next}
             f && /^```c$/ {g = 1; next}
             g && /^```$/ {exit}
             g' "$readme")
if [ -z "$block" ]; then
  echo "no \`\`\`c block after \"\`examples/minimal.c\`, in full\" in $readme"
  exit 1
fi
if ! diff -u "$example" <(printf '%s\n' "$block"); then
  echo "the README's C program differs from $example (above: - file, + README)"
  exit 1
fi
echo "README's C program = $example ($(printf '%s\n' "$block" | wc -l) lines)"
