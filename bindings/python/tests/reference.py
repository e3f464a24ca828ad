"""Float64 NumPy reference of libselfattn's contract (the public header, include/selfattn/selfattn.h), independent of the library.

Everything here is written from the contract, not from the C code: projections, per-head
softmax attention, grouped-query heads via repeat_interleave, causal masks aligned bottom-right,
lengths (padding rows zero), the output projection on or off, and the 1.1 additions (window,
RoPE, ALiBi, softcap, additive bias, weights and log-sum-exp)."""
import math

import numpy as np

WEIGHT_NAMES = ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")


def alibi_slopes(n):
    """Press et al. 2022 slopes, with BLOOM/MPT's rule for head counts that are not powers of 2."""
    def pow2(m):
        start = 2.0 ** (-8.0 / m)
        return [start ** (i + 1) for i in range(m)]
    if n & (n - 1) == 0:
        return np.array(pow2(n))
    c = 2 ** int(math.floor(math.log2(n)))
    return np.array(pow2(c) + pow2(2 * c)[0::2][: n - c])


def rope(t, pos, mode, r, theta):
    """Rotate the leading r dims of each head of t [..., L, H, hd] at positions pos [L]."""
    if not mode:
        return t
    half = r // 2
    inv = theta ** (-2.0 * np.arange(half) / r)
    ang = np.asarray(pos, np.float64)[:, None] * inv[None, :]          # [L][half]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]          # [L][1][half]
    if mode == 1:   # rotate-half: pairs (d, d + r/2)
        i1 = np.arange(half)
        i2 = i1 + half
    else:           # adjacent: pairs (2d, 2d + 1)
        i1 = 2 * np.arange(half)
        i2 = i1 + 1
    out = t.copy()
    a, b = t[..., i1], t[..., i2]
    out[..., i1] = a * cos - b * sin
    out[..., i2] = b * cos + a * sin
    return out


_CAUSAL = {False: 0, True: 1, "bottom_right": 1, "top_left": 2, "varlen": 3}


def scores(q, k, n_heads, n_kv_heads, head_dim, *, causal=False, scale=None, kv_lengths=None,
           window=0, alibi=False, softcap=0.0, bias=None):
    """(raw, capped, final, vis) [B][H][Lq][Lk] in float64: (q.k)*scale, after the softcap, the
    final scores (ALiBi, bias; -inf where not visible) and the visibility. causal: False, True
    (= 1, "bottom_right": query i at position Lk - Lq + i), 2 / "top_left" (at i), 3 / "varlen"
    (at kv_lengths[b] - Lq + i; Lk - Lq + i without lengths); key j at position j."""
    q, k = (np.asarray(a, np.float64) for a in (q, k))
    B, Lq, Lk = q.shape[0], q.shape[1], k.shape[1]
    H, KV, hd = n_heads, n_kv_heads, head_dim
    align = _CAUSAL[causal] if isinstance(causal, (str, bool)) else int(causal)
    Q = q.reshape(B, Lq, H, hd).transpose(0, 2, 1, 3)
    K = np.repeat(k.reshape(B, Lk, KV, hd).transpose(0, 2, 1, 3), H // KV, axis=1)
    if scale is None or scale == 0:
        scale = 1.0 / math.sqrt(hd)
    raw = Q @ K.transpose(0, 1, 3, 2) * scale                             # [B][H][Lq][Lk]
    s = softcap * np.tanh(raw / softcap) if softcap else raw
    capped = s
    lens = np.full(B, Lk) if kv_lengths is None else np.asarray(kv_lengths)
    if align == 2:
        off = np.zeros(B)
    elif align == 3:
        off = lens - Lq
    else:
        off = np.full(B, Lk - Lq)
    qpos = off[:, None] + np.arange(Lq)[None, :]                          # [B][Lq]
    kpos = np.arange(Lk)
    dist = qpos[:, :, None] - kpos[None, None, :]                         # [B][Lq][Lk]
    if alibi:
        d = dist if align else np.abs(dist)
        s = s - alibi_slopes(H)[None, :, None, None] * d[:, None]
    if bias is not None:
        s = s + np.broadcast_to(np.asarray(bias, np.float64), s.shape)
    vis = np.ones((B, Lq, Lk), bool)
    if align:
        vis &= dist >= 0
    if window:
        vis &= (dist < window) if align else (np.abs(dist) < window)
    vis &= (kpos[None, :] < lens[:, None])[:, None, :]
    vis = np.broadcast_to(vis[:, None], s.shape)
    with np.errstate(invalid="ignore"):
        final = np.where(vis, s, -np.inf)
    return raw, capped, final, vis


def attend(q, k, v, n_heads, n_kv_heads, head_dim, *, causal=False, scale=None, kv_lengths=None,
           window=0, alibi=False, softcap=0.0, bias=None, v_head_dim=None):
    """(out [B][Lq][H*dv], weights [B][H][Lq][Lk], lse [B][H][Lq]) in float64, dv = v_head_dim
    (default head_dim; v is [B][Lk][KV*dv]). Query i is at position Lk - Lq + i (causal
    "top_left": i; "varlen": kv_lengths[b] - Lq + i), key j at position j."""
    B, Lq, Lk = q.shape[0], q.shape[1], k.shape[1]
    H, KV, hd = n_heads, n_kv_heads, head_dim
    dv = v_head_dim or hd
    V = np.repeat(np.asarray(v, np.float64).reshape(B, Lk, KV, dv).transpose(0, 2, 1, 3), H // KV,
                  axis=1)
    _, _, s, vis = scores(q, k, n_heads, n_kv_heads, head_dim, causal=causal, scale=scale,
                          kv_lengths=kv_lengths, window=window, alibi=alibi, softcap=softcap,
                          bias=bias)
    with np.errstate(invalid="ignore"):
        s = np.where(vis, s, -np.inf)
        m = s.max(axis=-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        e = np.where(vis, np.exp(s - m), 0.0)
    den = e.sum(axis=-1, keepdims=True)
    w = np.where(den > 0, e / np.where(den > 0, den, 1.0), 0.0)
    with np.errstate(divide="ignore"):
        lse = np.where(den > 0, np.log(np.where(den > 0, den, 1.0)) + m, -np.inf)[..., 0]
    o = (w @ V).transpose(0, 2, 1, 3).reshape(B, Lq, H * dv)
    return o, w, lse


def forward(x, W, n_heads, *, n_kv_heads=None, head_dim=None, causal=False, out_proj=True,
            scale=None, lengths=None, window=0, rope_mode=0, rope_dims=None, rope_theta=10000.0,
            alibi=False, softcap=0.0, bias=None, v_head_dim=None):
    """(y [B][L][D], weights [B][H][L][L], lse [B][H][L]) of the whole layer in float64.
    W: dict of w_q, w_k, w_v, (w_o), optional b_*; missing biases are zero. v_head_dim: the
    value heads' width dv (default head_dim; w_v [KV*dv][D], w_o [D][H*dv])."""
    x = np.asarray(x, np.float64)
    B, L, D = x.shape
    n_kv_heads = n_kv_heads or n_heads
    head_dim = head_dim or D // n_heads

    def lin(name, bname, inp):
        out = inp @ np.asarray(W[name], np.float64).T
        if W.get(bname) is not None:
            out = out + np.asarray(W[bname], np.float64)
        return out

    q, k, v = lin("w_q", "b_q", x), lin("w_k", "b_k", x), lin("w_v", "b_v", x)
    if rope_mode:
        r = rope_dims or head_dim
        pos = np.arange(L)
        qh = q.reshape(B, L, n_heads, head_dim)
        kh = k.reshape(B, L, n_kv_heads, head_dim)
        qh = np.concatenate([rope(qh[..., :r], pos, rope_mode, r, rope_theta), qh[..., r:]], -1)
        kh = np.concatenate([rope(kh[..., :r], pos, rope_mode, r, rope_theta), kh[..., r:]], -1)
        q, k = qh.reshape(B, L, -1), kh.reshape(B, L, -1)
    o, w, lse = attend(q, k, v, n_heads, n_kv_heads, head_dim, causal=causal, scale=scale,
                       kv_lengths=lengths, window=window, alibi=alibi, softcap=softcap, bias=bias,
                       v_head_dim=v_head_dim)
    y = lin("w_o", "b_o", o) if out_proj else o
    if lengths is not None:
        for b, n in enumerate(lengths):
            y[b, n:] = 0.0
            w[b, :, n:, :] = 0.0
            lse[b, :, n:] = -np.inf
    return y, w, lse


def max_err(got, ref):
    """max |got - ref| / max(max |ref|, 1e-30): the error measure the C tests use."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref), initial=0.0) / max(np.max(np.abs(ref), initial=0.0), 1e-30))


def random_weights(rng, d_model, n_heads, n_kv_heads=None, head_dim=None, out_proj=True,
                   biases=True, v_head_dim=None):
    """float32 weights (scaled 1/sqrt(fan_in)) and biases for a layer of that shape."""
    n_kv_heads = n_kv_heads or n_heads
    head_dim = head_dim or d_model // n_heads
    dv = v_head_dim or head_dim
    q, kv = n_heads * head_dim, n_kv_heads * head_dim
    qv, kvv = n_heads * dv, n_kv_heads * dv
    shapes = {"w_q": (q, d_model), "w_k": (kv, d_model), "w_v": (kvv, d_model),
              "b_q": (q,), "b_k": (kv,), "b_v": (kvv,)}
    if out_proj:
        shapes.update(w_o=(d_model, qv), b_o=(d_model,))
    W = {}
    for n, s in shapes.items():
        if n.startswith("b") and not biases:
            continue
        fan_in = s[-1] if len(s) == 2 else 4
        W[n] = (rng.standard_normal(s) / math.sqrt(fan_in)).astype(np.float32)
    return W
