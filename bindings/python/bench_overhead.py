#!/usr/bin/env python3
"""What the Python binding adds per call: layer(x) against lib.selfattn_forward called directly
through ctypes with pointers converted beforehand (the lower bound of any ctypes caller: the
same C work plus ctypes' own argument passing), at 1 and 512 tokens, d_model 768, 12 heads.

    SELFATTN_LIBRARY=build/libselfattn.so.1 PYTHONPATH=bindings/python \
        /usr/bin/python3 bindings/python/bench_overhead.py [--threads N] [--reps N]

Each binding call is followed by one direct call (pairs, so that machine noise hits both alike);
the table gives the medians and the median of the per-pair differences ("added"). As that
difference is within the noise of a shared machine, the binding's own Python work is also timed
exactly, by running layer(x) with the C function replaced by a no-op (ctypes' argument
conversion, paid by both paths, is not in it). Target: <= 10 us per call."""
import argparse
import statistics
import time

import numpy as np

import selfattn
from selfattn import _lib, _layer


def measure(layer, seq, pairs):
    rng = np.random.default_rng(seq)
    x = rng.standard_normal((1, seq, layer.d_model)).astype(np.float32)
    y = np.empty_like(x)
    f = _lib.lib.selfattn_forward
    h, xp, yp = layer.handle, x.ctypes.data, y.ctypes.data
    pc = time.perf_counter
    for _ in range(max(3, pairs // 20)):      # warm-up: worker pool, workspace, caches
        layer(x)
        f(h, 1, seq, xp, None, yp)
    binding, direct, diff = [], [], []
    for _ in range(pairs):
        t0 = pc()
        layer(x)
        t1 = pc()
        f(h, 1, seq, xp, None, yp)
        t2 = pc()
        binding.append(t1 - t0)
        direct.append(t2 - t1)
        diff.append((t1 - t0) - (t2 - t1))
    np.testing.assert_array_equal(layer(x), y)
    return statistics.median(binding), statistics.median(direct), statistics.median(diff)


class _NoOpC:
    """The library with selfattn_forward replaced by a no-op returning SELFATTN_OK."""
    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    @staticmethod
    def selfattn_forward(*args):
        return 0


def python_side(layer, seq, n=20000):
    x = np.zeros((1, seq, layer.d_model), np.float32)
    real = _layer._C
    pc = time.perf_counter
    noop = _NoOpC.selfattn_forward
    t0 = pc()
    for _ in range(n):
        noop(1, 1, 1, 1, None, 1)
    t1 = pc()
    _layer._C = _NoOpC(real)
    try:
        for _ in range(n):
            layer(x)
        t2 = pc()
    finally:
        _layer._C = real
    return ((t2 - t1) - (t1 - t0)) / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="SELFATTN_OPT_THREADS (default 1)")
    ap.add_argument("--pairs", type=int, default=2000, help="timed pairs at 1 token (512: /50)")
    args = ap.parse_args()
    d, h = 768, 12
    layer = selfattn.Layer(d, h, threads=args.threads)
    rng = np.random.default_rng(0)
    for n in ("w_q", "w_k", "w_v", "w_o"):
        layer.set_weight(n, (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32))
    print("libselfattn %s (%s), kernel %s, d_model %d, %d heads, threads %d"
          % (selfattn.version(), selfattn.library_path, selfattn.kernel_name(), d, h,
             layer.threads))
    print()
    print("| tokens | layer(x) | direct ctypes call | added (median of pairs) | binding's Python work |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for seq, pairs in ((1, args.pairs), (512, max(5, args.pairs // 50))):
        b, c, dd = measure(layer, seq, pairs)
        own = python_side(layer, seq)
        worst = max(worst, own)
        print("| %d | %.1f us | %.1f us | %+.1f us | %.1f us |"
              % (seq, b * 1e6, c * 1e6, dd * 1e6, own * 1e6))
    print()
    print("target <= 10 us of Python work per call: %s" % ("met" if worst <= 10e-6 else "NOT met"))


if __name__ == "__main__":
    main()
