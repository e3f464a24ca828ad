"""Shared helpers: the library under test is whatever selfattn loads (SELFATTN_LIBRARY in CI)."""
import zlib

import numpy as np
import pytest

import selfattn
import reference as ref

# Stated tolerance of every numerical comparison against the float64 reference (as the C tests):
# max |got - ref| <= TOL * max |ref|.
TOL = 1e-4
GRAD_TOL = 2e-4      # gradients: max abs error <= GRAD_TOL * the largest reference gradient


def needs(symbol):
    """Skip unless the loaded library exports `symbol` (libselfattn 1.1 features)."""
    return pytest.mark.skipif(
        not selfattn.has(symbol),
        reason="%s is not exported by the loaded libselfattn %s (%s): a 1.1 feature the C "
               "library does not implement yet" % (symbol, selfattn.version(), selfattn.library_path))


def option_known(name):
    try:
        selfattn.option_bounds(name)
        return True
    except selfattn.UnsupportedError:
        return False


def needs_option(name):
    return pytest.mark.skipif(
        not option_known(name),
        reason="option %r is unknown to the loaded libselfattn %s (%s): a 1.1 option the C "
               "library does not implement yet" % (name, selfattn.version(), selfattn.library_path))


@pytest.fixture
def rng(request):
    # a fixed seed per test (from its name), so a failure reproduces
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def make_layer(rng, d_model, n_heads, *, biases=True, packed=False, **options):
    """(layer, weights dict) with random float32 weights set."""
    layer = selfattn.Layer(d_model, n_heads, **options)
    W = ref.random_weights(rng, d_model, n_heads, layer.n_kv_heads, layer.head_dim,
                           layer.out_proj, biases, v_head_dim=layer._dv())
    if packed:
        layer.set_weights(w_qkv=np.concatenate([W["w_q"], W["w_k"], W["w_v"]]),
                          b_qkv=np.concatenate([W["b_q"], W["b_k"], W["b_v"]]) if biases else None,
                          w_o=W.get("w_o"), b_o=W.get("b_o"))
    else:
        layer.set_weights(**W)
    return layer, W


def ref_opts(layer):
    """reference.forward keyword arguments reproducing the layer's options."""
    def get(name, default):
        try:
            return layer.get(name)
        except selfattn.UnsupportedError:
            return default
    return dict(n_kv_heads=layer.n_kv_heads, head_dim=layer.head_dim, causal=layer.causal,
                out_proj=layer.out_proj, scale=layer.get("scale"), window=get("window", 0),
                rope_mode=get("rope", 0), rope_dims=get("rope_dims", None),
                rope_theta=get("rope_theta", 10000.0), alibi=get("alibi", False),
                softcap=get("softcap", 0.0), v_head_dim=layer._dv())


def numeric_grads(f, params, eps=1e-6):
    """Central differences of the float64 scalar f(params) for every element of every param."""
    g = {}
    for name, p in params.items():
        gp = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + eps
            fp = f(params)
            p[i] = old - eps
            fm = f(params)
            p[i] = old
            gp[i] = (fp - fm) / (2 * eps)
        g[name] = gp
    return g


def grad_problem(rng, layer, W, lengths, shape=(2, 5, 8)):
    """(x, dy, want) for a layer made by make_layer with weights W: random float32 x and dy of
    `shape`, dy's padding rows (at and past lengths[b]) NaN (they must not be read), and want the
    float64 reference gradients of sum(y * dy) (padding rows of dy as zeros) by central
    differences of reference.forward, for "x" and every weight in W."""
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape)
    ro = ref_opts(layer)
    dy_ref = dy.copy()
    dy_c = dy.astype(np.float32)
    if lengths is not None:
        for b, n in enumerate(lengths):
            dy_ref[b, n:] = 0.0
            dy_c[b, n:] = np.nan
    params = {"x": x.astype(np.float64)}
    params.update({k: v.astype(np.float64) for k, v in W.items()})

    def f(p):
        y, _, _ = ref.forward(p["x"], p, layer.n_heads, lengths=lengths, **ro)
        return float(np.sum(y * dy_ref))

    return x, dy_c, numeric_grads(f, params)


def check_grads(got, want, layer, lengths):
    """got (a Layer.backward-style dict) against grad_problem's want, within GRAD_TOL."""
    assert set(got) == set(want)
    assert ("w_o" in got) == layer.out_proj
    # one scale for all: some gradients are exactly zero (b_k: softmax ignores a constant shift)
    norm = max(np.max(np.abs(g)) for g in want.values())
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert np.all(np.isfinite(got[name])), name
        assert np.max(np.abs(got[name] - want[name])) <= GRAD_TOL * norm, name
    if lengths is not None:
        for b, n in enumerate(lengths):
            assert not np.any(got["x"][b, n:])
