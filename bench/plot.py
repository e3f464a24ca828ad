#!/usr/bin/env python3
"""Draws PNG plots from the Google Benchmark JSON that the libselfattn benchmarks write.

usage: python3 bench/plot.py [--out DIR] [--note TEXT] FILE.json [FILE.json ...]

Each file is recognised by the benchmarks it holds, and gives the plots it has data for, named
after the file (forward-coretype.json -> forward-coretype.png):
- selfattn-bench (pair/B/L/D/H/KV/mask/threads): forward GFLOP/s against seq_len L, full and
  causal, with the sgemm ceiling measured in the same benchmark and, when the JSON context has
  fma_peak_gflops_per_thread, the FMA peak times the thread count as a horizontal line;
- selfattn-bench-decode (decode/E/H/KV/ctx/threads[/2/1]): time of one decoding step against the
  number of cached positions, float32 and (/2/1) bf16 weights with an f16 cache side by side,
  each with the time of a plain read of the same bytes on as many threads (the read bound);
- selfattn-bench-backward (bwd_pair/... and bwd_train_pair/...): backward time / forward time
  against L.
Titles name the CPU and the OpenBLAS core, from the JSON context keys cpu_model and
openblas_corename (bench/report adds them; "unknown" when absent), and the run's date. --note
adds a line to every title (e.g. "shared machine, noisy"). Needs matplotlib (Debian:
python3-matplotlib); nothing else beyond the standard library.
"""
import argparse
import json
import os
import re
import sys


def load_runs(doc):
    """name -> counters of the median aggregate (or of the single run), errors left out."""
    res = {}
    for b in doc.get("benchmarks", []):
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        if b.get("error_occurred"):
            continue
        name = b.get("run_name", b["name"])
        name = re.sub(r"/(iterations:\d+|real_time|repeats:\d+)", "", name)
        res[name] = b
    return res


def machine(ctx):
    cpu = ctx.get("cpu_model") or "unknown CPU"
    core = ctx.get("openblas_corename") or "unknown"
    cores = ctx.get("num_cpus")
    date = (ctx.get("date") or "")[:10]
    text = f"{cpu}" + (f", {cores} CPUs" if cores else "") + f"; OpenBLAS core {core}"
    return text + (f"; {date}" if date else "")


def title(ax, what, ctx, note):
    lines = [what, machine(ctx)] + ([note] if note else [])
    ax.set_title("\n".join(lines), fontsize=9)


def finish_axes(ax, ticks, ticklabels, xlabel, ylabel, legend, what, ctx, note, tick_kw=None):
    """The log2 x axis, the labels, the grid, the legend (legend: its keyword arguments) and the
    title that every plot here shares."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.set_xticklabels(ticklabels, **(tick_kw or {}))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(**legend)
    title(ax, what, ctx, note)


def save_figure(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def fwd_series(runs):
    """{threads: {mask: [(L, config, fwd_GFLOPs, ceil_GFLOPs)]}} over batch-1 configurations, one
    configuration per L: the one with the most common (d_model, heads) when several share an L."""
    pts = {}
    for name, b in runs.items():
        m = re.fullmatch(r"pair/(\d+)/(\d+)/(\d+)/(\d+)/(\d+)/(full|causal)/(\d+)", name)
        if not m or m.group(1) != "1" or "fwd_GFLOPs" not in b:
            continue
        _, L, D, H, KV, mask, t = m.groups()
        pts.setdefault((int(t), mask, int(L)), []).append(
            ((int(D), int(H), int(KV)), b["fwd_GFLOPs"], b["ceil_GFLOPs"]))
    counts = {}
    for cands in pts.values():
        for c in cands:
            counts[c[0]] = counts.get(c[0], 0) + 1
    out = {}
    for (t, mask, L), cands in sorted(pts.items()):
        cfg, f, c = max(cands, key=lambda c_: (counts[c_[0]], c_[0][2] == c_[0][1]))
        out.setdefault(t, {}).setdefault(mask, []).append((L, cfg, f, c))
    return out


def plot_forward(plt, runs, ctx, path, note):
    series = fwd_series(runs)
    if not series:
        return False
    threads = sorted(series)
    fig, axes = plt.subplots(1, len(threads), figsize=(5.5 * len(threads), 4.6), squeeze=False)
    peak = ctx.get("fma_peak_gflops_per_thread")
    try:
        peak = float(peak) if peak is not None else None
    except ValueError:
        peak = None
    colors = {"full": "tab:blue", "causal": "tab:orange"}
    for ax, t in zip(axes[0], threads):
        ls = []
        for mask in ("full", "causal"):
            pts = series[t].get(mask, [])
            if not pts:
                continue
            x = [p[0] for p in pts]
            ax.plot(x, [p[2] for p in pts], "o-", color=colors[mask], label=f"forward, {mask}")
            ax.plot(x, [p[3] for p in pts], "s--", color=colors[mask], alpha=0.6,
                    label=f"sgemm ceiling, {mask}")
            ls = sorted(set(ls) | {(p[0], p[1]) for p in pts})
        if peak:
            ax.axhline(peak * t, color="tab:red", lw=1, ls=":",
                       label=f"FMA peak x {t} thread{'s' if t > 1 else ''} ({peak * t:.0f})")
        finish_axes(ax, [L for L, _ in ls],
                    [f"{L}\n{c[0]}/{c[1]}" + (f"/kv{c[2]}" if c[2] != c[1] else "")
                     for L, c in ls],
                    "seq_len L (d_model/heads below), batch 1", "GFLOP/s (work actually needed)",
                    {"fontsize": 7, "loc": "lower right"},
                    f"selfattn_forward, {t} thread{'s' if t > 1 else ''}", ctx, note,
                    {"fontsize": 7})
    return save_figure(plt, fig, path)


def plot_decode(plt, runs, ctx, path, note):
    """Step time against cached positions, float32 and bf16 weights + f16 cache side by side,
    each thread count with the plain read of the step's bytes on as many threads (dashed)."""
    pts = {}
    shape = None
    for name, b in runs.items():
        m = re.fullmatch(r"decode/(\d+)/(\d+)/(\d+)/(\d+)/(\d+)(/2/1)?", name)
        if not m or "step_us" not in b:
            continue
        E, H, KV, n, t = (int(g) for g in m.groups()[:5])
        shape = shape or (E, H, KV)
        if (E, H, KV) != shape:
            continue
        pts.setdefault((m.group(6) is not None, t), []).append((n, b["step_us"], b["read_us"]))
    if not pts:
        return False
    kinds = sorted({k for k, _ in pts})
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.0 * len(kinds), 4.6), squeeze=False,
                             sharey=True)
    titles = {False: "float32 weights and cache", True: "bf16 weights, f16 cache"}
    colors = {1: "tab:blue", 2: "tab:orange"}
    E, H, KV = shape
    for ax, kind in zip(axes[0], kinds):
        xs = set()
        for t in sorted(t for k, t in pts if k == kind):
            p = sorted(pts[(kind, t)])
            xs |= {q[0] for q in p}
            th = f"{t} thread{'s' if t > 1 else ''}"
            c = colors.get(t)
            ax.plot([q[0] for q in p], [q[1] / 1e3 for q in p], "o-", color=c,
                    label=f"decode step, {th}")
            ax.plot([q[0] for q in p], [q[2] / 1e3 for q in p], "--", color=c,
                    label=f"plain read of its bytes, {th}")
        x = sorted(xs)
        finish_axes(ax, x, [str(n) for n in x], "cached positions",
                    "ms per step (one token, one sequence)", {"fontsize": 8},
                    f"selfattn_forward_cached, {titles[kind]}\n"
                    f"d_model {E}, {H} heads, {KV} K/V heads of {E // H}, RoPE", ctx, note)
    return save_figure(plt, fig, path)


def plot_backward(plt, runs, ctx, path, note):
    pts = {}
    shape = None
    for name, b in runs.items():
        m = re.fullmatch(r"(bwd|bwd_train)_pair/1/(\d+)/(\d+)/(\d+)/(full|causal)/(\d+)", name)
        if not m or "ratio" not in b:
            continue
        kind, L, D, H, mask, t = m.groups()
        shape = shape or (D, H, t)
        pts.setdefault((kind, mask), []).append((int(L), b["ratio"]))
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    names = {"bwd": "selfattn_backward / selfattn_forward (recomputes)",
             "bwd_train": "selfattn_backward_train / selfattn_forward_train (kept activations)"}
    styles = {"full": "o-", "causal": "s--"}
    ls = set()
    for (kind, mask) in sorted(pts):
        p = sorted(pts[(kind, mask)])
        ls |= {q[0] for q in p}
        ax.plot([q[0] for q in p], [q[1] for q in p], styles[mask],
                color="tab:blue" if kind == "bwd" else "tab:green", label=f"{names[kind]}, {mask}")
    D, H, t = shape
    finish_axes(ax, sorted(ls), [str(L) for L in sorted(ls)], "seq_len L, batch 1",
                "backward time / forward time", {"fontsize": 7, "loc": "lower right"},
                f"backward / forward, d_model {D}, {H} heads, {t} thread{'s' if t != '1' else ''}, "
                "dx and every weight gradient", ctx, note)
    return save_figure(plt, fig, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", help="Google Benchmark JSON files")
    ap.add_argument("--out", default=".", help="directory for the PNG files (default: .)")
    ap.add_argument("--note", default="", help="a line added to every title")
    a = ap.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("bench/plot.py: matplotlib is missing (Debian: apt-get install python3-matplotlib)")
    os.makedirs(a.out, exist_ok=True)
    written = []
    for f in a.files:
        with open(f) as fh:
            doc = json.load(fh)
        runs, ctx = load_runs(doc), doc.get("context", {})
        stem = os.path.splitext(os.path.basename(f))[0]
        for plot in (plot_forward, plot_decode, plot_backward):
            path = os.path.join(a.out, stem + ".png")
            if plot(plt, runs, ctx, path, a.note):
                written.append(path)
                break
    for p in written:
        print(f"bench/plot.py: wrote {p}")
    if not written:
        sys.exit("bench/plot.py: no plottable benchmarks in " + ", ".join(a.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
