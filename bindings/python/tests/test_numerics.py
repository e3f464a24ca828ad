"""Forward and attend against the float64 reference (tolerance: conftest.TOL * max|ref|)."""
import numpy as np
import pytest

import selfattn
import reference as ref
from conftest import TOL, make_layer

# (batch, seq_len, d_model, n_heads, options, lengths)
FORWARD_CASES = [
    (1, 1, 8, 1, {}, None),
    (2, 7, 32, 4, {"causal": True}, None),
    (3, 33, 64, 8, {"n_kv_heads": 2}, [33, 0, 5]),
    (2, 100, 96, 6, {"n_kv_heads": 1, "causal": True}, [1, 100]),
    (2, 17, 30, 4, {"head_dim": 8}, [17, 9]),                   # d_model not divisible
    (2, 12, 32, 4, {"out_proj": False, "causal": True}, [12, 3]),
    (1, 20, 48, 4, {"scale": 0.3}, None),
    (1, 9, 16, 2, {"head_dim": 16, "n_kv_heads": 1, "scale": 1.7, "causal": True}, None),
    (1, 300, 128, 8, {"causal": True, "n_kv_heads": 4}, None),  # several query blocks, threads
    (2, 130, 64, 4, {"threads": 1}, [130, 129]),
]


def ids(c):
    b, l, d, h, o, n = c
    return "B%d-L%d-D%d-H%d-%s%s" % (b, l, d, h, ",".join("%s=%s" % kv for kv in o.items()) or "plain",
                                     "-len" if n else "")


@pytest.mark.parametrize("case", FORWARD_CASES, ids=[ids(c) for c in FORWARD_CASES])
@pytest.mark.parametrize("biases", [True, False], ids=["bias", "nobias"])
def test_forward_matches_reference(rng, case, biases):
    batch, seq, d, h, opts, lengths = case
    layer, W = make_layer(rng, d, h, biases=biases, **opts)
    x = rng.standard_normal((batch, seq, d)).astype(np.float32)
    x0 = x.copy()
    y = layer(x, lengths)
    yr, _, _ = ref.forward(x, W, h, n_kv_heads=opts.get("n_kv_heads"), head_dim=opts.get("head_dim"),
                           causal=opts.get("causal", False), out_proj=opts.get("out_proj", True),
                           scale=opts.get("scale"), lengths=lengths)
    assert y.shape == x.shape and y.dtype == np.float32
    assert ref.max_err(y, yr) <= TOL
    if lengths is not None:  # padding rows are exactly zero
        for b, n in enumerate(lengths):
            assert not np.any(y[b, n:])
    np.testing.assert_array_equal(x, x0)


def test_packed_in_proj_weight(rng):
    layer, W = make_layer(rng, 64, 4, packed=True, causal=True)
    x = rng.standard_normal((2, 21, 64)).astype(np.float32)
    yr, _, _ = ref.forward(x, W, 4, causal=True)
    assert ref.max_err(layer(x), yr) <= TOL


def test_two_dimensional_input_is_batch_one(rng):
    layer, W = make_layer(rng, 32, 4)
    x = rng.standard_normal((11, 32)).astype(np.float32)
    y = layer(x)
    assert y.shape == (11, 32)
    np.testing.assert_array_equal(y, layer(x[None])[0])
    assert ref.max_err(y, ref.forward(x[None], W, 4)[0][0]) <= TOL


def test_conversions_copy_and_leave_input_alone(rng):
    """float64, non-contiguous and list inputs are converted once; results equal the float32 call."""
    layer, W = make_layer(rng, 16, 2)
    x64 = rng.standard_normal((3, 16, 5))                     # [batch][d][seq]: transposed view below
    xt = x64.transpose(0, 2, 1)
    assert not xt.flags.c_contiguous
    keep = xt.copy()
    y = layer(xt)
    np.testing.assert_array_equal(xt, keep)
    np.testing.assert_array_equal(y, layer(np.ascontiguousarray(xt, dtype=np.float32)))
    np.testing.assert_array_equal(layer(xt.tolist(), lengths=[5, 4, 1]),
                                  layer(xt.astype(np.float32), lengths=np.array([5, 4, 1], np.int64)))


def test_out_argument(rng):
    layer, _ = make_layer(rng, 16, 2)
    x = rng.standard_normal((2, 4, 16)).astype(np.float32)
    out = np.empty_like(x)
    r = layer(x, out=out)
    assert r is out
    np.testing.assert_array_equal(out, layer(x))
    with pytest.raises(ValueError):
        layer(x, out=np.empty((2, 4, 15), np.float32))
    with pytest.raises(TypeError):
        layer(x, out=np.empty((2, 4, 16), np.float64))


def test_deterministic_bits(rng):
    layer, _ = make_layer(rng, 64, 4, causal=True)
    x = rng.standard_normal((2, 70, 64)).astype(np.float32)
    np.testing.assert_array_equal(layer(x), layer(x))


# (batch, q_len, kv_len, n_heads, options, kv_lengths)
ATTEND_CASES = [
    (1, 1, 1, 1, {}, None),
    (2, 5, 5, 4, {"causal": True}, None),
    (2, 3, 9, 4, {"causal": True}, [9, 4]),          # bottom-right: query i sees j <= i + 6
    (1, 1, 40, 8, {"causal": True, "n_kv_heads": 2}, None),   # decode step sees every key
    (2, 9, 4, 2, {"causal": True}, None),            # q_len > kv_len: first rows see no key -> 0
    (3, 7, 12, 6, {"n_kv_heads": 3}, [12, 0, 1]),
    (1, 70, 150, 4, {"causal": True, "scale": 0.05}, None),
]


@pytest.mark.parametrize("case", ATTEND_CASES,
                         ids=["B%d-q%d-kv%d-H%d-%s" % (c[0], c[1], c[2], c[3], ",".join(c[4]) or "plain")
                              for c in ATTEND_CASES])
def test_attend_matches_reference(rng, case):
    batch, lq, lk, h, opts, kvl = case
    hd = 8
    layer = selfattn.Layer(h * hd, h, **opts)
    kvh = layer.n_kv_heads
    q = rng.standard_normal((batch, lq, h * hd)).astype(np.float32)
    k = rng.standard_normal((batch, lk, kvh * hd)).astype(np.float32)
    v = rng.standard_normal((batch, lk, kvh * hd)).astype(np.float32)
    out = layer.attend(q, k, v, kv_lengths=kvl)
    o, _, lse = ref.attend(q, k, v, h, kvh, hd, causal=opts.get("causal", False),
                           scale=opts.get("scale"), kv_lengths=kvl)
    assert out.shape == q.shape
    assert ref.max_err(out, o) <= TOL
    # rows that see no key are exactly zero, never NaN
    blind = np.all(np.isneginf(lse), axis=1)                   # [batch][q_len]
    assert not np.any(out[blind])
    assert np.all(np.isfinite(out))


def test_attend_2d_and_no_weights_needed(rng):
    layer = selfattn.Layer(32, 4, causal=True)               # no weights: attend needs none
    q, k, v = (rng.standard_normal((6, 32)).astype(np.float32) for _ in range(3))
    out = layer.attend(q, k, v)
    assert out.shape == (6, 32)
    assert ref.max_err(out, ref.attend(q[None], k[None], v[None], 4, 4, 8, causal=True)[0][0]) <= TOL


def test_options_read_back():
    layer = selfattn.Layer(30, 4, head_dim=8, n_kv_heads=2, causal=True, out_proj=True,
                           threads=1, scale=0.25)
    assert (layer.d_model, layer.n_heads, layer.n_kv_heads, layer.head_dim) == (30, 4, 2, 8)
    assert layer.causal is True and layer.out_proj is True and layer.threads == 1
    assert layer.scale == pytest.approx(0.25)
    layer.scale = 0
    assert layer.scale == pytest.approx(1 / np.sqrt(8))
    layer.causal = False
    assert layer.causal is False
    assert selfattn.Layer(32, 4).n_kv_heads == 4
    assert selfattn.Layer(10, 3).head_dim == 0                # undetermined
    lo, hi = selfattn.option_bounds("threads")
    assert lo >= 0 and hi >= 1
    assert "d_model=30" in repr(layer)
    assert selfattn.version_number() // 10000 == 1
    assert selfattn.kernel_name().startswith("f32-softmax-")
