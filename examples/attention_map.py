#!/usr/bin/env python3
"""Draw the attention weights of a libselfattn layer as heatmaps (one panel per head, query
tokens down, key tokens across) into a PNG, with the Python binding and matplotlib (Agg).

    SELFATTN_LIBRARY=build/libselfattn.so.1 PYTHONPATH=bindings/python \
        /usr/bin/python3 examples/attention_map.py [--weights FILE.npz] [--causal] out.png

--weights: a .npz with w_q, w_k, w_v, w_o ([out][in], as torch.nn.Linear), optional b_q, b_k,
b_v, b_o, the integers d_model and n_heads, optionally n_kv_heads, tokens (strings) and x
([seq][d_model] inputs; without it each token gets a fixed pseudo-random embedding derived from
its text, plus sinusoidal positions), and optionally the layer options the weights were trained
with: causal, window, rope, rope_dims, alibi (integers), rope_theta, softcap (reals), as
examples/train.c writes them. Without --weights: random weights, d_model 64, 4 heads.

The weights come from the library (layer(x, return_weights=True), selfattn_forward_ex of
libselfattn 1.1). With an older library they are computed in NumPy from the same weights, and
the figure's title says so."""
import argparse
import hashlib
import sys

import numpy as np

import selfattn

SAMPLE = "the cat sat on the mat because it was warm and the dog sat on the rug".split()


def token_embedding(tok, d):
    seed = int.from_bytes(hashlib.sha256(tok.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(d)


def positions(n, d):
    ang = np.arange(n)[:, None] / 10000.0 ** (2 * np.arange((d + 1) // 2)[None, :] / d)
    pe = np.zeros((n, d))
    pe[:, 0::2], pe[:, 1::2] = np.sin(ang), np.cos(ang)[:, : d // 2]
    return pe


def numpy_weights(x, W, n_heads, n_kv_heads, causal, scale=None):
    """softmax(Q K^T * scale) per head in float64, as the library computes it (no window etc.)."""
    x = x.astype(np.float64)
    L, d = x.shape
    q = x @ W["w_q"].T + W.get("b_q", 0)
    k = x @ W["w_k"].T + W.get("b_k", 0)
    hd = q.shape[1] // n_heads
    Q = q.reshape(L, n_heads, hd).transpose(1, 0, 2)
    K = np.repeat(k.reshape(L, n_kv_heads, hd).transpose(1, 0, 2), n_heads // n_kv_heads, axis=0)
    s = Q @ K.transpose(0, 2, 1) * (scale or 1 / np.sqrt(hd))
    if causal:
        s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
    s -= s.max(axis=-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=-1, keepdims=True)


def load(args):
    if args.weights:
        z = np.load(args.weights, allow_pickle=False)
        d, h = int(z["d_model"]), int(z["n_heads"])
        kv = int(z["n_kv_heads"]) if "n_kv_heads" in z else h
        W = {k: z[k].astype(np.float32) for k in
             ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o") if k in z}
        tokens = [str(t) for t in z["tokens"]] if "tokens" in z else None
        opts = {k: int(z[k]) for k in ("window", "rope", "rope_dims", "alibi") if k in z}
        opts.update({k: float(z[k]) for k in ("rope_theta", "softcap") if k in z})
        if "causal" in z and int(z["causal"]):
            args.causal = True
        x = z["x"].astype(np.float32) if "x" in z else None
        if tokens is None:
            tokens = SAMPLE[: (len(x) if x is not None else len(SAMPLE))]
            if x is not None and len(tokens) < len(x):
                tokens = ["t%d" % i for i in range(len(x))]
        source = args.weights
    else:
        d, h, kv = 64, 4, 4
        rng = np.random.default_rng(args.seed)
        # sharper than a 1/sqrt(d) initialisation, so that heads show distinct patterns
        W = {n: (rng.standard_normal((d, d)) * (2.5 if n in ("w_q", "w_k") else 1.0)
                 / np.sqrt(d)).astype(np.float32) for n in ("w_q", "w_k", "w_v", "w_o")}
        tokens, x, source = SAMPLE, None, "random weights (seed %d)" % args.seed
        opts = {}
    if x is None:
        x = np.stack([token_embedding(t, d) for t in tokens]) + positions(len(tokens), d)
        x = x.astype(np.float32)
    return d, h, kv, W, tokens, x, source, opts


def main():
    ap = argparse.ArgumentParser(description="Heatmaps of a layer's attention weights.")
    ap.add_argument("output", help="PNG file to write")
    ap.add_argument("--weights", help=".npz of layer weights (see the module docstring)")
    ap.add_argument("--causal", action="store_true", help="causal mask")
    ap.add_argument("--window", type=int, default=None, help="sliding window (libselfattn 1.1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = ap.parse_args()

    d, h, kv, W, tokens, x, source, opts = load(args)
    if args.window is not None:
        opts["window"] = args.window
    layer = selfattn.Layer(d, h, n_kv_heads=kv, causal=args.causal, **opts)
    layer.set_weights(**W)
    if selfattn.has("selfattn_forward_ex") or opts:
        _, w = layer(x, return_weights=True)          # [n_heads][seq][seq]
        how = "weights from libselfattn %s (selfattn_forward_ex)" % selfattn.version()
    else:
        w = numpy_weights(x, W, h, kv, args.causal)
        how = ("weights computed in NumPy: libselfattn %s lacks selfattn_forward_ex"
               % selfattn.version())

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = int(np.ceil(np.sqrt(h)))
    rows = (h + cols - 1) // cols
    n = len(tokens)
    size = 0.23 * n + 1.2
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size + 1.2, rows * size + 0.6),
                             squeeze=False, layout="constrained")
    for i, ax in enumerate(axes.flat):
        if i >= h:
            ax.axis("off")
            continue
        im = ax.imshow(w[i], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title("head %d" % i, fontsize=9)
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels(tokens, rotation=90, fontsize=7)
        ax.set_yticklabels(tokens, fontsize=7)
        ax.set_xlabel("key", fontsize=8)
        if i % cols == 0:
            ax.set_ylabel("query", fontsize=8)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="attention weight")
    mask = "causal" if args.causal else "full"
    if opts.get("window"):
        mask += ", window %d" % opts["window"]
    if opts.get("rope"):
        mask += ", RoPE"
    fig.suptitle("d_model %d, %d heads, %s attention; %s\n%s" % (d, h, mask, source, how),
                 fontsize=9)
    fig.savefig(args.output, dpi=80, bbox_inches="tight")
    print("wrote %s (%s)" % (args.output, how))


if __name__ == "__main__":
    sys.exit(main())
