"""A value head size of its own (libselfattn 1.3, SELFATTN_OPT_V_HEAD_DIM; Layer(..., v_head_dim=))
against the float64 NumPy reference (reference.py, where v is [..][n_kv_heads*dv] and the
attention output [..][n_heads*dv]): the forward with its extras, attend and attend_backward,
backward and the train state against central differences of the reference, the cache (float32
and half-precision K/V), and the errors. Tolerances as the other numerics tests (conftest)."""
import numpy as np
import pytest

import selfattn
import reference as ref
from selfattn import InvalidError, StateError
from conftest import TOL, GRAD_TOL, check_grads, grad_problem, make_layer, needs_option, \
    numeric_grads, ref_opts

pytestmark = needs_option("v_head_dim")

HD = 8
DVS = (HD // 2, HD, HD + 8, 2 * HD)


@pytest.mark.parametrize("dv", DVS)
@pytest.mark.parametrize("opts", [dict(n_kv_heads=2, causal=True, rope=1),
                                  dict(window=3, alibi=True, softcap=2.0),
                                  dict(n_kv_heads=1, causal=True, out_proj=False)])
def test_forward_matches_reference(rng, dv, opts):
    d_model = 4 * dv if opts.get("out_proj") is False else 24
    layer, W = make_layer(rng, d_model, 4, head_dim=HD, v_head_dim=dv, **opts)
    assert layer.v_head_dim == dv and layer.head_dim == HD
    assert layer.weight_shape("w_v") == (layer.n_kv_heads * dv, d_model)
    x = rng.standard_normal((2, 7, d_model)).astype(np.float32)
    lengths = [7, 4]
    want, w_ref, lse_ref = ref.forward(x, W, 4, lengths=lengths, **ref_opts(layer))
    assert ref.max_err(layer(x, lengths), want) <= TOL
    y, w, lse = layer(x, lengths, return_weights=True, return_lse=True)
    assert ref.max_err(y, want) <= TOL
    assert ref.max_err(w, w_ref) <= TOL
    fin = np.isfinite(lse_ref)
    assert np.all(np.isneginf(lse[~fin])) and np.allclose(lse[fin], lse_ref[fin], atol=1e-4)


@pytest.mark.parametrize("dv", DVS)
@pytest.mark.parametrize("q_len,kv_len", [(1, 6), (4, 6), (70, 70)])
def test_attend_and_its_gradients(rng, dv, q_len, kv_len):
    layer = selfattn.Layer(32, 4, n_kv_heads=2, causal=True, v_head_dim=dv)
    B = 2
    q = rng.standard_normal((B, q_len, 4 * HD)).astype(np.float32)
    k = rng.standard_normal((B, kv_len, 2 * HD)).astype(np.float32)
    v = rng.standard_normal((B, kv_len, 2 * dv)).astype(np.float32)
    kvl = [kv_len, kv_len // 2 + 1]
    want, w_ref, _ = ref.attend(q, k, v, 4, 2, HD, causal=True, kv_lengths=kvl, v_head_dim=dv)
    out = layer.attend(q, k, v, kv_lengths=kvl)
    assert out.shape == (B, q_len, 4 * dv)
    assert ref.max_err(out, want) <= TOL
    out2, w = layer.attend(q, k, v, kv_lengths=kvl, return_weights=True)
    assert ref.max_err(out2, want) <= TOL and ref.max_err(w, w_ref) <= TOL
    if q_len > 4:
        return                                    # central differences of 70 x 70: too slow
    dout = rng.standard_normal(out.shape)
    g = layer.attend_backward(q, k, v, dout.astype(np.float32), kv_lengths=kvl)
    params = {"q": q.astype(np.float64), "k": k.astype(np.float64), "v": v.astype(np.float64)}

    def f(p):
        o, _, _ = ref.attend(p["q"], p["k"], p["v"], 4, 2, HD, causal=True, kv_lengths=kvl,
                             v_head_dim=dv)
        return float(np.sum(o * dout))

    fd = numeric_grads(f, params)
    norm = max(np.max(np.abs(a)) for a in fd.values())
    for n in ("q", "k", "v"):
        assert g[n].shape == params[n].shape
        assert np.max(np.abs(g[n] - fd[n])) <= GRAD_TOL * norm, n


@pytest.mark.parametrize("dv", (HD // 2, 2 * HD))
@pytest.mark.parametrize("opts", [dict(n_kv_heads=2, causal=True, rope=2),
                                  dict(n_kv_heads=1, window=2, out_proj=False)])
def test_backward_and_train_state(rng, dv, opts):
    d_model = 4 * dv if opts.get("out_proj") is False else 8
    layer, W = make_layer(rng, d_model, 4, head_dim=HD // 2, v_head_dim=dv, **opts)
    lengths = [5, 3]
    x, dy, want = grad_problem(rng, layer, W, lengths, shape=(2, 5, d_model))
    check_grads(layer.backward(x, dy, lengths), want, layer, lengths)
    y, state = layer.forward_train(x, lengths)
    np.testing.assert_array_equal(y, layer(x, lengths))
    check_grads(layer.backward_train(x, dy, state, lengths), want, layer, lengths)


@pytest.mark.parametrize("dv", DVS)
@pytest.mark.parametrize("kv_dtype", ["f32", "f16", "bf16"])
def test_cache_matches_one_shot(rng, dv, kv_dtype):
    layer, W = make_layer(rng, 32, 4, n_kv_heads=2, causal=True, head_dim=HD, v_head_dim=dv,
                          kv_dtype=kv_dtype, rope=1)
    x = rng.standard_normal((2, 8, 32)).astype(np.float32)
    cache = selfattn.Cache(layer, 2, 8)
    y = np.concatenate([cache(x[:, :3])] + [cache(x[:, t:t + 1]) for t in range(3, 8)], axis=1)
    want, _, _ = ref.forward(x, W, 4, **ref_opts(layer))
    # half-precision K and V: rounded once (2^-11, 2^-8 relative), as test_half.py allows
    tol = {"f32": TOL, "f16": 2e-3, "bf16": 2e-2}[kv_dtype]
    assert ref.max_err(y, want) <= tol


def test_options_and_errors(rng):
    layer = selfattn.Layer(16, 2)
    assert layer.v_head_dim == 8                       # the effective dv: head_dim
    layer.v_head_dim = 6
    assert layer.weight_shape("w_o") == (16, 12) and layer.weight_shape("b_v") == (12,)
    assert "v_head_dim=6" in repr(layer)
    with pytest.raises(InvalidError):
        layer.set_weight("w_qkv", np.zeros((48, 16), np.float32))
    with pytest.raises(InvalidError):                  # 2 x 6 != d_model 16
        layer.out_proj = False
    with pytest.raises(InvalidError):
        layer.v_head_dim = -1
    assert layer.v_head_dim == 6 and layer.out_proj
    layer.set_weight("w_v", np.zeros((12, 16), np.float32))
    with pytest.raises(StateError):
        layer.v_head_dim = 8
    assert layer.v_head_dim == 6
    # attend's v takes dv: v of k's shape is refused
    q = np.zeros((1, 2, 16), np.float32)
    k = np.zeros((1, 3, 16), np.float32)
    with pytest.raises(ValueError, match="v must have the shape"):
        layer.attend(q, k, k)
    assert layer.attend(q, k, np.zeros((1, 3, 12), np.float32)).shape == (1, 2, 12)
    # OUT_PROJ 0 first: a dv breaking n_heads * dv == d_model is refused, in any order
    p = selfattn.Layer(16, 2, out_proj=False)
    with pytest.raises(InvalidError):
        p.v_head_dim = 4
    with pytest.raises(InvalidError):
        selfattn.Layer(16, 2, v_head_dim=4, out_proj=False)
    assert selfattn.Layer(16, 2, head_dim=4, v_head_dim=8, out_proj=False).v_head_dim == 8


def test_from_torch_refuses_v_head_dim():
    torch = pytest.importorskip("torch")
    m = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    with pytest.raises(ValueError, match="v_head_dim"):
        selfattn.from_torch(m, v_head_dim=4)
