"""Half-precision storage (libselfattn 1.3): Layer(weight_dtype=, kv_dtype=), set_weight of float16
arrays, bfloat16 bit patterns (dtype="bf16") and torch half tensors, from_torch of a float16 or
bfloat16 module (stand-in tensors: PyTorch is not needed), and the errors.

The reference is reference.forward (float64) on weights rounded by this file's own rounding, not
the library's: float16 by NumPy's astype, bfloat16 by round-to-nearest-even on the float32 bits."""
import sys
import types

import numpy as np
import pytest

import selfattn
from selfattn import InvalidError, StateError
import reference as ref
from conftest import TOL, make_layer

HALF = ["f16", "bf16"]
# a K/V stored in half precision: the cached decode against the one-shot float32 forward
KV_TOL = {"f16": 2e-3, "bf16": 2e-2}


def bf16_bits(a):
    """float32 values -> bfloat16 bit patterns (uint16), round to nearest even (finite values)."""
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF).astype(np.uint16)


def bf16_values(bits):
    """bfloat16 bit patterns -> their values as float32 (exact)."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def rounded(a, dtype):
    """float32 a rounded to dtype, as float32 values (exact)."""
    if dtype == "f16":
        return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)
    if dtype == "bf16":
        return bf16_values(bf16_bits(a))
    return np.asarray(a, np.float32)


def rounded_weights(W, dtype):
    """W with the weight matrices rounded to dtype; biases stay float32 (as the library)."""
    return {k: rounded(v, dtype) if k.startswith("w_") else v for k, v in W.items()}


def test_bf16_rounding_helper():
    x = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -8 + 2 ** -20, -2.5, 0.0],
                 np.float32)
    # ties to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7, rounds to 1 (even)
    np.testing.assert_array_equal(bf16_values(bf16_bits(x)),
                                  [1.0, 1.0, 1.0 + 4 * 2 ** -8, 1.0 + 2 * 2 ** -8, -2.5, 0.0])


# ---- options ------------------------------------------------------------------------------------
def test_dtype_options_read_back():
    layer = selfattn.Layer(16, 2)
    assert layer.weight_dtype == "f32" and layer.kv_dtype == "f32"
    assert "dtype" not in repr(layer)
    for given, want in (("bf16", "bf16"), ("F16", "f16"), (np.float16, "f16"),
                        (np.dtype(np.float32), "f32"), ("bfloat16", "bf16"), (2, "bf16")):
        layer = selfattn.Layer(16, 2, weight_dtype=given, kv_dtype=given)
        assert layer.weight_dtype == want and layer.kv_dtype == want
        assert layer.get("weight_dtype") == want
    layer.kv_dtype = "f16"
    layer.weight_dtype = np.float16
    assert (layer.weight_dtype, layer.kv_dtype) == ("f16", "f16")
    assert "weight_dtype='f16', kv_dtype='f16'" in repr(layer)
    assert selfattn.option_bounds("weight_dtype") == (1, 2)     # 0 (f32) is the default
    assert selfattn.option_bounds("kv_dtype") == (1, 2)


@pytest.mark.parametrize("bad", ["f8", "float64", np.float64, np.int16, "", None.__class__])
def test_unknown_dtype_is_a_value_error(bad):
    with pytest.raises(ValueError, match="weight_dtype must be one of"):
        selfattn.Layer(16, 2, weight_dtype=bad)
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        selfattn.Layer(16, 2, kv_dtype=bad)
    layer = selfattn.Layer(16, 2)
    with pytest.raises(ValueError, match="weight_dtype must be one of"):
        layer.weight_dtype = bad


def test_out_of_range_c_value_is_invalid():
    layer = selfattn.Layer(16, 2)
    with pytest.raises(InvalidError):
        layer.kv_dtype = 3
    with pytest.raises(InvalidError):
        layer.set("weight_dtype", -1)
    assert layer.kv_dtype == "f32" and layer.weight_dtype == "f32"


def test_weight_dtype_after_a_weight_is_a_state_error(rng):
    layer, _ = make_layer(rng, 16, 2)
    with pytest.raises(StateError, match="fixed once a weight is set"):
        layer.weight_dtype = "bf16"
    assert layer.weight_dtype == "f32"
    with pytest.raises(StateError):     # even the value it has: a shape option
        layer.weight_dtype = "f32"
    layer.kv_dtype = "bf16"             # not a shape option: any time
    assert layer.kv_dtype == "bf16"


# ---- forward with half-precision weights ---------------------------------------------------------
@pytest.mark.parametrize("packed", [False, True], ids=["separate", "qkv"])
@pytest.mark.parametrize("dtype", HALF)
def test_forward_matches_reference_on_rounded_weights(rng, dtype, packed):
    layer, W = make_layer(rng, 32, 4, n_kv_heads=2 if not packed else None, causal=True,
                          packed=packed, weight_dtype=dtype)
    assert layer.weight_dtype == dtype
    x = rng.standard_normal((2, 9, 32)).astype(np.float32)
    y = layer(x, lengths=[9, 6])
    kw = dict(n_kv_heads=layer.n_kv_heads, causal=True, lengths=[9, 6])
    want = ref.forward(x, rounded_weights(W, dtype), 4, **kw)[0]
    err = ref.max_err(y, want)
    assert err <= TOL
    # and the rounding matters: y is far closer to the rounded weights' y than to the float32
    # weights' (about 2e-4 away for f16, 3e-3 for bf16), so a layer keeping float32 would fail
    assert ref.max_err(y, ref.forward(x, W, 4, **kw)[0]) > max(10 * err, 1e-4)


@pytest.mark.parametrize("dtype", HALF)
def test_half_bits_give_the_bits_of_float32_rounded_by_the_layer(rng, dtype):
    """Weights given in the layer's dtype are stored bit for bit; float32 ones are rounded to
    nearest even: both give the same output bits when the test's rounding is the library's."""
    layer, W = make_layer(rng, 32, 4, weight_dtype=dtype)
    x = rng.standard_normal((2, 5, 32)).astype(np.float32)
    other = selfattn.Layer(32, 4, weight_dtype=dtype)
    for k, v in W.items():
        if k.startswith("w_"):
            bits = v.astype(np.float16).view(np.uint16) if dtype == "f16" else bf16_bits(v)
            other.set_weight(k, bits, dtype=dtype)
        else:
            other.set_weight(k, v)
    np.testing.assert_array_equal(other(x), layer(x))


def test_float16_array_is_bit_exact(rng):
    """A float16 array into an f16 layer gives the output bits of the same values as float32;
    into an f32 layer, those of the float32 values too (exact widening)."""
    W = {k: v.astype(np.float16) for k, v in ref.random_weights(rng, 32, 4).items()}
    x = rng.standard_normal((2, 6, 32)).astype(np.float32)
    for wd in ("f16", "f32", "bf16"):
        a = selfattn.Layer(32, 4, weight_dtype=wd)
        a.set_weights(**W)                                              # float16 arrays
        b = selfattn.Layer(32, 4, weight_dtype=wd)
        b.set_weights(**{k: v.astype(np.float32) for k, v in W.items()})
        np.testing.assert_array_equal(a(x), b(x))
    c = selfattn.Layer(32, 4, weight_dtype="f16")
    c.set_weights(dtype="f16", **{k: v.view(np.uint16) for k, v in W.items()})   # the same bits
    d = selfattn.Layer(32, 4, weight_dtype="f16")
    d.set_weights(**W)
    np.testing.assert_array_equal(c(x), d(x))
    # a non-contiguous float16 view is taken by value too
    e = selfattn.Layer(32, 4, weight_dtype="f16")
    e.set_weights(**{k: np.asfortranarray(v.T).T if v.ndim == 2 else v for k, v in W.items()})
    np.testing.assert_array_equal(e(x), d(x))


# ---- the cache with half-precision K and V --------------------------------------------------------
def decode(layer, x, prompt):
    """y of a Cache(layer, batch, L): the first `prompt` tokens at once, then one at a time."""
    B, L, _ = x.shape
    cache = selfattn.Cache(layer, B, L)
    ys = [cache(x[:, :prompt])]
    for t in range(prompt, L):
        ys.append(cache(x[:, t:t + 1]))
    return np.concatenate(ys, axis=1)


@pytest.mark.parametrize("weight_dtype", ["f32", "bf16"])
@pytest.mark.parametrize("dtype", HALF)
def test_cache_with_half_kv_matches_one_shot(rng, dtype, weight_dtype):
    layer, W = make_layer(rng, 32, 4, n_kv_heads=2, causal=True, kv_dtype=dtype,
                          weight_dtype=weight_dtype)
    x = rng.standard_normal((2, 8, 32)).astype(np.float32)
    y = decode(layer, x, 3)
    one_shot = layer(x)
    err = ref.max_err(y, one_shot)
    assert err <= KV_TOL[dtype]
    # K and V really are rounded in the cache (a float32 cache matches to float32 rounding)
    layer.kv_dtype = "f32"
    assert ref.max_err(decode(layer, x, 3), one_shot) <= TOL < err


def test_cache_refuses_a_changed_kv_dtype(rng):
    layer, _ = make_layer(rng, 16, 2, causal=True, kv_dtype="f16")
    cache = selfattn.Cache(layer, 1, 4)
    x = rng.standard_normal((1, 2, 16)).astype(np.float32)
    y = cache(x)
    layer.kv_dtype = "bf16"
    with pytest.raises(StateError, match="kv_dtype"):
        cache(x[:, :1])
    layer.kv_dtype = "f16"                   # setting it back makes the cache usable again
    cache.reset()
    np.testing.assert_array_equal(cache(x), y)


# ---- set_weight's data types and errors ---------------------------------------------------------
def test_value_rounding_to_infinity_is_invalid(rng):
    layer = selfattn.Layer(16, 2, weight_dtype="f16")
    w = np.zeros((16, 16), np.float32)
    w[3, 4] = 70000.0
    with pytest.raises(InvalidError, match="rounds to infinity"):
        layer.set_weight("w_q", w)
    with pytest.raises(InvalidError):
        layer.set_weight("w_q", w.astype(np.float64))
    assert layer.missing_weights() == ["w_q", "w_k", "w_v", "w_o"]    # nothing changed
    w[3, 4] = 65519.0                                                  # rounds to 65504
    layer.set_weight("w_q", w)
    layer.set_weight("b_q", np.full(16, 70000.0, np.float32))          # biases stay float32
    bf = selfattn.Layer(16, 2, weight_dtype="bf16")
    bf.set_weight("w_q", np.full((16, 16), 70000.0, np.float32))      # fine in bfloat16
    with pytest.raises(InvalidError):
        bf.set_weight("w_k", np.full((16, 16), np.finfo(np.float32).max, np.float32))


def test_uint16_without_dtype_is_refused():
    layer = selfattn.Layer(16, 2, weight_dtype="bf16")
    bits = np.zeros((16, 16), np.uint16)
    with pytest.raises(TypeError, match='dtype="bf16".*dtype="f16"'):
        layer.set_weight("w_q", bits)
    with pytest.raises(TypeError, match='dtype="bf16"'):
        layer.set_weights(w_q=bits)
    layer.set_weight("w_q", bits, dtype="bf16")
    layer.set_weight("w_k", bits.view(np.int16), dtype="bf16")         # int16 bits as well


def test_dtype_keyword_takes_bits_only():
    layer = selfattn.Layer(16, 2, weight_dtype="bf16")
    w = np.ones((16, 16), np.float32)
    with pytest.raises(TypeError, match="uint16 bit patterns"):
        layer.set_weight("w_q", w, dtype="bf16")
    with pytest.raises(TypeError, match="uint16 bit patterns"):
        layer.set_weight("w_q", w.astype(np.float16), dtype="bf16")
    with pytest.raises(TypeError, match="float16 values or uint16"):
        layer.set_weight("w_q", w, dtype="f16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        layer.set_weight("w_q", w, dtype="f8")
    layer.set_weight("w_q", w, dtype="f32")
    layer.set_weight("w_q", w.astype(np.float16), dtype="f16")
    layer.set_weight("w_q", np.ones((16, 16), np.uint16), dtype="f32")  # values, converted
    with pytest.raises(ValueError, match="must have shape"):            # the shape check stays
        layer.set_weight("w_q", np.zeros((8, 32), np.uint16), dtype="bf16")


def test_bf16_bits_into_f16_and_f32_layers(rng):
    """Bits in one format into a layer of another: converted from their exact values."""
    W = ref.random_weights(rng, 16, 2)
    bits = {k: bf16_bits(v) for k, v in W.items()}
    vals = {k: bf16_values(v) for k, v in bits.items()}
    x = rng.standard_normal((1, 4, 16)).astype(np.float32)
    for wd in ("f32", "f16"):
        a = selfattn.Layer(16, 2, weight_dtype=wd)
        a.set_weights(dtype="bf16", **bits)
        b = selfattn.Layer(16, 2, weight_dtype=wd)
        b.set_weights(**vals)
        np.testing.assert_array_equal(a(x), b(x))


# ---- torch half tensors and from_torch (stand-ins) ----------------------------------------------
class _DType:
    def __init__(self, name):
        self.name = name

    def __str__(self):
        return "torch." + self.name


class HalfTensor:
    """What the binding reads of a CPU torch.float16 / torch.bfloat16 tensor: dtype, detach(),
    to(device=), contiguous(), numpy() (float16 only: PyTorch refuses it for bfloat16) and
    view(torch.int16). float() raises: the bits must not take a float32 round trip."""

    def __init__(self, values, dtype):
        v = np.asarray(values, np.float32)
        self.dtype = _DType(dtype)
        self._bits = v.astype(np.float16).view(np.uint16) if dtype == "float16" else bf16_bits(v)

    def detach(self):
        return self

    def to(self, device=None):
        return self

    def contiguous(self):
        return self

    def float(self):
        raise AssertionError("a half tensor went through float()")

    def numpy(self):
        if self.dtype.name == "bfloat16":
            raise TypeError("Got unsupported ScalarType BFloat16")
        return self._bits.view(np.float16)

    def view(self, dtype):
        assert dtype is sys.modules["torch"].int16
        return types.SimpleNamespace(numpy=lambda: self._bits.view(np.int16))

    def values(self):
        """The tensor's values as float32 (exact)."""
        if self.dtype.name == "float16":
            return self._bits.view(np.float16).astype(np.float32)
        return bf16_values(self._bits)


@pytest.fixture
def fake_torch(monkeypatch):
    """A stand-in `torch` with torch.int16 and torch.nn.MultiheadAttention (an empty class)."""
    torch = types.ModuleType("torch")
    nn = types.ModuleType("torch.nn")
    nn.MultiheadAttention = type("MultiheadAttention", (), {})
    torch.nn, torch.int16 = nn, object()
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch.nn", nn)
    return torch


def half_mha(torch, rng, d, h, dtype):
    """(module, its weights' values as float32): an nn.MultiheadAttention(d, h,
    batch_first=True, dtype=torch.<dtype>) stand-in with random weights and biases."""
    W = ref.random_weights(rng, d, h)
    m = torch.nn.MultiheadAttention()
    m.embed_dim, m.num_heads, m.batch_first = d, h, True
    m._qkv_same_embed_dim, m.bias_k, m.bias_v, m.add_zero_attn = True, None, None, False
    m.in_proj_weight = HalfTensor(np.concatenate([W["w_q"], W["w_k"], W["w_v"]]), dtype)
    m.in_proj_bias = HalfTensor(np.concatenate([W["b_q"], W["b_k"], W["b_v"]]), dtype)
    m.out_proj = types.SimpleNamespace(weight=HalfTensor(W["w_o"], dtype),
                                       bias=HalfTensor(W["b_o"], dtype))
    d3 = [0, d, 2 * d, 3 * d]
    wqkv, bqkv = m.in_proj_weight.values(), m.in_proj_bias.values()
    vals = {"w_o": m.out_proj.weight.values(), "b_o": m.out_proj.bias.values()}
    for i, n in enumerate("qkv"):
        vals["w_" + n] = wqkv[d3[i]:d3[i + 1]]
        vals["b_" + n] = bqkv[d3[i]:d3[i + 1]]
    return m, vals


@pytest.mark.parametrize("dtype,short", [("float16", "f16"), ("bfloat16", "bf16")])
def test_from_torch_half_module(fake_torch, rng, dtype, short):
    m, vals = half_mha(fake_torch, rng, 16, 2, dtype)
    layer = selfattn.from_torch(m, causal=True)
    assert layer.weight_dtype == short and layer.kv_dtype == "f32"
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    # the module's values exactly: the same bits as a layer given them as float32
    same = selfattn.Layer(16, 2, causal=True, weight_dtype=short)
    same.set_weights(**vals)
    np.testing.assert_array_equal(layer(x), same(x))
    assert ref.max_err(layer(x), ref.forward(x, vals, 2, causal=True)[0]) <= TOL
    # weight_dtype overridden: f32 widens exactly; kv_dtype passes through
    wide = selfattn.from_torch(m, causal=True, weight_dtype="f32", kv_dtype=short)
    assert wide.weight_dtype == "f32" and wide.kv_dtype == short
    f32 = selfattn.Layer(16, 2, causal=True)
    f32.set_weights(**vals)
    np.testing.assert_array_equal(wide(x), f32(x))


def test_set_weight_takes_torch_half_tensors(fake_torch, rng):
    w = rng.standard_normal((16, 16)).astype(np.float32)
    for dtype, short in (("float16", "f16"), ("bfloat16", "bf16")):
        t = HalfTensor(w, dtype)
        a = selfattn.Layer(16, 2, weight_dtype=short)
        a.set_weights(w_q=t, w_k=t, w_v=t, w_o=t)
        b = selfattn.Layer(16, 2, weight_dtype=short)
        b.set_weights(w_q=t.values(), w_k=t.values(), w_v=t.values(), w_o=t.values())
        x = rng.standard_normal((1, 3, 16)).astype(np.float32)
        np.testing.assert_array_equal(a(x), b(x))
        other = "f16" if short == "bf16" else "bf16"
        with pytest.raises(TypeError, match="torch.%s tensor given with dtype='%s'"
                           % (dtype, other)):
            a.set_weight("w_q", t, dtype=other)


def test_from_torch_float32_module_keeps_f32(fake_torch, rng):
    """A module without a half dtype (the stand-ins of test_traps.py have no dtype at all) gives
    an f32 layer unless weight_dtype says otherwise."""
    from test_traps import fake_mha
    m, W = fake_mha(fake_torch.nn, rng, 16, 2, batch_first=True)
    assert selfattn.from_torch(m).weight_dtype == "f32"
    layer = selfattn.from_torch(m, weight_dtype="bf16")
    assert layer.weight_dtype == "bf16"
    x = rng.standard_normal((1, 4, 16)).astype(np.float32)
    assert ref.max_err(layer(x), ref.forward(x, rounded_weights(W, "bf16"), 2)[0]) <= TOL
