"""Training with kept activations (libselfattn 1.2: selfattn_train_state_size, _forward_train,
_backward_train) through Layer.forward_train / Layer.backward_train and TrainState. Skipped, with
the reason, while the loaded library lacks the functions."""
import numpy as np
import pytest

import selfattn
from selfattn import InvalidError, StateError, TrainState, _lib
from conftest import check_grads, grad_problem, make_layer, needs, needs_option

pytestmark = needs("selfattn_backward_train")

# backward_train against backward: "results match selfattn_backward to rounding"
ROUND_TOL = 1e-5     # max abs difference <= ROUND_TOL * the largest gradient


def assert_same_grads(got, want):
    assert list(got) == list(want)
    norm = max(np.max(np.abs(g)) for g in want.values())
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert got[name].dtype == np.float32, name
        assert np.max(np.abs(got[name] - want[name])) <= ROUND_TOL * norm, name


def small(rng, lengths=(5, 3), **opts):
    """(layer, x, dy, lengths) of a small problem, d_model 8, 2 heads, batch 2, seq_len 5."""
    layer, _ = make_layer(rng, 8, 2, **opts)
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    dy = rng.standard_normal((2, 5, 8)).astype(np.float32)
    return layer, x, dy, None if lengths is None else list(lengths)


# ---- forward_train's y is forward's y ----------------------------------------------------------
FORWARD_CASES = [
    pytest.param({}, None, id="plain"),
    pytest.param({"causal": True}, [7, 4], id="causal-len"),
    pytest.param({"n_kv_heads": 2, "causal": True}, [3, 7], id="gqa-causal-len"),
    pytest.param({"n_kv_heads": 1, "out_proj": False}, None, id="mqa-no-out-proj"),
    pytest.param({"rope": 1, "n_kv_heads": 2, "causal": True}, [6, 7],
                 marks=needs_option("rope"), id="rope-gqa-len"),
    pytest.param({"rope": 2, "window": 3, "alibi": True}, [7, 2],
                 marks=[needs_option("rope"), needs_option("window"), needs_option("alibi")],
                 id="rope-adjacent-window-alibi"),
]


@pytest.mark.parametrize("opts,lengths", FORWARD_CASES)
def test_forward_train_y_is_forward_y(rng, opts, lengths):
    layer, _ = make_layer(rng, 32, 4, **opts)
    x = rng.standard_normal((2, 7, 32)).astype(np.float32)
    y, state = layer.forward_train(x, lengths)
    assert isinstance(state, TrainState)
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.array_equal(y, layer.forward(x, lengths))
    # a 2-D x (one sequence, no batch dimension) gives a 2-D y, as forward does
    y2, state2 = layer.forward_train(x[1], None if lengths is None else lengths[1:])
    assert y2.shape == x[1].shape
    assert np.array_equal(y2, layer.forward(x[1], None if lengths is None else lengths[1:]))
    assert (state2.batch, state2.seq_len) == (1, 7)


@pytest.mark.parametrize("n_kv_heads", [1, 4])
def test_state_size_and_buffer(rng, n_kv_heads):
    layer, _ = make_layer(rng, 32, 4, n_kv_heads=n_kv_heads)
    x = rng.standard_normal((3, 6, 32)).astype(np.float32)
    _, state = layer.forward_train(x)
    assert (state.batch, state.seq_len) == (3, 6)
    assert state.nbytes == layer.train_state_size(3, 6)
    hd, h = layer.head_dim, layer.n_heads
    floats = 3 * 6 * (2 * h + 2 * n_kv_heads) * hd + 3 * h * 6   # selfattn.h: plus a header
    assert floats * 4 < state.nbytes <= floats * 4 + 4096
    buf = state.buffer
    assert buf.dtype == np.uint8 and buf.shape == (state.nbytes,)
    assert buf.ctypes.data % 8 == 0
    assert "batch=3" in repr(state)
    with pytest.raises(InvalidError):
        layer.train_state_size(0, 6)
    with pytest.raises(selfattn.SizeOverflowError):
        layer.train_state_size(2 ** 31, 6)


# ---- backward_train's gradients ----------------------------------------------------------------
GRAD_CASES = [
    pytest.param({}, None, id="plain"),
    pytest.param({"causal": True, "n_kv_heads": 1}, [5, 3], id="causal-gqa-len"),
    pytest.param({"out_proj": False}, [2, 5], id="no-out-proj-len"),
    pytest.param({"rope": 1, "n_kv_heads": 1, "causal": True}, [4, 5],
                 marks=needs_option("rope"), id="rope-gqa-causal-len"),
    pytest.param({"window": 2, "rope": 2, "alibi": True, "softcap": 1.0, "scale": 0.9}, [5, 4],
                 marks=[needs_option("window"), needs_option("rope"), needs_option("alibi"),
                        needs("selfattn_layer_set_float")], id="window-rope-alibi-softcap"),
]


@pytest.mark.parametrize("opts,lengths", GRAD_CASES)
def test_backward_train_matches_reference(rng, opts, lengths):
    layer, W = make_layer(rng, 8, 2, **opts)
    x, dy, want = grad_problem(rng, layer, W, lengths)     # dy's padding rows are NaN
    y, state = layer.forward_train(x, lengths)
    got = layer.backward_train(x, dy, state, lengths)
    check_grads(got, want, layer, lengths)                  # the tolerance of backward's test
    assert_same_grads(got, layer.backward(x, dy, lengths))
    sub = layer.backward_train(x, dy, state, lengths, wrt=("w_q", "x"))
    assert list(sub) == ["x", "w_q"]                         # backward's convention: "x" first
    np.testing.assert_array_equal(sub["w_q"], got["w_q"])
    np.testing.assert_array_equal(sub["x"], got["x"])
    with pytest.raises(ValueError):
        layer.backward_train(x, dy, state, lengths, wrt=("nope",))
    if not layer.out_proj:
        with pytest.raises(ValueError):
            layer.backward_train(x, dy, state, lengths, wrt=("w_o",))


def test_backward_train_2d(rng):
    layer, x, dy, _ = small(rng, causal=True, n_kv_heads=1)
    y, state = layer.forward_train(x[0])
    got = layer.backward_train(x[0], dy[0], state)
    assert got["x"].shape == x[0].shape
    assert_same_grads(got, layer.backward(x[0], dy[0]))
    with pytest.raises(ValueError):
        layer.backward_train(x[0], dy, state)               # dy must have the shape of x


def test_state_serves_several_backward_calls(rng):
    layer, x, dy1, lengths = small(rng, causal=True)
    dy2 = rng.standard_normal(x.shape).astype(np.float32)
    _, state = layer.forward_train(x, lengths)
    before = state.buffer.copy()
    g1 = layer.backward_train(x, dy1, state, lengths)
    g2 = layer.backward_train(x, dy2, state, lengths)
    assert np.array_equal(state.buffer, before)             # the state is only read
    assert_same_grads(g1, layer.backward(x, dy1, lengths))
    assert_same_grads(g2, layer.backward(x, dy2, lengths))
    assert not np.array_equal(g1["x"], g2["x"])
    again = layer.backward_train(x, dy1, state, lengths)
    for name in g1:
        np.testing.assert_array_equal(again[name], g1[name])
    # a second forward's state is independent of the first
    _, state2 = layer.forward_train(x[:, :4], None)
    again = layer.backward_train(x, dy1, state, lengths)
    np.testing.assert_array_equal(again["x"], g1["x"])
    layer.backward_train(x[:, :4], dy2[:, :4], state2)


def test_threads_change_keeps_the_state(rng):
    layer, x, dy, lengths = small(rng)
    _, state = layer.forward_train(x, lengths)
    g = layer.backward_train(x, dy, state, lengths)
    layer.threads = 1                                        # THREADS is not a change of the layer
    g1 = layer.backward_train(x, dy, state, lengths)
    for name in g:
        np.testing.assert_array_equal(g1[name], g[name])    # nor of the results


# ---- errors ------------------------------------------------------------------------------------
def raises_state(layer, x, dy, state, lengths):
    with pytest.raises(StateError) as e:
        layer.backward_train(x, dy, state, lengths)
    assert type(e.value) is StateError
    assert e.value.status == _lib.ERR_STATE
    assert e.value.function == "selfattn_backward_train"


def test_state_of_another_layer(rng):
    layer, W = make_layer(rng, 8, 2)
    twin = selfattn.Layer(8, 2)
    twin.set_weights(**W)                                    # same options, same weights
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    dy = rng.standard_normal((2, 5, 8)).astype(np.float32)
    lengths = [5, 3]
    _, state = layer.forward_train(x, lengths)
    _, twin_state = twin.forward_train(x, lengths)
    raises_state(twin, x, dy, state, lengths)
    raises_state(layer, x, dy, twin_state, lengths)
    layer.backward_train(x, dy, state, lengths)             # still good for its own layer


def test_state_of_other_shapes(rng):
    layer, x, dy, _ = small(rng)
    _, state = layer.forward_train(x)
    raises_state(layer, x[:1], dy[:1], state, None)                        # smaller batch
    raises_state(layer, np.concatenate([x, x]), np.concatenate([dy, dy]), state, None)  # larger
    raises_state(layer, x[:, :4], dy[:, :4], state, None)                  # shorter
    raises_state(layer, np.concatenate([x, x], 1), np.concatenate([dy, dy], 1), state, None)
    raises_state(layer, x[0], dy[0], state, None)                          # 2-D: batch 1
    _, state52 = layer.forward_train(x.reshape(5, 2, 8))                   # same rows
    raises_state(layer, x, dy, state52, None)
    layer.backward_train(x, dy, state)


def test_state_of_other_lengths(rng):
    layer, x, dy, lengths = small(rng, lengths=(5, 3))
    _, state = layer.forward_train(x, lengths)
    raises_state(layer, x, dy, state, [5, 4])
    raises_state(layer, x, dy, state, None)
    raises_state(layer, x, dy, state, [5, 2])
    _, full = layer.forward_train(x)
    raises_state(layer, x, dy, full, [5, 5])                # NULL and [5, 5]: not equal
    layer.backward_train(x, dy, state, np.array([5, 3], np.int64))  # equal values, any int dtype


@pytest.mark.parametrize("change", ["set_weight", "same_weight", "causal", "scale", "rope_theta"])
def test_state_goes_stale(rng, change):
    layer, x, dy, lengths = small(rng)
    _, state = layer.forward_train(x, lengths)
    if change == "set_weight":
        layer.set_weight("b_v", rng.standard_normal(layer.weight_shape("b_v")))
    elif change == "same_weight":
        # any change counts, even to the same values
        layer.set_weight("w_q", np.zeros(layer.weight_shape("w_q"), np.float32) + 0.25)
        _, state = layer.forward_train(x, lengths)
        layer.set_weight("w_q", np.zeros(layer.weight_shape("w_q"), np.float32) + 0.25)
    elif change == "causal":
        layer.causal = True
    elif change == "scale":
        layer.scale = 0.5
    else:
        layer.rope_theta = 500.0
    raises_state(layer, x, dy, state, lengths)
    _, fresh = layer.forward_train(x, lengths)               # a new forward is the remedy
    layer.backward_train(x, dy, fresh, lengths)


@pytest.mark.parametrize("kind", ["none", "str", "int", "dict", "buffer", "tuple"])
def test_wrong_state_type_is_type_error(rng, kind):
    layer, x, dy, lengths = small(rng)
    out = layer.forward_train(x, lengths)
    bad = {"none": None, "str": "state", "int": 0, "dict": {}, "buffer": out[1].buffer,
           "tuple": out}[kind]
    with pytest.raises(TypeError) as e:
        layer.backward_train(x, dy, bad, lengths)
    assert not isinstance(e.value, selfattn.Error)
    assert "TrainState" in str(e.value)


def test_forward_train_errors(rng):
    layer, x, dy, _ = small(rng)
    with pytest.raises(InvalidError) as e:
        layer.forward_train(x, [5, 6])                       # a length past seq_len
    assert type(e.value) is InvalidError and e.value.function == "selfattn_forward_train"
    with pytest.raises(ValueError):
        layer.forward_train(x[..., :4])                      # last dimension is not d_model
    with pytest.raises(ValueError):
        layer.forward_train(x, [5])                          # lengths of another batch
    undetermined = selfattn.Layer(10, 3)                     # head_dim undetermined
    with pytest.raises(StateError):
        undetermined.forward_train(np.zeros((1, 2, 10), np.float32))
    missing = selfattn.Layer(8, 2)                           # no weights
    with pytest.raises(StateError):
        missing.forward_train(x)
    _, state = layer.forward_train(x)
    layer.close()
    with pytest.raises(ValueError):
        layer.forward_train(x)
    with pytest.raises(ValueError):
        layer.backward_train(x, dy, state)

