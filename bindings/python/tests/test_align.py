"""libselfattn 1.3: causal alignment (Layer(causal="top_left" / "varlen")) and the scores out
(scores= on layer(...) and attend), against the float64 NumPy reference (reference.py) and, where
PyTorch is importable, against torch's own masks (is_causal = top-left, causal_lower_right =
bottom-right). Tolerances as test_v11.py."""
import numpy as np
import pytest

import selfattn
from selfattn import InvalidError
import reference as ref
from conftest import GRAD_TOL, TOL, make_layer, numeric_grads

WEIGHT_ATOL = 2e-5
S_TOL = 1e-5         # scores: |s - s_ref| <= S_TOL * (1 + |s_ref|); -inf exactly where masked

ALIGNS = [False, True, "bottom_right", "top_left", "varlen"]


def check_scores(got, want):
    inf = np.isinf(want)
    assert np.all(np.isneginf(got[inf]))
    assert np.all(np.abs(got[~inf] - want[~inf]) <= S_TOL * (1.0 + np.abs(want[~inf])))


def test_causal_values_read_back():
    layer = selfattn.Layer(16, 2)
    for value, back in ((False, False), (True, True), ("bottom_right", True), ("top_left", "top_left"),
                        ("varlen", "varlen"), (2, "top_left"), (3, "varlen"), (0, False),
                        ("TOP_LEFT", "top_left")):
        layer.causal = value
        assert layer.causal == back and type(layer.causal) is type(back)
    for value, back in (("top_left", "top_left"), ("varlen", "varlen"), (True, True)):
        assert selfattn.Layer(16, 2, causal=value).causal == back
    layer.causal = "varlen"
    with pytest.raises(ValueError):
        layer.causal = "bottom"
    for bad in (4, -1):
        with pytest.raises(InvalidError):
            layer.causal = bad
    assert layer.causal == "varlen"                 # unchanged
    assert selfattn.option_bounds("causal") == (0, 3)


@pytest.mark.parametrize("causal", ALIGNS)
@pytest.mark.parametrize("lq,lk", [(3, 7), (7, 7), (9, 5), (1, 6)])
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("extra", [{}, {"window": 3, "alibi": True}, {"softcap": 2.0}])
def test_attend_alignments(rng, causal, lq, lk, lengths, extra):
    h, kvh, hd = 4, 2, 4
    layer = selfattn.Layer(h * hd, h, n_kv_heads=kvh, causal=causal, **extra)
    q = rng.standard_normal((2, lq, h * hd)).astype(np.float32)
    k = rng.standard_normal((2, lk, kvh * hd)).astype(np.float32)
    v = rng.standard_normal((2, lk, kvh * hd)).astype(np.float32)
    kvl = [lk, lk // 2] if lengths else None
    opts = dict(causal=causal, kv_lengths=kvl, **extra)
    orf, wr, lr = ref.attend(q, k, v, h, kvh, hd, **opts)
    raw, capped, final, vis = ref.scores(q, k, h, kvh, hd, **opts)
    past = np.broadcast_to(np.arange(lk)[None, None, None, :] >=
                           np.asarray(kvl if kvl else [lk, lk])[:, None, None, None], raw.shape)
    for stage, want in enumerate((raw, capped, final)):
        want = np.where(past, -np.inf, want)
        o, w, lse, s = layer.attend(q, k, v, kv_lengths=kvl, return_weights=True, return_lse=True,
                                    scores=stage)
        assert ref.max_err(o, orf) <= TOL
        assert np.max(np.abs(w - wr)) <= WEIGHT_ATOL
        assert np.all(w[~vis] == 0)
        assert np.array_equal(np.isneginf(lse), np.isneginf(lr))
        fin = np.isfinite(lr)
        assert np.all(np.abs(lse[fin] - lr[fin]) <= 1e-4 * np.maximum(1.0, np.abs(lr[fin])))
        check_scores(s, want)
    # the stage by name, and a stage out of range
    s2 = layer.attend(q, k, v, kv_lengths=kvl, scores="final")[1]
    check_scores(s2, final)
    with pytest.raises(InvalidError):
        layer.attend(q, k, v, kv_lengths=kvl, scores=3)
    with pytest.raises(ValueError):
        layer.attend(q, k, v, kv_lengths=kvl, scores="logits")


@pytest.mark.parametrize("causal", ["top_left", "varlen", True])
@pytest.mark.parametrize("lq,lk", [(4, 6), (6, 4)])
def test_attend_backward_alignments(rng, causal, lq, lk):
    layer = selfattn.Layer(16, 4, n_kv_heads=2, causal=causal, window=4, alibi=True)
    q = rng.standard_normal((2, lq, 16)).astype(np.float32)
    k = rng.standard_normal((2, lk, 8)).astype(np.float32)
    v = rng.standard_normal((2, lk, 8)).astype(np.float32)
    dout = rng.standard_normal((2, lq, 16))
    kvl = [lk, 3]
    params = {"q": q.astype(np.float64), "k": k.astype(np.float64), "v": v.astype(np.float64)}

    def f(p):
        o, _, _ = ref.attend(p["q"], p["k"], p["v"], 4, 2, 4, causal=causal, kv_lengths=kvl,
                             window=4, alibi=True)
        return float(np.sum(o * dout))

    want = numeric_grads(f, params)
    got = layer.attend_backward(q, k, v, dout.astype(np.float32), kv_lengths=kvl)
    norm = max(np.max(np.abs(g)) for g in want.values())
    for name in ("q", "k", "v"):
        assert np.max(np.abs(got[name] - want[name])) <= GRAD_TOL * norm, name
    assert not np.any(got["k"][1, 3:]) and not np.any(got["v"][1, 3:])
    o, w = layer.attend(q, k, v, kv_lengths=kvl, return_weights=True)
    blind = w.sum(-1) == 0                           # [B][H][Lq] rows that see no key
    for b in range(2):
        for i in range(lq):
            if blind[b, :, i].all():
                assert not np.any(got["q"][b, i]) and not np.any(o[b, i])


@pytest.mark.parametrize("causal", ["top_left", "varlen"])
def test_layer_calls_take_2_and_3_as_1(rng, causal):
    layer, W = make_layer(rng, 16, 2, causal=True, window=3)
    x = rng.standard_normal((2, 6, 16)).astype(np.float32)
    lengths = [6, 4]
    y1, w1, s1 = layer(x, lengths, return_weights=True, scores=2)
    g1 = layer.backward(x, np.ones_like(x), lengths)
    layer.causal = causal
    y2, w2, s2 = layer(x, lengths, return_weights=True, scores=2)
    g2 = layer.backward(x, np.ones_like(x), lengths)
    assert np.array_equal(y1, y2) and np.array_equal(w1, w2) and np.array_equal(s1, s2)
    for name in g1:
        assert np.array_equal(g1[name], g2[name]), name


def test_forward_scores(rng):
    layer, W = make_layer(rng, 16, 2, causal=True, window=3, alibi=True, softcap=2.0)
    x = rng.standard_normal((2, 7, 16)).astype(np.float32)
    lengths = [7, 4]
    xd = x.astype(np.float64)
    q = xd @ W["w_q"].astype(np.float64).T + W["b_q"]
    k = xd @ W["w_k"].astype(np.float64).T + W["b_k"]
    raw, capped, final, _ = ref.scores(q, k, 2, 2, 8, causal=True, kv_lengths=lengths, window=3,
                                       alibi=True, softcap=2.0)
    for stage, want in enumerate((raw, capped, final)):
        want = want.copy()
        for b, n in enumerate(lengths):
            want[b, :, :, n:] = -np.inf
            want[b, :, n:, :] = -np.inf                # padding rows
        y, s = layer(x, lengths, scores=stage)
        check_scores(s, want)
    y2, s2 = layer(x[0], scores=0)                    # 2-D x: batch dimension dropped
    assert s2.shape == (2, 7, 7)


def test_against_torch_masks(rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    h, hd, lq, lk = 2, 8, 5, 9
    q = rng.standard_normal((1, lq, h * hd)).astype(np.float32)
    k = rng.standard_normal((1, lk, h * hd)).astype(np.float32)
    v = rng.standard_normal((1, lk, h * hd)).astype(np.float32)

    def heads(a):
        return torch.from_numpy(a).reshape(1, a.shape[1], h, hd).transpose(1, 2)

    def back(t):
        return t.transpose(1, 2).reshape(1, -1, h * hd).numpy()

    for lq_, lk_ in ((lq, lk), (lk, lq)):
        qq, kk, vv = q[:, :lq_], k[:, :lk_], v[:, :lk_]
        top_left = back(F.scaled_dot_product_attention(heads(qq), heads(kk), heads(vv),
                                                       is_causal=True))
        o = selfattn.Layer(h * hd, h, causal="top_left").attend(qq, kk, vv)
        assert ref.max_err(o, top_left) <= TOL
        try:
            from torch.nn.attention.bias import causal_lower_right
        except ImportError:
            continue
        mask = causal_lower_right(lq_, lk_)
        bottom_right = back(F.scaled_dot_product_attention(heads(qq), heads(kk), heads(vv),
                                                           attn_mask=mask))
        bottom_right = np.nan_to_num(bottom_right, nan=0.0)   # rows that see no key: zeros here
        for value in (True, "bottom_right", "varlen"):
            o = selfattn.Layer(h * hd, h, causal=value).attend(qq, kk, vv)
            assert ref.max_err(o, bottom_right) <= TOL
