"""The libselfattn 1.1 additions (include/selfattn/selfattn.h, the 1.1 additions) through the binding: extras
(additive bias, weights, log-sum-exp), window, RoPE, ALiBi, softcap, the key/value cache and
gradients. Each test is skipped, with the reason, while the loaded library lacks the function or
option it needs; they are written against the contract and run as soon as the C side lands."""
import numpy as np
import pytest

import selfattn
from selfattn import InvalidError, StateError, _lib
from selfattn._layer import _bias_view
import reference as ref
from conftest import (GRAD_TOL, TOL, check_grads, grad_problem, make_layer, needs, needs_option,
                      numeric_grads, option_known, ref_opts)

WEIGHT_ATOL = 2e-5   # softmax probabilities: max abs error
LSE_TOL = 1e-4       # log-sum-exp: abs error <= LSE_TOL * max(1, |lse|); -inf exactly


def check_lse(got, want):
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    fin = np.isfinite(want)
    assert np.all(np.abs(got[fin] - want[fin]) <= LSE_TOL * np.maximum(1.0, np.abs(want[fin])))


# ---- the bias view (pure Python: runs with any library) ----------------------------------------
@pytest.mark.parametrize("shape", [(), (7,), (5, 7), (5, 1), (3, 1, 7), (2, 1, 5, 7), (2, 3, 5, 7),
                                   (1, 3, 1, 1), (2, 1, 1, 7)])
def test_bias_view_strides(rng, shape):
    """The (pointer, strides in floats) handed to C describe exactly np.broadcast_to(bias)."""
    full = (2, 3, 5, 7)
    bias = rng.standard_normal(shape)
    keep, ptr, sb, sh, sr = _bias_view(bias, full)
    assert ptr == keep.ctypes.data and keep.dtype == np.float32
    assert min(sb, sh, sr) >= 0
    view = np.lib.stride_tricks.as_strided(keep, shape=full, strides=(sb * 4, sh * 4, sr * 4, 4))
    np.testing.assert_array_equal(view, np.broadcast_to(bias.astype(np.float32), full))
    if len(shape) == 4 and shape[-1] == 7:
        assert keep.size == bias.size                  # no expansion: broadcast by strides


def test_bias_view_non_contiguous_and_errors(rng):
    full = (1, 2, 4, 4)
    b = rng.standard_normal((4, 4)).astype(np.float32)
    for v in (b.T, b[::-1], b[:, ::-1]):
        keep, ptr, sb, sh, sr = _bias_view(v, full)
        view = np.lib.stride_tricks.as_strided(keep, shape=full, strides=(sb * 4, sh * 4, sr * 4, 4))
        np.testing.assert_array_equal(view, np.broadcast_to(v, full))
    with pytest.raises(ValueError):
        _bias_view(np.zeros((3, 4)), full)
    with pytest.raises(ValueError):
        _bias_view(np.zeros((1, 1, 1, 4, 4)), full)
    with pytest.raises(TypeError):
        _bias_view(np.ones((4, 4), bool), full)


# ---- extras: weights, lse, additive bias --------------------------------------------------------
FX = [
    (2, 9, 32, 4, {"n_kv_heads": 2, "causal": True}, [9, 5]),
    (1, 7, 24, 3, {}, None),
    (2, 70, 64, 4, {"causal": True}, [70, 1]),
]


@needs("selfattn_forward_ex")
@pytest.mark.parametrize("case", FX, ids=["gqa-causal-len", "full", "long"])
def test_forward_ex_weights_and_lse(rng, case):
    batch, seq, d, h, opts, lengths = case
    layer, W = make_layer(rng, d, h, **opts)
    x = rng.standard_normal((batch, seq, d)).astype(np.float32)
    yr, wr, lr = ref.forward(x, W, h, lengths=lengths, **ref_opts(layer))
    y, w, lse = layer(x, lengths, return_weights=True, return_lse=True)
    assert w.shape == (batch, h, seq, seq) and lse.shape == (batch, h, seq)
    assert ref.max_err(y, yr) <= TOL
    assert np.max(np.abs(w - wr)) <= WEIGHT_ATOL
    check_lse(lse, lr)
    np.testing.assert_array_equal(y, layer(x, lengths))          # same y as the plain call
    y1, w1 = layer(x, lengths, return_weights=True)
    y2, l2 = layer(x, lengths, return_lse=True)
    np.testing.assert_array_equal(w1, w)
    np.testing.assert_array_equal(l2, lse)
    y2d, w2d, l2d = layer(x[0], return_weights=True, return_lse=True)
    assert w2d.shape == (h, seq, seq) and l2d.shape == (h, seq) and y2d.shape == (seq, d)


BIAS_SHAPES = [(6, 6), (4, 1, 6), (2, 1, 6, 6), (2, 4, 6, 6), (6, 1), (), (1, 4, 1, 1)]


@needs("selfattn_forward_ex")
@pytest.mark.parametrize("shape", BIAS_SHAPES, ids=[str(s) for s in BIAS_SHAPES])
def test_attn_bias_broadcasts(rng, shape):
    layer, W = make_layer(rng, 32, 4, causal=True)
    x = rng.standard_normal((2, 6, 32)).astype(np.float32)
    bias = rng.standard_normal(shape)
    yr, wr, lr = ref.forward(x, W, 4, bias=bias, **ref_opts(layer))
    y, w, lse = layer(x, attn_bias=bias, return_weights=True, return_lse=True)
    assert ref.max_err(y, yr) <= TOL
    assert np.max(np.abs(w - wr)) <= WEIGHT_ATOL
    check_lse(lse, lr)


@needs("selfattn_forward_ex")
def test_attn_bias_masks_and_blind_rows(rng):
    """-inf masks keys; a row whose keys are all masked gives y = b_O, weights 0, lse -inf;
    NaN in the bias at causally masked keys has no effect."""
    layer, W = make_layer(rng, 32, 4, causal=True)
    x = rng.standard_normal((1, 6, 32)).astype(np.float32)
    bias = np.zeros((6, 6), np.float32)
    bias[:, 1] = -np.inf
    bias[3, :] = -np.inf                                    # row 3 sees nothing
    bias[np.triu_indices(6, 1)] = np.nan                    # causal-future: never read
    keep = bias.copy()
    y, w, lse = layer(x, attn_bias=bias, return_weights=True, return_lse=True)
    np.testing.assert_array_equal(bias, keep)
    yr, wr, lr = ref.forward(x, W, 4, bias=np.where(np.isnan(bias), 0.0, bias), **ref_opts(layer))
    assert np.all(np.isfinite(y))
    assert ref.max_err(y, yr) <= TOL
    np.testing.assert_allclose(y[0, 3], W["b_o"], rtol=0, atol=1e-6)
    assert not np.any(w[0, :, 3]) and np.all(np.isneginf(lse[0, :, 3]))
    assert np.all(w[0, :, :, 1] == 0), \
        "weights at keys masked by a -inf bias must be exactly 0 (the header), got up to %g" % np.max(w[0, :, :, 1])


@needs("selfattn_attend_ex")
def test_attend_ex(rng):
    layer = selfattn.Layer(32, 4, n_kv_heads=2, causal=True)
    q = rng.standard_normal((2, 3, 32)).astype(np.float32)
    k = rng.standard_normal((2, 8, 16)).astype(np.float32)
    v = rng.standard_normal((2, 8, 16)).astype(np.float32)
    bias = rng.standard_normal((1, 4, 3, 8))
    kvl = [8, 2]
    o, w, lse = layer.attend(q, k, v, kv_lengths=kvl, attn_bias=bias, return_weights=True,
                             return_lse=True)
    orf, wr, lr = ref.attend(q, k, v, 4, 2, 8, causal=True, kv_lengths=kvl, bias=bias)
    assert ref.max_err(o, orf) <= TOL
    assert np.max(np.abs(w - wr)) <= WEIGHT_ATOL
    check_lse(lse, lr)
    np.testing.assert_array_equal(o, layer.attend(q, k, v, kv_lengths=kvl, attn_bias=bias))


@needs("selfattn_attend_ex")
def test_lse_merges_key_chunks(rng):
    """Two attend_ex calls over halves of the keys, merged by their lse, give the whole call."""
    layer = selfattn.Layer(16, 2)
    q = rng.standard_normal((1, 4, 16)).astype(np.float32)
    k = rng.standard_normal((1, 10, 16)).astype(np.float32)
    v = rng.standard_normal((1, 10, 16)).astype(np.float32)
    o, lse = layer.attend(q, k, v, return_lse=True)
    o1, l1 = layer.attend(q, k[:, :6], v[:, :6], return_lse=True)
    o2, l2 = layer.attend(q, k[:, 6:], v[:, 6:], return_lse=True)
    l = np.logaddexp(l1, l2)                                          # [1][H][q]
    a1 = np.exp(l1 - l).transpose(0, 2, 1).repeat(8, axis=2)          # per head -> per column
    a2 = np.exp(l2 - l).transpose(0, 2, 1).repeat(8, axis=2)
    assert ref.max_err(a1 * o1 + a2 * o2, o) <= TOL
    assert np.max(np.abs(l - lse)) <= LSE_TOL * max(1.0, np.max(np.abs(lse)))


# ---- window, RoPE, ALiBi, softcap ---------------------------------------------------------------
POS_CASES = [
    pytest.param({"window": 3, "causal": True}, marks=needs_option("window"), id="window-causal"),
    pytest.param({"window": 2}, marks=needs_option("window"), id="window-full"),
    pytest.param({"rope": 1, "causal": True}, marks=needs_option("rope"), id="rope-half"),
    pytest.param({"rope": 2}, marks=needs_option("rope"), id="rope-adjacent"),
    pytest.param({"rope": "half", "rope_dims": 4, "rope_theta": 500.0},
                 marks=[needs_option("rope_dims"), needs("selfattn_layer_set_float")],
                 id="rope-partial-theta"),
    pytest.param({"alibi": True, "causal": True}, marks=needs_option("alibi"), id="alibi-causal"),
    pytest.param({"alibi": True}, marks=needs_option("alibi"), id="alibi-full"),
    pytest.param({"softcap": 1.5, "scale": 1.0}, marks=needs("selfattn_layer_set_float"),
                 id="softcap"),
    pytest.param({"softcap": 2.0, "alibi": True, "window": 4, "causal": True, "rope": 2},
                 marks=[needs("selfattn_layer_set_float"), needs_option("alibi"),
                        needs_option("window"), needs_option("rope")], id="all"),
]


@pytest.mark.parametrize("opts", POS_CASES)
@pytest.mark.parametrize("heads", [(4, 2), (6, 6)], ids=["H4-KV2", "H6"])   # 6: ALiBi's non-2^n rule
def test_position_options(rng, opts, heads):
    h, kv = heads
    layer, W = make_layer(rng, 8 * h, h, n_kv_heads=kv, **opts)
    x = rng.standard_normal((2, 11, 8 * h)).astype(np.float32)
    lengths = [11, 7]
    yr, _, _ = ref.forward(x, W, h, lengths=lengths, **ref_opts(layer))
    assert ref.max_err(layer(x, lengths), yr) <= TOL


@needs("selfattn_layer_get_float")
def test_float_options_read_back():
    layer = selfattn.Layer(32, 4)
    assert layer.scale == pytest.approx(1 / np.sqrt(8))
    assert layer.rope_theta == pytest.approx(10000.0)
    assert layer.softcap == 0.0
    layer.rope_theta = 500.0
    layer.softcap = 30.0
    assert (layer.rope_theta, layer.softcap) == (pytest.approx(500.0), pytest.approx(30.0))
    layer.rope_theta = 0                                   # 0 restores the default
    assert layer.rope_theta == pytest.approx(10000.0)


@needs_option("rope_dims")
def test_rope_dims_validated():
    layer = selfattn.Layer(32, 4)                          # head_dim 8
    for bad in (3, 10):
        with pytest.raises(InvalidError):
            layer.rope_dims = bad
    layer.rope_dims = 4
    assert layer.rope_dims == 4
    layer2 = selfattn.Layer(32, 4, rope_dims=8)
    with pytest.raises(InvalidError):                       # a HEAD_DIM that would break it
        layer2.head_dim = 4


@needs_option("window")
def test_window_validated():
    with pytest.raises(InvalidError):
        selfattn.Layer(32, 4, window=-1)


# ---- key/value cache ---------------------------------------------------------------------------
CACHE_CASES = [
    pytest.param({}, id="plain"),
    pytest.param({"rope": 1}, marks=needs_option("rope"), id="rope"),
    pytest.param({"window": 3}, marks=needs_option("window"), id="window"),
    pytest.param({"alibi": True}, marks=needs_option("alibi"), id="alibi"),
]


@needs("selfattn_cache_create")
@pytest.mark.parametrize("opts", CACHE_CASES)
def test_cache_prompt_then_steps_equals_forward(rng, opts):
    layer, _ = make_layer(rng, 32, 4, n_kv_heads=2, causal=True, **opts)
    n, m = 6, 4
    x = rng.standard_normal((2, n + m, 32)).astype(np.float32)
    full = layer(x)
    cache = selfattn.Cache(layer, 2, 16)
    assert cache.lengths == [0, 0]
    assert ref.max_err(cache(x[:, :n]), full[:, :n]) <= TOL
    for t in range(n, n + m):
        y = cache(x[:, t:t + 1])
        assert ref.max_err(y[:, 0], full[:, t]) <= TOL
    assert cache.lengths == [n + m, n + m]


@needs("selfattn_cache_create")
def test_cache_n_new_truncate_copy(rng):
    layer, _ = make_layer(rng, 32, 4, causal=True)
    x = rng.standard_normal((2, 8, 32)).astype(np.float32)
    full = layer(x)
    cache = selfattn.Cache(layer, 2, 12)
    # sequence 1 takes 2 of 3 rows: its third row is not read (NaN) and is written as zeros
    xin = x[:, :3].copy()
    xin[1, 2] = np.nan
    y = cache(xin, n_new=[3, 2])
    assert cache.lengths == [3, 2]
    assert ref.max_err(y[0], full[0, :3]) <= TOL and ref.max_err(y[1, :2], full[1, :2]) <= TOL
    assert not np.any(y[1, 2])
    y = cache(x[:, 3:4], n_new=[0, 1])                    # sequence 0 untouched
    assert cache.lengths == [3, 3] and not np.any(y[0])
    # roll sequence 0 back to 2 and continue: the same rows as the full forward
    cache.truncate(0, 2)
    assert cache.length(0) == 2
    assert ref.max_err(cache(x[:, 2:5], n_new=[3, 0])[0], full[0, 2:5]) <= TOL
    # copy sequence 0 into 1: both continue identically
    cache.copy(0, 1)
    assert cache.lengths == [5, 5]
    step = np.repeat(x[:1, 5:6], 2, axis=0)
    y = cache(step)
    np.testing.assert_array_equal(y[0], y[1])
    assert ref.max_err(y[0, 0], full[0, 5]) <= TOL
    cache.truncate(-1, 0)
    assert cache.lengths == [0, 0]


@needs("selfattn_cache_create")
def test_cache_errors_leave_it_unchanged(rng):
    layer, _ = make_layer(rng, 16, 2, causal=True)
    x = rng.standard_normal((1, 6, 16)).astype(np.float32)
    cache = selfattn.Cache(layer, 1, 4)
    cache(x[:, :3])
    for bad in (lambda: cache(x[:, 3:5]),                         # past capacity, no window
                lambda: cache(x[:, 3:4], n_new=[2]),              # n_new > max_new
                lambda: cache(x[:, 3:4], n_new=[-1]),
                lambda: cache(np.zeros((1, 0, 16), np.float32)),  # max_new < 1
                lambda: cache.truncate(0, 4),                     # above the current length
                lambda: cache.length(1)):                         # no such sequence
        with pytest.raises(InvalidError):
            bad()
        assert cache.lengths == [3]
    # the next call still continues the sequence
    assert ref.max_err(cache(x[:, 3:4])[0, 0], layer(x[:, :4])[0, 3]) <= TOL
    with pytest.raises(ValueError):
        cache(np.zeros((2, 1, 16), np.float32))                  # n_seqs mismatch


@needs("selfattn_cache_create")
def test_cache_state_errors(rng):
    plain, _ = make_layer(rng, 16, 2)                             # not causal
    with pytest.raises(StateError):
        selfattn.Cache(plain, 1, 8)(np.zeros((1, 1, 16), np.float32))
    layer, _ = make_layer(rng, 16, 2, causal=True)
    other, _ = make_layer(rng, 16, 2, causal=True)
    cache = selfattn.Cache(layer, 1, 8)
    x = np.zeros((1, 1, 16), np.float32)
    y = np.empty_like(x)
    st = _lib.lib.selfattn_forward_cached(other.handle, cache._h, 1, x.ctypes.data, None,
                                          y.ctypes.data)
    assert st == _lib.ERR_INVALID                                 # not the cache's own layer
    if option_known("window"):
        layer.window = 2                                          # changed since create
        with pytest.raises(StateError):
            cache(x)


@needs("selfattn_cache_create")
@needs_option("window")
def test_cache_window_ring_grows_without_bound(rng):
    w, cap, total = 3, 4, 20
    layer, _ = make_layer(rng, 16, 2, causal=True, window=w)
    x = rng.standard_normal((1, total, 16)).astype(np.float32)
    full = layer(x)
    cache = selfattn.Cache(layer, 1, cap)
    assert ref.max_err(cache(x[:, :cap]), full[:, :cap]) <= TOL
    for t in range(cap, total):                                   # min(L, w-1) + 1 <= cap
        assert ref.max_err(cache(x[:, t:t + 1])[0, 0], full[0, t]) <= TOL
    assert cache.length(0) == total


@needs("selfattn_cache_create")
def test_layer_close_closes_its_caches(rng):
    layer, _ = make_layer(rng, 16, 2, causal=True)
    cache = selfattn.Cache(layer, 1, 4)
    layer.close()
    with pytest.raises(ValueError):
        cache.length(0)


# ---- gradients ---------------------------------------------------------------------------------
GRAD_CASES = [
    pytest.param({"causal": True, "n_kv_heads": 1}, [5, 3], id="causal-gqa-len"),
    pytest.param({"out_proj": False}, None, id="no-out-proj"),
    pytest.param({"window": 2, "rope": 1, "alibi": True, "softcap": 1.0, "scale": 0.9}, [5, 4],
                 marks=[needs_option("window"), needs_option("rope"), needs_option("alibi"),
                        needs("selfattn_layer_set_float")], id="window-rope-alibi-softcap"),
]


@needs("selfattn_backward")
@pytest.mark.parametrize("opts,lengths", GRAD_CASES)
def test_backward_matches_finite_differences(rng, opts, lengths):
    layer, W = make_layer(rng, 8, 2, **opts)
    x, dy_c, want = grad_problem(rng, layer, W, lengths)
    got = layer.backward(x, dy_c, lengths)
    check_grads(got, want, layer, lengths)
    sub = layer.backward(x, dy_c, lengths, wrt=("w_q",))
    assert list(sub) == ["w_q"]
    np.testing.assert_array_equal(sub["w_q"], got["w_q"])
    with pytest.raises(ValueError):
        layer.backward(x, dy_c, lengths, wrt=("nope",))


@needs("selfattn_attend_backward")
def test_attend_backward_matches_finite_differences(rng):
    layer = selfattn.Layer(16, 4, n_kv_heads=2, causal=True)
    q = rng.standard_normal((2, 4, 16)).astype(np.float32)
    k = rng.standard_normal((2, 6, 8)).astype(np.float32)
    v = rng.standard_normal((2, 6, 8)).astype(np.float32)
    dout = rng.standard_normal((2, 4, 16))
    kvl = [6, 3]
    params = {"q": q.astype(np.float64), "k": k.astype(np.float64), "v": v.astype(np.float64)}

    def f(p):
        o, _, _ = ref.attend(p["q"], p["k"], p["v"], 4, 2, 4, causal=True, kv_lengths=kvl)
        return float(np.sum(o * dout))

    want = numeric_grads(f, params)
    got = layer.attend_backward(q, k, v, dout, kv_lengths=kvl)
    norm = max(np.max(np.abs(g)) for g in want.values())
    for name in ("q", "k", "v"):
        assert np.max(np.abs(got[name] - want[name])) <= GRAD_TOL * norm, name
    assert not np.any(got["k"][1, 3:]) and not np.any(got["v"][1, 3:])
