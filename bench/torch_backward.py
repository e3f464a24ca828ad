#!/usr/bin/env python3
"""Training step time of one self-attention layer, 1 thread: PyTorch's nn.MultiheadAttention
(forward + backward: dx and every weight gradient) against libselfattn through its Python
binding, two ways: "recompute" is layer(x) then layer.backward(x, dy) (the backward recomputes the
forward inside), "kept" is layer.forward_train(x) then layer.backward_train(x, dy, state) (1.2:
the forward keeps Q, K, V, O and lse, as PyTorch's autograd keeps its activations). Also checks
that the gradients agree.

    SELFATTN_LIBRARY=build/libselfattn.so.1 PYTHONPATH=bindings/python \\
        /usr/bin/python3 bench/torch_backward.py [--lengths 512 2048] [--causal] [--repeats 7]

Medians of alternating runs (the two take turns, so a noisy machine slows both alike)."""
import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import torch

import selfattn


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    d, h = args.d_model, args.heads
    mha = torch.nn.MultiheadAttention(d, h, batch_first=True)
    W = {"w_qkv": mha.in_proj_weight.detach().numpy(), "b_qkv": mha.in_proj_bias.detach().numpy(),
         "w_o": mha.out_proj.weight.detach().numpy(), "b_o": mha.out_proj.bias.detach().numpy()}
    layer = selfattn.Layer(d, h, causal=args.causal, threads=1)
    layer.set_weights(w_q=W["w_qkv"][:d], w_k=W["w_qkv"][d:2 * d], w_v=W["w_qkv"][2 * d:],
                      b_q=W["b_qkv"][:d], b_k=W["b_qkv"][d:2 * d], b_v=W["b_qkv"][2 * d:],
                      w_o=W["w_o"], b_o=W["b_o"])
    print("d_model %d, %d heads, batch 1, %s, 1 thread; torch %s, libselfattn %s" %
          (d, h, "causal" if args.causal else "full", torch.__version__, selfattn.version()))
    kept = selfattn.has("selfattn_backward_train")
    print("%6s %10s %14s %10s %11s %10s   %s" % ("L", "torch ms", "recompute ms", "speed-up",
                                                "kept ms", "speed-up", "max rel. diff of grads"))
    for L in args.lengths:
        rng = np.random.default_rng(L)
        x = rng.standard_normal((1, L, d)).astype(np.float32)
        dy = rng.standard_normal((1, L, d)).astype(np.float32)
        xt = torch.from_numpy(x).requires_grad_(True)
        dyt = torch.from_numpy(dy)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(L) if args.causal else None

        def torch_step():
            mha.zero_grad(set_to_none=True)
            xt.grad = None
            y, _ = mha(xt, xt, xt, attn_mask=mask, need_weights=False)
            y.backward(dyt)

        def lib_step():
            layer(x)
            return layer.backward(x, dy)

        def kept_step():
            _, state = layer.forward_train(x)
            return layer.backward_train(x, dy, state)

        steps = [torch_step, lib_step] + ([kept_step] if kept else [])
        times = [[] for _ in steps]
        results = [f() for f in steps]  # warm-up
        for i in range(args.repeats):
            # every order in turn, so that a noisy machine slows each alike
            order = list(range(len(steps)))
            order = order[i % len(order):] + order[:i % len(order)]
            for which in order:
                t0 = time.perf_counter()
                results[which] = steps[which]()
                times[which].append(time.perf_counter() - t0)
        g = results[1]
        ref = {"x": xt.grad.numpy()[0],
               "w_qkv": mha.in_proj_weight.grad.numpy(), "w_o": mha.out_proj.weight.grad.numpy()}
        mine = {"x": g["x"][0] if g["x"].ndim == 3 else g["x"],
                "w_qkv": np.concatenate([g["w_q"], g["w_k"], g["w_v"]]), "w_o": g["w_o"]}
        diff = max(float(np.abs(mine[k] - ref[k]).max() / np.abs(ref[k]).max()) for k in ref)
        if kept:
            gk = results[2]
            diff = max(diff, float(np.abs(gk["x"] - g["x"]).max() / np.abs(g["x"]).max()))
        med = [statistics.median(t) * 1e3 for t in times]
        mk = med[2] if kept else float("nan")
        print("%6d %10.1f %14.1f %9.2fx %11.1f %9.2fx   %.1e" %
              (L, med[0], med[1], med[0] / med[1], mk, med[0] / mk, diff))


if __name__ == "__main__":
    main()
