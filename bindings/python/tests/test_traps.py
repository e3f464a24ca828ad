"""Traps a new user falls into, each closed: a tensor that requires grad, complex input, a Cache
on a non-causal layer, a missing weight and from_torch's layout (batch_first); test_venv.py has
the pip install that cannot find its library. PyTorch is not needed: tensors and modules are
stand-ins with the attributes the binding reads (test_torch.py runs the real thing when PyTorch
is importable)."""
import sys
import types

import numpy as np
import pytest

import selfattn
from selfattn import StateError
import reference as ref
from conftest import TOL, make_layer, needs


class FakeTensor:
    """What the binding sees of a CPU torch.Tensor: __array__, which (as PyTorch's) refuses a
    tensor that requires grad, detach(), and requires_grad."""

    def __init__(self, a, requires_grad=False):
        self._a = np.asarray(a)
        self.requires_grad = requires_grad

    def detach(self):
        return FakeTensor(self._a, requires_grad=False)

    def __array__(self, dtype=None):
        if self.requires_grad:
            raise RuntimeError("Can't call numpy() on Tensor that requires grad. "
                               "Use tensor.detach().numpy() instead.")
        return self._a if dtype is None else self._a.astype(dtype)


# ---- a tensor that requires grad is detached ----------------------------------------------------
def test_fake_tensor_is_faithful():
    with pytest.raises(RuntimeError, match="requires grad"):
        np.asarray(FakeTensor(np.zeros(3), requires_grad=True))


def test_requires_grad_input_is_detached(rng):
    layer, W = make_layer(rng, 16, 2, causal=True)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    want = layer(x)
    np.testing.assert_array_equal(layer(FakeTensor(x, requires_grad=True)), want)
    np.testing.assert_array_equal(layer.forward(FakeTensor(x.astype(np.float64), True)), want)
    # weights, dy and attn_bias take the same path
    other = selfattn.Layer(16, 2, causal=True)
    other.set_weights(**{k: FakeTensor(v, requires_grad=True) for k, v in W.items()})
    np.testing.assert_array_equal(other(x), want)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    g = layer.backward(FakeTensor(x, True), FakeTensor(dy, True))
    np.testing.assert_array_equal(g["x"], layer.backward(x, dy)["x"])


@needs("selfattn_forward_ex")
def test_requires_grad_bias_is_detached(rng):
    layer, _ = make_layer(rng, 16, 2)
    x = rng.standard_normal((1, 4, 16)).astype(np.float32)
    bias = rng.standard_normal((1, 1, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(layer(x, attn_bias=FakeTensor(bias, True)),
                                  layer(x, attn_bias=bias))


# ---- complex input is refused, not truncated to its real part ----------------------------------
@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_complex_input_is_refused(rng, dtype):
    layer, W = make_layer(rng, 16, 2)
    x = (rng.standard_normal((1, 3, 16)) + 1j).astype(dtype)
    name = np.dtype(dtype).name
    for call in (lambda: layer(x), lambda: layer(FakeTensor(x)),
                 lambda: layer.backward(x, x.real), lambda: layer.backward(x.real, x)):
        with pytest.raises(TypeError, match="complex dtype " + name):
            call()
    with pytest.raises(TypeError, match="x: complex dtype complex128"):
        layer(x.tolist())                            # Python complex numbers: complex128
    with pytest.raises(TypeError, match="w_q: complex dtype " + name):
        layer.set_weight("w_q", W["w_q"].astype(dtype))
    with pytest.raises(TypeError, match="attn_bias: complex dtype " + name):
        layer(x.real, attn_bias=np.zeros((1, 1, 3, 3), dtype))
    # the real part, asked for explicitly, works
    layer(x.real)


# ---- a Cache on a non-causal layer fails at creation -------------------------------------------
@needs("selfattn_cache_create")
def test_cache_on_non_causal_layer_fails_at_creation(rng):
    plain, _ = make_layer(rng, 16, 2)
    with pytest.raises(StateError, match=r"not causal.*causal=True.*SELFATTN_OPT_CAUSAL 1") as e:
        selfattn.Cache(plain, 1, 8)
    assert e.value.status == selfattn._lib.ERR_STATE
    assert not plain._caches
    # turned off after creation: the call says why
    layer, _ = make_layer(rng, 16, 2, causal=True)
    cache = selfattn.Cache(layer, 1, 8)
    layer.causal = False
    with pytest.raises(StateError, match="not causal"):
        cache(np.zeros((1, 1, 16), np.float32))
    layer.causal = True
    cache(np.zeros((1, 1, 16), np.float32))


# ---- a missing weight is named -----------------------------------------------------------------
def _x(rng, shape=(1, 3, 16)):
    return rng.standard_normal(shape).astype(np.float32)


def test_missing_w_o_is_named(rng):
    layer = selfattn.Layer(16, 2)
    W = ref.random_weights(rng, 16, 2)
    assert layer.missing_weights() == ["w_q", "w_k", "w_v", "w_o"]
    layer.set_weights(w_q=W["w_q"], w_k=W["w_k"], w_v=W["w_v"])
    assert layer.missing_weights() == ["w_o"]
    x = _x(rng)
    msg = r"W_O is not set \(needed with the output projection on"
    with pytest.raises(StateError, match=msg) as e:
        layer(x)
    assert "W_Q" not in str(e.value) and e.value.function == "selfattn_forward"
    with pytest.raises(StateError, match=msg):
        layer.backward(x, x)
    with pytest.raises(StateError, match=msg):
        layer.forward_train(x)
    layer.set_weight("w_o", W["w_o"])
    assert layer.missing_weights() == []
    layer(x)


def test_missing_input_weights_are_named(rng):
    layer = selfattn.Layer(16, 2, out_proj=False, causal=True)
    W = ref.random_weights(rng, 16, 2, out_proj=False)
    layer.set_weight("w_k", W["w_k"])
    layer.set_weight("b_q", W["b_q"])                 # a bias is not the weight
    x = _x(rng)
    with pytest.raises(StateError) as e:
        layer(x)
    text = str(e.value)
    assert "W_Q is not set" in text and "W_V is not set" in text
    assert "W_K" not in text and "W_O" not in text    # set / not needed without out_proj
    if selfattn.has("selfattn_forward_ex"):
        with pytest.raises(StateError, match="W_Q is not set"):
            layer(x, return_lse=True)
    if selfattn.has("selfattn_cache_create"):
        cache = selfattn.Cache(layer, 1, 4)
        with pytest.raises(StateError, match="W_Q is not set"):
            cache(x)
    layer.set_weight("w_q", W["w_q"])
    layer.set_weight("w_v", W["w_v"])
    assert layer.missing_weights() == []
    layer(x)


def test_w_qkv_provides_q_k_v(rng):
    layer = selfattn.Layer(16, 2, out_proj=False)
    layer.set_weight("w_qkv", rng.standard_normal((48, 16)).astype(np.float32))
    assert layer.missing_weights() == []
    layer(_x(rng))


def test_undetermined_head_dim_is_named():
    layer = selfattn.Layer(10, 3)
    with pytest.raises(StateError, match="head_dim undetermined"):
        layer(np.zeros((1, 2, 10), np.float32))


# ---- from_torch honours the module's batch_first -----------------------------------------------
class FakeParam:
    """What from_torch reads of a parameter: t.detach().to(device="cpu").float().numpy()."""

    def __init__(self, a):
        self._a = np.asarray(a, np.float32)

    def detach(self):
        return self

    def to(self, device=None):
        return self

    def float(self):
        return self

    def numpy(self):
        return self._a


@pytest.fixture
def fake_nn(monkeypatch):
    """A stand-in `torch` (with torch.nn.MultiheadAttention, an empty class) in sys.modules for
    the test: from_torch imports torch and checks isinstance(module, nn.MultiheadAttention)."""
    torch = types.ModuleType("torch")
    nn = types.ModuleType("torch.nn")
    nn.MultiheadAttention = type("MultiheadAttention", (), {})
    torch.nn = nn
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch.nn", nn)
    return nn


def fake_mha(nn, rng, d, h, batch_first):
    """(module, weights dict for reference.forward): the attributes from_torch reads of an
    nn.MultiheadAttention(d, h, batch_first=batch_first) with random weights and biases."""
    W = ref.random_weights(rng, d, h)
    m = nn.MultiheadAttention()
    m.embed_dim, m.num_heads, m.batch_first = d, h, batch_first
    m._qkv_same_embed_dim, m.bias_k, m.bias_v, m.add_zero_attn = True, None, None, False
    m.in_proj_weight = FakeParam(np.concatenate([W["w_q"], W["w_k"], W["w_v"]]))
    m.in_proj_bias = FakeParam(np.concatenate([W["b_q"], W["b_k"], W["b_v"]]))
    m.out_proj = types.SimpleNamespace(weight=FakeParam(W["w_o"]), bias=FakeParam(W["b_o"]))
    return m, W


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_from_torch_seq_first_takes_and_gives_seq_batch_embed(fake_nn, rng, causal):
    B, L, D = 3, 7, 16
    m, W = fake_mha(fake_nn, rng, D, 2, batch_first=False)
    layer = selfattn.from_torch(m, causal=causal)
    assert layer.batch_first is False and "batch_first=False" in repr(layer)
    x = rng.standard_normal((B, L, D)).astype(np.float32)              # [B][L][D]
    want = ref.forward(x, W, 2, causal=causal)[0]
    x_sf = np.ascontiguousarray(x.swapaxes(0, 1))                       # the module's [L][B][D]
    y = layer(x_sf)
    assert y.shape == (L, B, D)
    assert ref.max_err(y.swapaxes(0, 1), want) <= TOL
    np.testing.assert_array_equal(layer.forward(x_sf.tolist()), y)
    # chaining: the transposed y goes back in without a copy of the caller's making
    assert ref.max_err(layer(y).swapaxes(0, 1), ref.forward(want, W, 2, causal=causal)[0]) <= TOL
    # out= is [L][B][D] too
    out = np.empty((L, B, D), np.float32)
    assert layer(x_sf, out=out) is out
    np.testing.assert_array_equal(out, y)
    with pytest.raises(ValueError):
        layer(x_sf, out=np.empty((B, L, D), np.float32))
    # lengths stay [batch]; one sequence as 2-D is the same in both layouts
    y_len = layer(x_sf, lengths=[L, 3, 1])
    assert y_len.shape == (L, B, D) and not np.any(y_len[3:, 1])
    y0 = layer(x_sf[:, 0])
    assert y0.shape == (L, D) and ref.max_err(y0, want[0]) <= TOL
    # the same module with batch_first=True, and the override of the module's layout
    m.batch_first = True
    bf = selfattn.from_torch(m, causal=causal)
    assert bf.batch_first is True
    np.testing.assert_array_equal(bf(x), y.swapaxes(0, 1))
    m.batch_first = False
    np.testing.assert_array_equal(selfattn.from_torch(m, causal=causal, batch_first=True)(x),
                                  bf(x))


@needs("selfattn_forward_ex")
def test_seq_first_extras_keep_batch_first(fake_nn, rng):
    B, L, D = 2, 5, 16
    m, W = fake_mha(fake_nn, rng, D, 2, batch_first=False)
    layer = selfattn.from_torch(m)
    x = rng.standard_normal((B, L, D)).astype(np.float32)
    bias = rng.standard_normal((B, 2, L, L)).astype(np.float32)
    y, w, lse = layer(np.ascontiguousarray(x.swapaxes(0, 1)), attn_bias=bias,
                      return_weights=True, return_lse=True)
    yr, wr, lr = ref.forward(x, W, 2, bias=bias)
    assert y.shape == (L, B, D) and w.shape == (B, 2, L, L) and lse.shape == (B, 2, L)
    assert ref.max_err(y.swapaxes(0, 1), yr) <= TOL
    assert np.max(np.abs(w - wr)) <= 2e-5 and np.max(np.abs(lse - lr)) <= 1e-4


@needs("selfattn_backward")
def test_seq_first_gradients_and_training(fake_nn, rng):
    B, L, D = 2, 5, 16
    m, _ = fake_mha(fake_nn, rng, D, 2, batch_first=False)
    sf = selfattn.from_torch(m, causal=True)
    bf = selfattn.from_torch(m, causal=True, batch_first=True)
    x = rng.standard_normal((B, L, D)).astype(np.float32)
    dy = rng.standard_normal((B, L, D)).astype(np.float32)
    xs, dys = (np.ascontiguousarray(a.swapaxes(0, 1)) for a in (x, dy))
    g_sf, g_bf = sf.backward(xs, dys, lengths=[5, 3]), bf.backward(x, dy, lengths=[5, 3])
    assert g_sf["x"].shape == (L, B, D)
    np.testing.assert_array_equal(g_sf["x"].swapaxes(0, 1), g_bf["x"])
    for name in g_bf:
        if name != "x":
            np.testing.assert_array_equal(g_sf[name], g_bf[name])
    if selfattn.has("selfattn_forward_train"):
        y, state = sf.forward_train(xs)
        assert y.shape == (L, B, D)
        np.testing.assert_array_equal(y, sf(xs))
        gt = sf.backward_train(xs, dys, state)
        assert gt["x"].shape == (L, B, D)
        assert np.max(np.abs(gt["x"] - sf.backward(xs, dys)["x"])) <= 1e-5


@needs("selfattn_cache_create")
def test_seq_first_cache(fake_nn, rng):
    B, L, D = 2, 6, 16
    m, _ = fake_mha(fake_nn, rng, D, 2, batch_first=False)
    layer = selfattn.from_torch(m, causal=True)
    xs = rng.standard_normal((L, B, D)).astype(np.float32)              # [L][B][D]
    full = layer(xs)
    cache = selfattn.Cache(layer, B, L)
    y = cache(xs[:4])
    assert y.shape == (4, B, D)
    assert ref.max_err(y, full[:4]) <= TOL
    out = np.empty((1, B, D), np.float32)
    for t in range(4, L):
        assert cache(xs[t:t + 1], out=out) is out
        assert ref.max_err(out[0], full[t]) <= TOL
    with pytest.raises(ValueError, match=r"\[max_new\]\[n_seqs=2\]"):
        cache(np.zeros((1, 3, D), np.float32))
