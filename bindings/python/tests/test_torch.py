"""Layer.from_torch against torch.nn.MultiheadAttention (run in float64 as the reference).
Skipped when PyTorch is not importable (Debian: apt-get install python3-torch)."""
import copy

import numpy as np
import pytest

import selfattn
from conftest import TOL, needs
import reference as ref

torch = pytest.importorskip("torch", reason="PyTorch is not importable (optional: Debian "
                                            "package python3-torch); from_torch is not tested")
nn = torch.nn


def mha(d, h, seed, **kw):
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(d, h, **kw).eval()
    with torch.no_grad():  # biases are zero-initialised by PyTorch: make them count
        if m.in_proj_bias is not None:
            m.in_proj_bias.normal_(0, 0.5)
        if m.out_proj.bias is not None:
            m.out_proj.bias.normal_(0, 0.5)
    return m


def run_torch(m, x, causal=False, lengths=None):
    """float64 reference: y [B][L][D] and per-head weights [B][H][L][L] for x [B][L][D]."""
    # train() (dropout is 0) keeps PyTorch off its fused fast path, which fails for bias=False
    # in PyTorch 1.13: the reference is the plain math path
    m64 = copy.deepcopy(m).double().train()
    xt = torch.from_numpy(np.asarray(x, np.float64))
    if not m.batch_first:
        xt = xt.transpose(0, 1)
    L = x.shape[1]
    mask = torch.triu(torch.ones(L, L, dtype=torch.bool), 1) if causal else None
    kpm = None
    if lengths is not None:
        kpm = torch.arange(L)[None, :] >= torch.tensor(lengths)[:, None]
    with torch.no_grad():
        y, w = m64(xt, xt, xt, attn_mask=mask, key_padding_mask=kpm, need_weights=True,
                   average_attn_weights=False)
    if not m.batch_first:
        y = y.transpose(0, 1)
    return y.numpy(), w.numpy()


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_from_torch_matches(batch_first, causal, bias):
    m = mha(64, 8, seed=3, batch_first=batch_first, bias=bias)
    layer = selfattn.Layer.from_torch(m, causal=causal)
    assert (layer.d_model, layer.n_heads, layer.causal) == (64, 8, causal)
    assert layer.batch_first == batch_first
    x = np.random.default_rng(5).standard_normal((3, 19, 64)).astype(np.float32)
    yt, _ = run_torch(m, x, causal)
    if batch_first:
        y = layer(x)
    else:   # the layer takes and gives the module's [seq][batch][embed]
        y = layer(np.ascontiguousarray(x.swapaxes(0, 1))).swapaxes(0, 1)
    assert ref.max_err(y, yt) <= TOL


def test_from_torch_default_layout_is_the_modules():
    """nn.MultiheadAttention's default batch_first=False: the same tensor goes into both."""
    m = mha(32, 4, seed=13).eval()                      # batch_first=False
    layer = selfattn.from_torch(m)
    assert layer.batch_first is False
    xt = torch.randn(9, 2, 32)                          # [seq][batch][embed]
    with torch.no_grad():
        yt, _ = m(xt, xt, xt, need_weights=False)
    y = layer(xt)
    assert y.shape == (9, 2, 32)
    assert ref.max_err(y, yt.numpy()) <= TOL


def test_tensor_that_requires_grad_and_complex_tensor():
    m = mha(16, 2, seed=14, batch_first=True)
    layer = selfattn.from_torch(m)
    xt = torch.randn(2, 5, 16, requires_grad=True)
    np.testing.assert_array_equal(layer(xt), layer(xt.detach().numpy()))
    with pytest.raises(TypeError, match="complex64"):
        layer(torch.randn(2, 5, 16, dtype=torch.complex64))


def test_from_torch_lengths_match_key_padding_mask():
    m = mha(32, 4, seed=4, batch_first=True)
    layer = selfattn.from_torch(m)
    x = np.random.default_rng(6).standard_normal((3, 10, 32)).astype(np.float32)
    lengths = [10, 4, 1]
    y = layer(x, lengths)
    yt, _ = run_torch(m, x, lengths=lengths)
    for b, n in enumerate(lengths):   # PyTorch computes padding rows too; ours are zero
        assert ref.max_err(y[b, :n], yt[b, :n]) <= TOL
        assert not np.any(y[b, n:])


def test_from_torch_copies_weights():
    m = mha(16, 2, seed=7, batch_first=True)
    layer = selfattn.from_torch(m)
    x = np.random.default_rng(8).standard_normal((1, 5, 16)).astype(np.float32)
    y0 = layer(x)
    with torch.no_grad():
        m.in_proj_weight.add_(1.0)
    np.testing.assert_array_equal(layer(x), y0)


@needs("selfattn_forward_ex")
def test_from_torch_weights_match_need_weights():
    m = mha(32, 4, seed=9, batch_first=True)
    layer = selfattn.from_torch(m, causal=True)
    x = np.random.default_rng(10).standard_normal((2, 12, 32)).astype(np.float32)
    y, w = layer(x, return_weights=True)
    yt, wt = run_torch(m, x, causal=True)
    assert ref.max_err(y, yt) <= TOL
    assert np.max(np.abs(w - wt)) <= 2e-5


@needs("selfattn_backward")
def test_backward_matches_autograd():
    m = mha(32, 4, seed=11, batch_first=True)
    layer = selfattn.from_torch(m, causal=True)
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 9, 32))
    dy = rng.standard_normal((2, 9, 32))
    m64 = copy.deepcopy(m).double()
    xt = torch.tensor(x, requires_grad=True)
    mask = torch.triu(torch.ones(9, 9, dtype=torch.bool), 1)
    yt, _ = m64(xt, xt, xt, attn_mask=mask, need_weights=False)
    (yt * torch.from_numpy(dy)).sum().backward()
    g = layer.backward(x, dy)
    wq, wk, wv = m64.in_proj_weight.grad.numpy().reshape(3, 32, 32)
    bq, bk, bv = m64.in_proj_bias.grad.numpy().reshape(3, 32)
    want = {"x": xt.grad.numpy(), "w_q": wq, "w_k": wk, "w_v": wv, "b_q": bq, "b_k": bk, "b_v": bv,
            "w_o": m64.out_proj.weight.grad.numpy(), "b_o": m64.out_proj.bias.grad.numpy()}
    # one scale for all gradients: b_k's is exactly zero (softmax ignores a constant shift)
    norm = max(np.max(np.abs(r)) for r in want.values())
    for name, r in want.items():
        assert np.max(np.abs(g[name] - r)) <= 2e-4 * norm, name


def test_from_torch_refuses_what_it_cannot_copy():
    with pytest.raises(ValueError):
        selfattn.from_torch(nn.MultiheadAttention(16, 2, kdim=8, vdim=8))
    with pytest.raises(ValueError):
        selfattn.from_torch(nn.MultiheadAttention(16, 2, add_bias_kv=True))
    with pytest.raises(ValueError):
        selfattn.from_torch(nn.MultiheadAttention(16, 2, add_zero_attn=True))
    with pytest.raises(ValueError):
        selfattn.from_torch(nn.MultiheadAttention(16, 2), out_proj=False)
    with pytest.raises(TypeError):
        selfattn.from_torch(nn.Linear(4, 4))
