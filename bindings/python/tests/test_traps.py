"""Traps a new user falls into, each closed: a tensor that requires grad, complex input, a Cache
on a non-causal layer, a missing weight, from_torch's layout (batch_first) and a pip install that
cannot find its library. PyTorch is not needed: tensors and modules are stand-ins with the
attributes the binding reads (test_torch.py runs the real thing when PyTorch is importable)."""
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
