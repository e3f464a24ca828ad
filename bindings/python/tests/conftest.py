"""Shared helpers: the library under test is whatever selfattn loads (SELFATTN_LIBRARY in CI)."""
import zlib

import numpy as np
import pytest

import selfattn
import reference as ref

# Stated tolerance of every numerical comparison against the float64 reference (as the C tests):
# max |got - ref| <= TOL * max |ref|.
TOL = 1e-4


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
                           layer.out_proj, biases)
    if packed:
        layer.set_weights(w_qkv=np.concatenate([W["w_q"], W["w_k"], W["w_v"]]),
                          b_qkv=np.concatenate([W["b_q"], W["b_k"], W["b_v"]]) if biases else None,
                          w_o=W.get("w_o"), b_o=W.get("b_o"))
    else:
        layer.set_weights(**W)
    return layer, W
