#!/usr/bin/env python3
"""Training step time of one self-attention layer, 1 thread: PyTorch's nn.MultiheadAttention
(forward + backward: dx and every weight gradient) against libselfattn through its Python
binding (layer(x), then layer.backward(x, dy): the library recomputes the forward inside its
backward, so this is what a training step costs with it). Also checks that both give the same
gradients.

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
    print("%6s %12s %12s %8s   %s" % ("L", "torch ms", "selfattn ms", "ratio", "max rel. diff of grads"))
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

        tt, tl = [], []
        torch_step()
        g = lib_step()
        for i in range(args.repeats):
            for which in ((0, 1) if i % 2 == 0 else (1, 0)):
                t0 = time.perf_counter()
                if which == 0:
                    torch_step()
                else:
                    g = lib_step()
                (tt if which == 0 else tl).append(time.perf_counter() - t0)
        ref = {"x": xt.grad.numpy()[0],
               "w_qkv": mha.in_proj_weight.grad.numpy(), "w_o": mha.out_proj.weight.grad.numpy()}
        mine = {"x": g["x"][0] if g["x"].ndim == 3 else g["x"],
                "w_qkv": np.concatenate([g["w_q"], g["w_k"], g["w_v"]]), "w_o": g["w_o"]}
        diff = max(float(np.abs(mine[k] - ref[k]).max() / np.abs(ref[k]).max()) for k in ref)
        mt, ml = statistics.median(tt) * 1e3, statistics.median(tl) * 1e3
        print("%6d %12.1f %12.1f %8.2f   %.1e" % (L, mt, ml, ml / mt, diff))


if __name__ == "__main__":
    main()
