#!/usr/bin/env python3
"""Derives the degree-5 polynomial used by the softmax kernels' exp: the minimax approximation
(relative error) of e^r on [-ln2/2, ln2/2], by the Remez exchange algorithm, in pure Python.
Prints the coefficients rounded to float32 and their maximum relative error (evaluated in
double on a fine grid). Run: python3 src/kernels/exp_minimax.py"""
import math
import struct

DEG = 5
A = math.log(2) / 2


def f32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


def solve(m, v):
    n = len(v)
    m = [row[:] + [v[i]] for i, row in enumerate(m)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        for r in range(n):
            if r != c:
                k = m[r][c] / m[c][c]
                for j in range(c, n + 1):
                    m[r][j] -= k * m[c][j]
    return [m[i][n] / m[i][i] for i in range(n)]


def poly(c, x):
    s = 0.0
    for a in reversed(c):
        s = s * x + a
    return s


def rel_err(c, x):
    return poly(c, x) / math.exp(x) - 1.0


def remez(iters=30):
    n = DEG + 2
    xs = [A * math.cos(math.pi * (n - 1 - i) / (n - 1)) for i in range(n)]
    c = None
    for _ in range(iters):
        # p(x_i) - e^x_i = (-1)^i E e^x_i
        rows = [[x ** j for j in range(DEG + 1)] + [-((-1) ** i) * math.exp(x)]
                for i, x in enumerate(xs)]
        sol = solve(rows, [math.exp(x) for x in xs])
        c = sol[:DEG + 1]
        # new reference: extrema of the error between sign changes, on a fine grid
        grid = [-A + 2 * A * k / 20000 for k in range(20001)]
        errs = [rel_err(c, x) for x in grid]
        ext, seg = [], [0]
        for k in range(1, len(grid)):
            if (errs[k] > 0) != (errs[k - 1] > 0):
                seg.append(k)
        seg.append(len(grid))
        for a, b in zip(seg, seg[1:]):
            k = max(range(a, b), key=lambda j: abs(errs[j]))
            ext.append(grid[k])
        if len(ext) == n:
            xs = ext
    return c


c = remez()
c32 = [f32(a) for a in c]
grid = [-A + 2 * A * k / 100000 for k in range(100001)]
print("max relative error, double coefficients: %.3e" % max(abs(rel_err(c, x)) for x in grid))
print("max relative error, float32 coefficients: %.3e" % max(abs(rel_err(c32, x)) for x in grid))
for i, a in enumerate(c32):
    print("#define SA_EXP_C%d %.9ef" % (i, a))
