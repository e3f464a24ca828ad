"""Every error path raises the selfattn.Error subclass of its status code, and leaves the caller's
arrays (and the layer) untouched."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import selfattn
from selfattn import (Error, InvalidError, NoMemoryError, NullError, SizeOverflowError,
                      StateError, UnsupportedError)
from selfattn import _lib
from conftest import make_layer

CLASSES = {1: NullError, 2: InvalidError, 3: NoMemoryError, 4: SizeOverflowError,
           5: StateError, 6: UnsupportedError}


@pytest.mark.parametrize("code", sorted(CLASSES))
def test_status_maps_to_class(code):
    from selfattn._errors import error_for
    e = error_for(code, "selfattn_something", "detail")
    assert type(e) is CLASSES[code] and isinstance(e, Error)
    assert e.status == code
    assert e.status_string == _lib.lib.selfattn_status_string(code).decode()
    assert e.status_string in str(e) and "selfattn_something" in str(e) and "detail" in str(e)
    import pickle
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is type(e) and e2.status == code and str(e2) == str(e)


def test_unknown_status_is_base_error():
    from selfattn._errors import error_for
    e = error_for(99)
    assert type(e) is Error and e.status == 99 and e.status_string  # the library's generic text


def test_builtin_bases():
    assert issubclass(InvalidError, ValueError) and issubclass(NoMemoryError, MemoryError)
    assert issubclass(SizeOverflowError, OverflowError) and issubclass(StateError, RuntimeError)
    assert issubclass(UnsupportedError, NotImplementedError)


def raises(cls, status=None):
    """pytest.raises for exactly cls, checking .status."""
    class Ctx:
        def __enter__(self):
            self.cm = pytest.raises(cls)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            r = self.cm.__exit__(*exc)
            assert type(self.info.value) is cls, "%r is not %s" % (self.info.value, cls.__name__)
            assert self.info.value.status == (cls.code if status is None else status)
            return r
    return Ctx()


# ---- create and options ------------------------------------------------------------------------
@pytest.mark.parametrize("d_model,n_heads", [(0, 1), (-1, 1), (8, 0), (8, -3)])
def test_create_invalid(d_model, n_heads):
    with raises(InvalidError):
        selfattn.Layer(d_model, n_heads)


def test_create_overflow():
    with raises(SizeOverflowError):           # library: 3*d_model rows do not fit int32
        selfattn.Layer(2 ** 31 - 1, 1)
    with raises(SizeOverflowError):           # binding: not an int32_t at all
        selfattn.Layer(2 ** 31, 1)


def test_n_kv_heads_not_dividing():
    with raises(InvalidError):
        selfattn.Layer(32, 4, n_kv_heads=3)
    layer = selfattn.Layer(32, 4)
    with raises(InvalidError):
        layer.n_kv_heads = 3
    assert layer.n_kv_heads == 4              # unchanged


def test_bad_option_values():
    layer = selfattn.Layer(32, 4)
    with raises(InvalidError):
        layer.causal = 4
    with raises(InvalidError):
        layer.threads = selfattn.option_bounds("threads")[1] + 1
    with raises(InvalidError):
        layer.threads = -1
    with raises(InvalidError):
        layer.set("threads", 2 ** 70)          # beyond int64: refused before the call
    for bad in (float("nan"), float("inf"), -float("inf")):
        with raises(InvalidError):
            layer.scale = bad
    assert layer.scale == pytest.approx(8 ** -0.5)        # unchanged: the default
    assert layer.causal is False and layer.threads >= 1
    with pytest.raises(KeyError):
        layer.set("no_such_option", 1)


def test_out_proj_off_needs_matching_width():
    with raises(InvalidError):
        selfattn.Layer(30, 4, head_dim=8, out_proj=False)


def test_shape_options_frozen_after_weight(rng):
    layer = selfattn.Layer(32, 4)
    layer.set_weight("w_q", rng.standard_normal((32, 32)))
    for name, value in (("n_kv_heads", 2), ("head_dim", 4), ("out_proj", False)):
        with raises(StateError):
            layer.set(name, value)
    assert (layer.n_kv_heads, layer.head_dim, layer.out_proj) == (4, 8, True)
    layer.causal = True                        # not a shape option: still allowed


def test_head_dim_undetermined(rng):
    layer = selfattn.Layer(10, 3)
    w = rng.standard_normal((10, 10)).astype(np.float32)
    with raises(StateError):
        layer.set_weight("w_q", w)
    with raises(StateError):
        layer.attend(np.zeros((1, 2, 9), np.float32), np.zeros((1, 2, 9), np.float32),
                     np.zeros((1, 2, 9), np.float32))


# ---- weights -----------------------------------------------------------------------------------
def test_wrong_weight_count(rng):
    layer = selfattn.Layer(32, 4, n_kv_heads=2)
    w = rng.standard_normal(32 * 32 - 1).astype(np.float32)
    keep = w.copy()
    with raises(InvalidError):
        layer.set_weight("w_q", w)
    with raises(InvalidError):
        layer.set_weight("w_k", rng.standard_normal((32, 32)))      # [16][32] expected
    with raises(InvalidError):
        layer.set_weight("b_o", np.zeros(31, np.float32))
    np.testing.assert_array_equal(w, keep)
    with pytest.raises(ValueError):                                   # right count, wrong shape
        layer.set_weight("w_k", rng.standard_normal((32, 16)))
    with pytest.raises(KeyError):
        layer.set_weights(w_x=w)


def test_packed_weight_on_gqa_layer(rng):
    layer = selfattn.Layer(32, 4, n_kv_heads=2)
    with raises(InvalidError):
        layer.set_weight("w_qkv", rng.standard_normal((96, 32)))


def test_w_o_without_out_proj(rng):
    layer = selfattn.Layer(32, 4, out_proj=False)
    with raises(InvalidError):
        layer.set_weight("w_o", rng.standard_normal((32, 32)))
    with raises(InvalidError):
        layer.set_weight("b_o", rng.standard_normal(32))


# ---- forward / attend --------------------------------------------------------------------------
def test_forward_before_weights(rng):
    layer = selfattn.Layer(16, 2)
    x = rng.standard_normal((1, 3, 16)).astype(np.float32)
    keep = x.copy()
    out = np.full_like(x, 7.0)
    with raises(StateError):
        layer(x, out=out)
    for n in ("w_q", "w_k", "w_v"):
        layer.set_weight(n, rng.standard_normal((16, 16)))
    with raises(StateError):                   # W_O still missing
        layer(x, out=out)
    np.testing.assert_array_equal(x, keep)
    assert np.all(out == 7.0)                  # nothing written on failure


@pytest.mark.parametrize("lengths", [[-1, 3], [3, 4], [0, 2 ** 31 - 1], [2 ** 40, 1]])
def test_lengths_out_of_range(rng, lengths):
    layer, _ = make_layer(rng, 16, 2)
    x = rng.standard_normal((2, 3, 16)).astype(np.float32)
    keep, lk = x.copy(), list(lengths)
    out = np.full_like(x, 7.0)
    with raises(InvalidError):
        layer(x, lengths=lengths, out=out)
    np.testing.assert_array_equal(x, keep)
    assert lengths == lk and np.all(out == 7.0)


def test_kv_lengths_out_of_range(rng):
    layer = selfattn.Layer(16, 2)
    q = rng.standard_normal((2, 3, 16)).astype(np.float32)
    k = rng.standard_normal((2, 5, 16)).astype(np.float32)
    keep = (q.copy(), k.copy())
    out = np.full_like(q, 7.0)
    with raises(InvalidError):
        layer.attend(q, k, k, kv_lengths=np.array([6, 1], np.int32), out=out)
    np.testing.assert_array_equal(q, keep[0])
    np.testing.assert_array_equal(k, keep[1])
    assert np.all(out == 7.0)


def test_empty_sequence_is_invalid(rng):
    layer, _ = make_layer(rng, 16, 2)
    with raises(InvalidError):                 # seq_len < 1, from the library
        layer(np.zeros((1, 0, 16), np.float32))
    with raises(InvalidError):                 # batch < 1
        layer(np.zeros((0, 3, 16), np.float32))


def test_shape_errors_in_python(rng):
    layer, _ = make_layer(rng, 16, 2)
    for bad in (np.zeros((1, 3, 15), np.float32), np.zeros(16, np.float32),
                np.zeros((1, 1, 3, 16), np.float32)):
        with pytest.raises(ValueError):
            layer(bad)
    with pytest.raises(ValueError):
        layer(np.zeros((2, 3, 16), np.float32), lengths=[3])
    with pytest.raises(TypeError):
        layer(np.zeros((1, 3, 16), np.float32), lengths=[2.5])
    with pytest.raises(TypeError):
        layer(None)
    q = np.zeros((1, 3, 16), np.float32)
    with pytest.raises(ValueError):
        layer.attend(q, np.zeros((1, 4, 16), np.float32), np.zeros((1, 5, 16), np.float32))
    with pytest.raises(ValueError):
        layer.attend(q, np.zeros((2, 4, 16), np.float32), np.zeros((2, 4, 16), np.float32))


def test_closed_layer(rng):
    layer, _ = make_layer(rng, 16, 2)
    layer.close()
    layer.close()                              # idempotent
    with pytest.raises(ValueError):
        layer(np.zeros((1, 2, 16), np.float32))
    with pytest.raises(ValueError):
        layer.causal = True
    assert "closed" in repr(layer)
    with selfattn.Layer(8, 1) as l2:
        pass
    with pytest.raises(ValueError):
        l2.head_dim


# ---- versions: the new options are validated; an older library is refused at import ------------
@pytest.mark.parametrize("name,value", [("window", 4), ("rope", 1), ("rope_dims", 4), ("alibi", True)])
def test_new_int_options_validated(name, value):
    layer = selfattn.Layer(32, 4, **{name: value})
    assert layer.get(name) == value


@pytest.mark.parametrize("name", ["rope_theta", "softcap"])
def test_new_float_options_validated(name):
    layer = selfattn.Layer(32, 4)
    with raises(InvalidError):
        layer.set(name, -1.0)
    with raises(InvalidError):
        layer.set(name, float("nan"))


def test_import_refuses_an_older_library():
    """import selfattn raises ImportError naming the library, its version and the one required
    when selfattn_version_number() is below 1.3.0 (a child process whose ctypes.CDLL gives a
    stand-in library reporting 1.1.5)."""
    assert _lib.REQUIRED_VERSION_NUMBER == 10300
    _lib.check_version(10300, "x")                              # the required version passes
    _lib.check_version(selfattn.version_number(), _lib.path)    # so does the loaded one
    with pytest.raises(ImportError, match=r"libselfattn 1\.2\.9 \(10209\)"):
        _lib.check_version(10209, "x")                          # 1.2 lacks set_weight_typed
    code = textwrap.dedent("""
        import ctypes
        class OldLibrary:
            def __init__(self, name, *args, **kwargs):
                pass
            def __getattr__(self, name):
                if name == "selfattn_version_number":
                    f = lambda: 10105
                    self.__dict__[name] = f
                    return f
                raise AttributeError(name)
        ctypes.CDLL = OldLibrary
        try:
            import selfattn
            print("NO ERROR")
        except ImportError as e:
            print(type(e).__name__)
            print(e)
    """)
    env = dict(os.environ, SELFATTN_LIBRARY="/old/libselfattn.so.1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    kind, msg = r.stdout.split("\n", 1)
    assert kind == "ImportError", r.stdout
    assert "/old/libselfattn.so.1 is libselfattn 1.1.5 (10105)" in msg, msg
    assert "needs libselfattn 1.3.0 (10300) or newer" in msg, msg
    assert "SELFATTN_LIBRARY" in msg, msg


# ---- allocation failure ------------------------------------------------------------------------
def test_no_memory_in_a_subprocess():
    """NoMemoryError from a forward whose workspace exceeds an address-space limit (RLIMIT_AS,
    set in a child process after a warm-up call so that OpenBLAS has its buffers)."""
    code = textwrap.dedent("""
        import resource, numpy as np, selfattn
        D, L = 256, 8192
        layer = selfattn.Layer(D, 4, threads=1)
        rng = np.random.default_rng(1)
        for n in ("w_q", "w_k", "w_v", "w_o"):
            layer.set_weight(n, rng.standard_normal((D, D)).astype(np.float32) * 0.05)
        layer(np.ones((1, 4, D), np.float32))                   # warm-up: BLAS buffers
        x = rng.standard_normal((1, L, D)).astype(np.float32)
        out = np.full_like(x, 7.0)
        keep = x.copy()
        vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (vm + (4 << 20), resource.RLIM_INFINITY))
        try:
            layer(x, out=out)                                   # needs > 3*L*D*4 = 24 MiB
            print("NO ERROR")
        except selfattn.NoMemoryError as e:
            resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            ok = np.all(out == 7.0) and np.array_equal(x, keep) and e.status == 3
            y = layer(x[:, :16])                                # layer still usable
            print("NOMEM", ok, y.shape)
    """)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "NOMEM True (1, 16, 256)", r.stdout + r.stderr


def test_library_message_names_the_argument():
    """A status from the C library carries selfattn_last_error(): the check and the values."""
    layer = selfattn.Layer(16, 2)
    with pytest.raises(selfattn.InvalidError) as e:
        layer.set_weight("w_q", np.zeros(3, np.float32))
    assert e.value.library_message.startswith("selfattn_layer_set_weight: ")
    assert "count 3" in e.value.library_message and "256" in e.value.library_message
    assert e.value.library_message in str(e.value)
