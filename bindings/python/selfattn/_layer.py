"""selfattn.Layer and selfattn.Cache: the C handles behind Python objects."""
import ctypes
import math
import operator
import weakref

import numpy as np

from . import _lib, _torch
from ._errors import (Error, InvalidError, SizeOverflowError, StateError, error_for, unsupported)

_C = _lib.lib
_F32 = np.dtype(np.float32)
_F16 = np.dtype(np.float16)
_U16, _I16 = np.dtype(np.uint16), np.dtype(np.int16)
_I32 = np.dtype(np.int32)
_I32_MIN, _I32_MAX = -2 ** 31, 2 ** 31 - 1
_I64_MIN, _I64_MAX = -2 ** 63, 2 ** 63 - 1

ROPE_NONE, ROPE_HALF, ROPE_ADJACENT = 0, 1, 2
_ROPE_NAMES = {"none": 0, "half": 1, "neox": 1, "rotate_half": 1,
               "adjacent": 2, "gptj": 2, "interleaved": 2}

# selfattn_dtype (1.3): the names weight_dtype, kv_dtype and set_weight's dtype= take; reading
# an option gives the first (short) name
_DTYPE_NAMES = {"f32": _lib.DTYPE_F32, "float32": _lib.DTYPE_F32,
                "f16": _lib.DTYPE_F16, "float16": _lib.DTYPE_F16, "half": _lib.DTYPE_F16,
                "bf16": _lib.DTYPE_BF16, "bfloat16": _lib.DTYPE_BF16}
_DTYPE_STR = {_lib.DTYPE_F32: "f32", _lib.DTYPE_F16: "f16", _lib.DTYPE_BF16: "bf16"}


def _dtype_code(value, what):
    """The selfattn_dtype of a dtype given as "f32" / "f16" / "bf16" (or "float32", "float16",
    "half", "bfloat16"), a NumPy dtype (np.float32, np.float16), a torch dtype (torch.float32,
    torch.float16, torch.bfloat16: recognised by name, torch is not imported) or the C value
    (0, 1, 2). Anything else is a ValueError naming the accepted values."""
    if isinstance(value, str):
        name = value.lower()
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return operator.index(value)       # the C value: the library checks its range
    elif str(value).startswith("torch."):
        name = str(value)[len("torch."):]
    else:
        try:
            name = np.dtype(value).name
        except TypeError:
            name = None
    if name not in _DTYPE_NAMES:
        raise ValueError("%s must be one of \"f32\", \"f16\", \"bf16\" (or np.float32, "
                         "np.float16), got %r" % (what, value))
    return _DTYPE_NAMES[name]


def _dtype_str(code):
    return _DTYPE_STR.get(code, code)

# causal (SELFATTN_OPT_CAUSAL, 1.3 alignments): False/0 none, True/1/"bottom_right" aligned to
# the bottom right of kv_len, 2/"top_left" (PyTorch SDPA is_causal), 3/"varlen" (bottom right of
# each sequence's kv_lengths, FlashAttention's varlen rule). Read back: False, True, "top_left",
# "varlen".
_CAUSAL_NAMES = {"bottom_right": 1, "top_left": 2, "varlen": 3}
_CAUSAL_STR = {0: False, 1: True, 2: "top_left", 3: "varlen"}


def _causal_code(value):
    if isinstance(value, str):
        try:
            return _CAUSAL_NAMES[value.lower()]
        except KeyError:
            raise ValueError("causal must be False, True or one of \"bottom_right\", \"top_left\", "
                             "\"varlen\" (or 0..3), got %r" % (value,)) from None
    return operator.index(value)       # bool included; the library checks the range


def _causal_str(code):
    return _CAUSAL_STR.get(code, code)


# stage of the scores out (1.3): 0 (q.k)*scale, 1 after the softcap, 2 the final scores
_STAGE_NAMES = {"raw": 0, "softcap": 1, "final": 2}


def _stage_code(value):
    if isinstance(value, str):
        try:
            return _STAGE_NAMES[value.lower()]
        except KeyError:
            raise ValueError("scores must be None, 0/\"raw\", 1/\"softcap\" or 2/\"final\", got "
                             "%r" % (value,)) from None
    return operator.index(value)       # the library checks the range (InvalidError)


# name -> (option value, first version, converter for reading)
_INT_OPTIONS = {
    "n_kv_heads": (_lib.OPT_N_KV_HEADS, int),
    "head_dim": (_lib.OPT_HEAD_DIM, int),
    "causal": (_lib.OPT_CAUSAL, _causal_str),
    "out_proj": (_lib.OPT_OUT_PROJ, bool),
    "threads": (_lib.OPT_THREADS, int),
    "window": (_lib.OPT_WINDOW, int),
    "rope": (_lib.OPT_ROPE, int),
    "rope_dims": (_lib.OPT_ROPE_DIMS, int),
    "alibi": (_lib.OPT_ALIBI, bool),
    "weight_dtype": (_lib.OPT_WEIGHT_DTYPE, _dtype_str),    # 1.3: read back as "f32"/"f16"/"bf16"
    "kv_dtype": (_lib.OPT_KV_DTYPE, _dtype_str),
    "v_head_dim": (_lib.OPT_V_HEAD_DIM, int),                  # 1.3: reads the effective dv
}
_FLOAT_OPTIONS = {"scale": _lib.FOPT_SCALE, "rope_theta": _lib.FOPT_ROPE_THETA,
                  "softcap": _lib.FOPT_SOFTCAP}
_WEIGHTS = {"w_q": _lib.W_Q, "w_k": _lib.W_K, "w_v": _lib.W_V, "w_o": _lib.W_O,
            "b_q": _lib.B_Q, "b_k": _lib.B_K, "b_v": _lib.B_V, "b_o": _lib.B_O,
            "w_qkv": _lib.W_QKV, "b_qkv": _lib.B_QKV}
_GRAD_NAMES = ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")
# the weights a call needs (selfattn.h, selfattn_forward: W_Q, W_K, W_V or W_QKV, and W_O with
# the output projection on), as the parts each set_weight name provides; biases are optional
_PROVIDES = {"w_q": "q", "w_k": "k", "w_v": "v", "w_qkv": "qkv", "w_o": "o"}


def _check(status, function, detail=None):
    if status:
        raise error_for(status, function, detail, from_library=True)


def _int32(value, what):
    v = operator.index(value)
    if not _I32_MIN <= v <= _I32_MAX:
        raise SizeOverflowError(_lib.ERR_OVERFLOW, None, "%s = %d does not fit int32_t" % (what, v))
    return v


def option_bounds(name):
    """(lower, upper) inclusive bounds of an integer option, e.g. option_bounds("threads")
    (0 = default is accepted as well). UnsupportedError for an option the library lacks."""
    opt = _INT_OPTIONS[name][0]
    lo, hi = ctypes.c_int64(), ctypes.c_int64()
    st = _C.selfattn_option_bounds(opt, ctypes.byref(lo), ctypes.byref(hi))
    if st == _lib.ERR_INVALID:
        raise unsupported("option %r" % name)
    _check(st, "selfattn_option_bounds")
    return lo.value, hi.value


def _array(a, what):
    """a as an ndarray of its own dtype (no copy for an ndarray or a CPU tensor): a tensor that
    requires grad is detached first (PyTorch refuses .numpy() on it), and complex values are
    refused (TypeError naming the dtype) rather than cast to float with the imaginary part lost."""
    if type(a) is not np.ndarray:
        if a is None:
            raise TypeError("%s: an array is required, got None" % what)
        if getattr(a, "requires_grad", False) and callable(getattr(a, "detach", None)):
            a = a.detach()
        try:
            a = np.asarray(a)
        except (TypeError, ValueError) as e:
            raise TypeError("%s: cannot convert to a float32 array: %s" % (what, e)) from None
    if a.dtype.kind == "c":
        raise TypeError("%s: complex dtype %s is not supported (the layer is real: float32); pass "
                        "the real part (a.real) explicitly if that is what you mean"
                        % (what, a.dtype))
    return a


def _f32(a, what, seq_first=False):
    """a as a float32 C-contiguous ndarray: a itself when it already is one, else one copy
    (after _array: a tensor that requires grad is detached, complex values are refused).
    seq_first: a 3-D a is [seq][batch][...] and the result [batch][seq][...] (one copy)."""
    if not seq_first and type(a) is np.ndarray and a.dtype is _F32 and a.flags.c_contiguous:
        return a
    a = _array(a, what)
    if seq_first and a.ndim == 3:
        a = a.swapaxes(0, 1)
    try:
        return np.ascontiguousarray(a, dtype=_F32)
    except (TypeError, ValueError) as e:
        raise TypeError("%s: cannot convert to a float32 array: %s" % (what, e)) from None


def _weight_data(value, what, dtype):
    """(C-contiguous array, selfattn_dtype) of a weight for selfattn_layer_set_weight_typed.
    dtype None: float16 -> F16 bits (exactly), a torch.bfloat16 / torch.float16 tensor -> its
    bits, uint16 -> TypeError (bits of which format?), any other real array -> float32 values.
    dtype "f16" / "bf16": float16 (f16 only) or uint16 / int16 bit patterns, nothing else (a
    float array is not rounded here: pass it without dtype= and the layer rounds it).
    dtype "f32": float32 values, as without dtype= (uint16 values included)."""
    code = None if dtype is None else _dtype_code(dtype, "dtype")
    if code in (None, _lib.DTYPE_F32) and type(value) is np.ndarray and value.dtype is _F32 \
            and value.flags.c_contiguous:
        return value, _lib.DTYPE_F32
    if code in (None, _lib.DTYPE_F16, _lib.DTYPE_BF16):
        bits = _torch.half_bits(value)      # a torch half tensor: (uint16 bits, its dtype)
        if bits is not None:
            if code is not None and code != bits[1]:
                raise TypeError("%s: a torch.%s tensor given with dtype=%r"
                                % (what, "bfloat16" if bits[1] == _lib.DTYPE_BF16 else "float16",
                                   dtype))
            return bits
    a = _array(value, what)
    if code is None:
        if a.dtype == _F16:
            return np.ascontiguousarray(a.view(_U16)), _lib.DTYPE_F16
        if a.dtype == _U16:
            raise TypeError("%s: a uint16 array is ambiguous: pass dtype=\"bf16\" (bfloat16 bit "
                            "patterns) or dtype=\"f16\" (float16 bit patterns), or convert it to "
                            "float32 if it holds the values themselves" % what)
        code = _lib.DTYPE_F32
    if code == _lib.DTYPE_F32:
        return _f32(a, what), code
    if a.dtype in (_U16, _I16) or (code == _lib.DTYPE_F16 and a.dtype == _F16):
        return np.ascontiguousarray(a.view(_U16)), code
    raise TypeError("%s: dtype=%r takes %s, got dtype %s; pass float values without dtype= "
                    "(the layer rounds them to its weight_dtype)"
                    % (what, dtype, "float16 values or uint16 bit patterns"
                       if code == _lib.DTYPE_F16 else "uint16 bit patterns (NumPy has no "
                       "bfloat16: e.g. tensor.view(torch.int16).numpy().view(np.uint16))",
                       a.dtype))


def _int32_array(a, n, what):
    """[n] int32 C-contiguous array from a sequence of integers; values beyond int32 raise
    InvalidError (they are out of any valid range); the C call checks the rest."""
    arr = np.asarray(a)
    if arr.shape != (n,):
        raise ValueError("%s must have shape (%d,), got %s" % (what, n, arr.shape))
    if arr.dtype is not _I32:
        if arr.dtype.kind not in "iu":
            raise TypeError("%s must hold integers, got dtype %s" % (what, arr.dtype))
        if n and (int(arr.min()) < _I32_MIN or int(arr.max()) > _I32_MAX):
            raise InvalidError(_lib.ERR_INVALID, None, "%s holds a value outside int32_t" % what)
        arr = arr.astype(_I32)
    return np.ascontiguousarray(arr)


def _out_array(out, shape, what="out"):
    if out is None:
        return np.empty(shape, _F32)
    if type(out) is not np.ndarray or out.dtype is not _F32 or not out.flags.c_contiguous \
            or not out.flags.writeable:
        raise TypeError("%s must be a writeable C-contiguous float32 numpy array" % what)
    if out.shape != shape:
        raise ValueError("%s must have shape %s, got %s" % (what, shape, out.shape))
    return out


def _split3(a, what, width, width_name):
    """(batch, rows, was_2d) of a [batch][rows][width] or [rows][width] array."""
    s = a.shape
    if len(s) == 3:
        b, n, w = s
        two = False
    elif len(s) == 2:
        b, (n, w) = 1, s
        two = True
    else:
        raise ValueError("%s must be [batch][len][%s] (or [len][%s]), got shape %s"
                         % (what, width_name, width_name, s))
    if w != width:
        raise ValueError("%s: last dimension must be %s = %d, got %d" % (what, width_name, width, w))
    if b > _I32_MAX or n > _I32_MAX:
        raise SizeOverflowError(_lib.ERR_OVERFLOW, None, "%s: shape %s does not fit int32_t" % (what, s))
    return b, n, two


def _bias_view(bias, full):
    """(array to keep alive, pointer, stride_batch, stride_head, stride_row) describing `bias`
    broadcast to full = (batch, n_heads, q_len, kv_len), strides in floats, 0 where broadcast.
    Copies only when the keys are not contiguous in memory (or dtype/sign of strides require)."""
    b = _array(bias, "attn_bias")
    orig = b.shape
    if b.dtype == np.bool_:
        raise TypeError("attn_bias is additive (float): for a boolean mask pass "
                        "np.where(allowed, 0.0, -np.inf)")
    if b.ndim > 4:
        raise ValueError("attn_bias must broadcast to [batch][n_heads][q_len][kv_len] = %s, "
                         "got shape %s" % (full, orig))
    b = b.astype(_F32, copy=False)
    kv = full[3]
    if (b.ndim == 0 or b.shape[-1] == 1) and kv != 1:
        # the C struct has no key stride: keys must be consecutive floats
        b = np.ascontiguousarray(np.broadcast_to(b, (b.shape[:-1] if b.ndim else ()) + (kv,)))
    ok = all(st > 0 and st % 4 == 0 for n, st in zip(b.shape, b.strides) if n != 1)
    if not ok or (b.ndim and b.shape[-1] != 1 and b.strides[-1] != 4):
        b = np.ascontiguousarray(b)
    try:
        v = np.broadcast_to(b, full)
    except ValueError:
        raise ValueError("attn_bias of shape %s does not broadcast to "
                         "[batch][n_heads][q_len][kv_len] = %s" % (orig, full)) from None
    strides = [0 if full[i] == 1 else v.strides[i] // 4 for i in range(3)]
    return b, v.ctypes.data, strides[0], strides[1], strides[2]


class _Handle:
    """The lifetime Layer and Cache share: the C handle in _h, released by close() (idempotent;
    also at garbage collection and at the end of a with block) through the class's _destroy;
    _handle() gives it, or raises ValueError once closed."""

    _what = "handle"

    @staticmethod
    def _destroy(h):
        raise NotImplementedError

    def close(self):
        """Release the C object. Idempotent."""
        h, self._h = self._h, None
        if h is not None:
            self._destroy(h)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _handle(self):
        h = self._h
        if h is None:
            raise ValueError("selfattn.%s: the %s is closed" % (self._what, self._what.lower()))
        return h


class Layer(_Handle):
    """One multi-head self-attention layer (libselfattn's selfattn_layer) with its own copy of
    the weights.

    Layer(d_model, n_heads, *, n_kv_heads=None, head_dim=None, causal=False, out_proj=True,
          threads=0, scale=None, window=None, rope=None, rope_dims=None, rope_theta=None,
          alibi=None, softcap=None, batch_first=True, weight_dtype="f32", kv_dtype="f32",
          v_head_dim=None)

    None leaves an option at the library default.

    v_head_dim (libselfattn 1.3, SELFATTN_OPT_V_HEAD_DIM): dv, the width of each value head
    (default head_dim). Q and K keep head_dim; W_V is [n_kv_heads*dv][d_model], W_O
    [d_model][n_heads*dv], attend's v [batch][kv_len][n_kv_heads*dv] and its output
    [batch][q_len][n_heads*dv]; w_qkv is refused when dv != head_dim. Fixed once a weight is set.

    weight_dtype and kv_dtype (libselfattn 1.3: "f32", "f16" or "bf16", or np.float32 /
    np.float16): how the layer stores W_Q, W_K, W_V, W_O (rounded once, to nearest even, when set;
    biases stay float32) and how a Cache created from it stores K and V. Arithmetic and all
    activations stay float32. weight_dtype is fixed once a weight is set (StateError after).

    Calling the layer runs it: y = layer(x) with x [batch][seq_len][d_model] (a 2-D
    [seq_len][d_model] x is one sequence, and y is 2-D then). Inputs that are not C-contiguous
    float32 numpy arrays are converted once (np.ascontiguousarray(x, dtype=np.float32), a copy).

    batch_first=False (the binding's, not a C option; from_torch copies the module's): every
    method taking the layer's input x (calling it, forward, backward, forward_train,
    backward_train, Cache) takes and returns [seq_len][batch][d_model] instead, as
    torch.nn.MultiheadAttention(batch_first=False) does; y and dx are then transposed views of
    [batch][seq_len][d_model] arrays. lengths, attn_bias, the weights and lse keep batch first
    (as PyTorch's key_padding_mask and weights), and so do attend and attend_backward.

    Threads: any number of Python threads may call the same layer at once (the GIL is released
    during the C call); setting options or weights, and close(), need exclusive access.
    """

    def __init__(self, d_model, n_heads, *, n_kv_heads=None, head_dim=None, causal=False,
                 out_proj=True, threads=0, scale=None, window=None, rope=None, rope_dims=None,
                 rope_theta=None, alibi=None, softcap=None, batch_first=True,
                 weight_dtype="f32", kv_dtype="f32", v_head_dim=None):
        self._h = None
        self._seq_first = batch_first is not None and not batch_first
        self._caches = weakref.WeakSet()
        self._have = set()        # "q", "k", "v", "o": the weights set through set_weight
        d_model = _int32(d_model, "d_model")
        n_heads = _int32(n_heads, "n_heads")
        out = ctypes.c_void_p()
        _check(_C.selfattn_layer_create(d_model, n_heads, ctypes.byref(out)),
               "selfattn_layer_create", "d_model=%d, n_heads=%d" % (d_model, n_heads))
        self._h = out.value
        self._d_model, self._n_heads = d_model, n_heads
        try:
            # shape options first (they must precede any weight), ROPE_DIMS after HEAD_DIM
            for name, value in (("n_kv_heads", n_kv_heads), ("head_dim", head_dim),
                                ("v_head_dim", v_head_dim),
                                ("out_proj", None if out_proj is True else out_proj),
                                ("weight_dtype", None if weight_dtype is None
                                 else _dtype_code(weight_dtype, "weight_dtype") or None),
                                ("kv_dtype", None if kv_dtype is None
                                 else _dtype_code(kv_dtype, "kv_dtype") or None),
                                ("causal", causal or None), ("threads", threads or None),
                                ("window", window), ("rope", rope), ("rope_dims", rope_dims),
                                ("alibi", alibi)):
                if value is not None:
                    self.set(name, value)
            for name, value in (("scale", scale), ("rope_theta", rope_theta),
                                ("softcap", softcap)):
                if value is not None:
                    self.set(name, value)
        except BaseException:
            self.close()
            raise

    # ---- lifetime ------------------------------------------------------------------------------
    _what = "Layer"

    @staticmethod
    def _destroy(h):
        _C.selfattn_layer_destroy(h)

    def close(self):
        """Release the C layer (and first any Cache bound to it). Idempotent; later calls on
        the layer raise ValueError. Needs exclusive access (no call running on it)."""
        for c in list(self._caches):
            c.close()
        _Handle.close(self)

    @property
    def handle(self):
        """The selfattn_layer * as an int (for calling the C library directly via ctypes)."""
        return self._handle()

    # ---- options -------------------------------------------------------------------------------
    @property
    def d_model(self):
        return self._d_model

    @property
    def batch_first(self):
        """False when x is [seq_len][batch][d_model] (Layer(..., batch_first=False), or
        from_torch of a module with batch_first=False); fixed at creation."""
        return not self._seq_first

    @property
    def n_heads(self):
        return self._n_heads

    def set(self, name, value):
        """Set an option by name: an integer option (n_kv_heads, head_dim, causal, out_proj,
        threads, window, rope, rope_dims, alibi, weight_dtype, kv_dtype, v_head_dim) with
        selfattn_layer_set,
        or a real one (scale, rope_theta, softcap) with selfattn_layer_set_float (scale:
        selfattn_layer_set_scale). weight_dtype and kv_dtype take "f32", "f16", "bf16" (or a
        NumPy dtype, see Layer)."""
        h = self._handle()
        if name in _FLOAT_OPTIONS:
            value = float(value)
            if name == "scale":
                _check(_C.selfattn_layer_set_scale(h, value), "selfattn_layer_set_scale",
                       "scale=%r" % value)
                return
            _check(_C.selfattn_layer_set_float(h, _FLOAT_OPTIONS[name], value),
                   "selfattn_layer_set_float", "%s=%r" % (name, value))
            return
        if name not in _INT_OPTIONS:
            raise KeyError("unknown option %r" % name)
        opt = _INT_OPTIONS[name][0]
        if name == "rope" and isinstance(value, str):
            try:
                value = _ROPE_NAMES[value.lower()]
            except KeyError:
                raise ValueError("rope must be 0/1/2 or one of %s" % sorted(_ROPE_NAMES)) from None
        elif name in ("weight_dtype", "kv_dtype"):
            value = _dtype_code(value, name)
        elif name == "causal":
            value = _causal_code(value)
        v = operator.index(value)
        if not _I64_MIN <= v <= _I64_MAX:
            raise InvalidError(_lib.ERR_INVALID, "selfattn_layer_set", "%s=%d" % (name, v))
        st = _C.selfattn_layer_set(h, opt, v)
        if st == _lib.ERR_STATE and name == "weight_dtype":
            raise error_for(st, "selfattn_layer_set",
                            "weight_dtype=%s: the weight dtype is fixed once a weight is set (pass "
                            "weight_dtype= to Layer(...), before set_weight)" % _dtype_str(v),
                            from_library=True)
        _check(st, "selfattn_layer_set", "%s=%d" % (name, v))

    def get(self, name):
        """The effective value of an option (defaults resolved), by name."""
        h = self._handle()
        if name in _FLOAT_OPTIONS:
            out = ctypes.c_double()
            _check(_C.selfattn_layer_get_float(h, _FLOAT_OPTIONS[name], ctypes.byref(out)),
                   "selfattn_layer_get_float", name)
            return out.value
        if name not in _INT_OPTIONS:
            raise KeyError("unknown option %r" % name)
        opt, conv = _INT_OPTIONS[name]
        out = ctypes.c_int64()
        _check(_C.selfattn_layer_get(h, opt, ctypes.byref(out)), "selfattn_layer_get", name)
        return conv(out.value)

    def _prop(name, doc):  # noqa: N805 (builds the properties below)
        return property(lambda self: self.get(name), lambda self, v: self.set(name, v), doc=doc)

    n_kv_heads = _prop("n_kv_heads", "key/value heads (grouped-query attention); must divide n_heads")
    head_dim = _prop("head_dim", "size of one head; 0 while undetermined")
    v_head_dim = _prop("v_head_dim", "width of each value head, dv (1.3): head_dim by default "
                       "(reading gives the effective dv); fixed once a weight is set")
    causal = _prop("causal", "causal mask: False, True (= \"bottom_right\": aligned to the bottom "
                   "right), or (1.3, attend and attend_backward) \"top_left\" (PyTorch SDPA "
                   "is_causal) or \"varlen\" (bottom right of each sequence's kv_lengths); the "
                   "whole-layer calls take the last two as True")
    out_proj = _prop("out_proj", "apply W_O")
    threads = _prop("threads", "worker threads one call may use (reading gives the effective count)")
    scale = _prop("scale", "score scale (default 1/sqrt(head_dim)); setting 0 restores it")
    window = _prop("window", "sliding window (1.1); 0 = none")
    rope = _prop("rope", "rotary embedding (1.1): 0 none, 1 rotate-half (NeoX), 2 adjacent (GPT-J)")
    rope_dims = _prop("rope_dims", "rotated leading dimensions of each head (1.1)")
    rope_theta = _prop("rope_theta", "rotary base (1.1), default 10000")
    alibi = _prop("alibi", "ALiBi position bias (1.1)")
    softcap = _prop("softcap", "score soft cap c: s -> c*tanh(s/c) (1.1); 0 = off")
    weight_dtype = _prop("weight_dtype", "storage of W_Q, W_K, W_V, W_O (1.3): \"f32\", \"f16\" or "
                         "\"bf16\"; fixed once a weight is set")
    kv_dtype = _prop("kv_dtype", "storage of K and V in a Cache created from now on (1.3): "
                     "\"f32\", \"f16\" or \"bf16\"")
    del _prop

    def __repr__(self):
        if self._h is None:
            return "<selfattn.Layer (closed)>"
        return ("selfattn.Layer(d_model=%d, n_heads=%d, n_kv_heads=%d, head_dim=%d, causal=%s, "
                "out_proj=%s%s%s%s%s)" % (self._d_model, self._n_heads, self.n_kv_heads,
                                        self.head_dim, self.causal, self.out_proj,
                                        "" if self._dv() == self.head_dim
                                        else ", v_head_dim=%d" % self._dv(),
                                        "" if self.weight_dtype == "f32"
                                        else ", weight_dtype=%r" % self.weight_dtype,
                                        "" if self.kv_dtype == "f32"
                                        else ", kv_dtype=%r" % self.kv_dtype,
                                        ", batch_first=False" if self._seq_first else ""))

    # ---- weights -------------------------------------------------------------------------------
    def weight_shape(self, name):
        """The shape a weight or bias must have, e.g. weight_shape("w_q") == (n_heads*head_dim,
        d_model); w_v, b_v and w_o take the value heads' width dv (v_head_dim). None while
        head_dim is undetermined."""
        hd = self.head_dim
        if not hd:
            return None
        dv = self._dv()
        q, kv, d = self._n_heads * hd, self.n_kv_heads * hd, self._d_model
        qv, kvv = self._n_heads * dv, self.n_kv_heads * dv
        return {"w_q": (q, d), "w_k": (kv, d), "w_v": (kvv, d), "w_o": (d, qv),
                "b_q": (q,), "b_k": (kv,), "b_v": (kvv,), "b_o": (d,),
                "w_qkv": (3 * d, d), "b_qkv": (3 * d,)}[name]

    def set_weight(self, name, value, dtype=None):
        """Copy one weight or bias into the layer (selfattn_layer_set_weight, or
        selfattn_layer_set_weight_typed for half-precision data). name is one of w_q, w_k, w_v,
        w_o, b_q, b_k, b_v, b_o, w_qkv, b_qkv; layouts as torch.nn.Linear
        ([out_features][in_features]). The element count is checked by the library
        (InvalidError); a 2-D array with the right count but another shape (e.g. transposed)
        is refused here with ValueError.

        The data: float32 (other real arrays are converted to float32 values, a copy); float16
        (passed as its bits, exactly); bfloat16 as uint16 bit patterns with dtype="bf16" (NumPy
        has no bfloat16); a torch.float16 / torch.bfloat16 tensor (its bits). A uint16 array
        without dtype= is a TypeError (dtype="bf16" or "f16" says which bits they are). The
        layer converts weights to its weight_dtype (bit for bit when already in it; a finite
        value that would round to infinity, e.g. 70000.0 into "f16", is InvalidError and
        changes nothing), biases to float32."""
        h = self._handle()
        if name not in _WEIGHTS:
            raise KeyError("unknown weight %r (one of %s)" % (name, ", ".join(_WEIGHTS)))
        a, code = _weight_data(value, name, dtype)
        shape = self.weight_shape(name)
        if shape is not None and a.size == math.prod(shape) and a.ndim > 1 and a.shape != shape:
            raise ValueError("%s must have shape %s ([out_features][in_features]), got %s"
                             % (name, shape, a.shape))
        detail = "%s with %d elements%s" % (
            name, a.size, "" if shape is None else ", expected %s" % (shape,))
        if code == _lib.DTYPE_F32:
            fn = "selfattn_layer_set_weight"
            st = _C.selfattn_layer_set_weight(h, _WEIGHTS[name], a.ctypes.data, a.size)
        else:
            fn = "selfattn_layer_set_weight_typed"
            st = _C.selfattn_layer_set_weight_typed(h, _WEIGHTS[name], code, a.ctypes.data,
                                                    a.size)
            detail += " given as %s" % _DTYPE_STR[code]
        if st == _lib.ERR_INVALID and shape is not None and a.size == math.prod(shape) \
                and name.startswith("w_") and self.weight_dtype != "f32":
            detail += ("; a finite value that rounds to infinity in the layer's weight_dtype %s "
                       "(f16: |w| >= 65520) is refused" % self.weight_dtype)
        _check(st, fn, detail)
        self._have.update(_PROVIDES.get(name, ""))

    def set_weights(self, dtype=None, **weights):
        """set_weights(w_q=..., w_k=..., w_v=..., w_o=..., b_q=..., ..., w_qkv=..., b_qkv=...,
        dtype=None): set_weight for each given (None values are skipped), in the order given,
        with the same dtype= for all (e.g. dtype="bf16" for uint16 bit patterns)."""
        for name, value in weights.items():
            if name not in _WEIGHTS:
                raise KeyError("unknown weight %r (one of %s)" % (name, ", ".join(_WEIGHTS)))
        for name, value in weights.items():
            if value is not None:
                self.set_weight(name, value, dtype)

    def missing_weights(self):
        """The weights a call still needs, as set_weight names (e.g. ["w_o"]): w_q, w_k, w_v
        (or all three at once as w_qkv) and, with the output projection on, w_o. Counts what
        was set through this object's set_weight (not through the raw C handle)."""
        have = self._have
        missing = [n for n in ("w_q", "w_k", "w_v") if n[-1] not in have]
        if self.out_proj and "o" not in have:
            missing.append("w_o")
        return missing

    def _state_detail(self):
        """Why a whole-layer call (forward, backward, the cache) answered SELFATTN_ERR_STATE, as
        far as the binding can tell: head_dim undetermined or the weights not set; None when
        neither (then the caller's own reason applies)."""
        if not self.head_dim:
            return "head_dim undetermined: d_model not divisible by n_heads and head_dim unset"
        missing = self.missing_weights()
        if not missing:
            return None
        why = []
        for n in missing:
            if n == "w_o":
                why.append("W_O is not set (needed with the output projection on; set_weight("
                           "'w_o', ...), or Layer(..., out_proj=False) before any weight)")
            else:
                why.append("%s is not set (needed by every call; set_weight(%r, ...), or w_q, "
                           "w_k and w_v at once as w_qkv)" % (n.upper(), n))
        return "; ".join(why)

    def _check_call(self, status, function, detail=None):
        """_check for a whole-layer call: a STATE status names the missing weights."""
        if status:
            own = self._state_detail() if status == _lib.ERR_STATE else None
            # the binding's own account of missing weights, or the library's message
            raise error_for(status, function, own or detail, from_library=not own)

    @classmethod
    def from_torch(cls, module, **options):
        """A Layer with the weights of a torch.nn.MultiheadAttention (see selfattn.from_torch)."""
        return _torch.from_torch(module, cls, **options)

    # ---- running -------------------------------------------------------------------------------
    def __call__(self, x, lengths=None, attn_bias=None, return_weights=False, return_lse=False,
                 out=None, scores=None):
        """y = layer(x, lengths=None, attn_bias=None, return_weights=False, return_lse=False,
        scores=None)

        x: [batch][seq_len][d_model] (or [seq_len][d_model]). lengths: None or [batch] valid
        lengths (keys at or past lengths[b] masked, those query rows zero). Returns y, the shape
        of x; or, with return_weights / return_lse (libselfattn 1.1, selfattn_forward_ex), a
        tuple (y, weights) / (y, lse) / (y, weights, lse), weights [batch][n_heads][seq][seq],
        lse [batch][n_heads][seq] (batch dimension dropped for a 2-D x). attn_bias (1.1): an
        additive float bias broadcastable to [batch][n_heads][seq][seq] (-inf masks a key).
        scores (1.3): None, or a stage, 0/"raw" ((q.k)*scale), 1/"softcap" (after the softcap),
        2/"final" (the scores the softmax takes, -inf at masked keys): the scores before the
        softmax, [batch][n_heads][seq][seq], appended to the tuple (after weights and lse);
        stages 0 and 1 hold every key below the length, masked or not, and padding rows and keys
        past the length are -inf. out: optional float32 C-contiguous array for y. With
        batch_first=False, x and y (and out) are [seq_len][batch][d_model]; y is then a
        transposed view."""
        if self._seq_first:
            return self._call_seq_first(x, lengths, attn_bias, return_weights, return_lse, out,
                                        scores)
        return self._call(x, lengths, attn_bias, return_weights, return_lse, out, scores)

    forward = __call__

    def _call_seq_first(self, x, lengths, attn_bias, return_weights, return_lse, out,
                        scores=None):
        """__call__ of a batch_first=False layer: _call on x transposed to batch first (one
        copy), y transposed back (a view, or copied into out)."""
        x = _f32(x, "x", seq_first=True)                  # [batch][seq][d_model] now
        if x.ndim != 3:                                   # [seq][d_model]: the same either way
            if x.ndim != 2:
                raise ValueError("x must be [seq_len][batch][d_model] (batch_first=False) or "
                                 "[seq_len][d_model], got shape %s" % (x.shape,))
            return self._call(x, lengths, attn_bias, return_weights, return_lse, out, scores)
        if out is not None:
            out = _out_array(out, (x.shape[1], x.shape[0], x.shape[2]))
        res = self._call(x, lengths, attn_bias, return_weights, return_lse, None, scores)
        y = (res[0] if type(res) is tuple else res).swapaxes(0, 1)
        if out is not None:
            out[...] = y
            y = out
        return (y,) + res[1:] if type(res) is tuple else y

    def _call(self, x, lengths, attn_bias, return_weights, return_lse, out, scores=None):
        """__call__ on a batch-first x."""
        h = self._h
        if h is None:
            self._handle()
        if type(x) is not np.ndarray or x.dtype is not _F32 or not x.flags.c_contiguous:
            x = _f32(x, "x")
        batch, seq, two = _split3(x, "x", self._d_model, "d_model")
        lp = None
        if lengths is not None:
            lengths = _int32_array(lengths, batch, "lengths")
            lp = lengths.ctypes.data
        y = np.empty(x.shape, _F32) if out is None else _out_array(out, x.shape)
        if attn_bias is None and not return_weights and not return_lse and scores is None:
            st = _C.selfattn_forward(h, batch, seq, x.ctypes.data, lp, y.ctypes.data)
            if st:
                self._check_call(st, "selfattn_forward")
            return y
        ex, keep, extra = self._extras(batch, seq, seq, attn_bias, return_weights, return_lse, two,
                                       scores)
        self._check_call(_C.selfattn_forward_ex(h, batch, seq, x.ctypes.data, lp,
                                                ctypes.addressof(ex), y.ctypes.data),
                         "selfattn_forward_ex")
        return (y,) + extra if extra else y

    def _extras(self, batch, q_len, kv_len, attn_bias, return_weights, return_lse, two,
                scores=None):
        ex = _lib.Extras()
        ex.struct_size = ctypes.sizeof(_lib.Extras)
        keep = None
        nh = self._n_heads
        if attn_bias is not None:
            keep, ex.attn_bias, ex.bias_stride_batch, ex.bias_stride_head, ex.bias_stride_row = \
                _bias_view(attn_bias, (batch, nh, q_len, kv_len))
        extra = ()
        if return_weights:
            w = np.empty((batch, nh, q_len, kv_len), _F32)
            ex.weights = w.ctypes.data
            extra += (w[0] if two else w,)
        if return_lse:
            lse = np.empty((batch, nh, q_len), _F32)
            ex.lse = lse.ctypes.data
            extra += (lse[0] if two else lse,)
        if scores is not None:
            ex.scores_stage = _stage_code(scores)
            sc = np.empty((batch, nh, q_len, kv_len), _F32)
            ex.scores = sc.ctypes.data
            extra += (sc[0] if two else sc,)
        return ex, keep, extra

    def _qkv(self, q, k, v):
        hd = self.head_dim
        if not hd:
            raise error_for(_lib.ERR_STATE, "selfattn_attend",
                            "head_dim undetermined: d_model not divisible by n_heads and head_dim unset")
        dv = self._dv()
        qw, kw, vw = self._n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * dv
        q, k, v = _f32(q, "q"), _f32(k, "k"), _f32(v, "v")
        bq, lq, two = _split3(q, "q", qw, "n_heads*head_dim")
        bk, lk, twok = _split3(k, "k", kw, "n_kv_heads*head_dim")
        if v.shape != k.shape[:-1] + (vw,):
            raise ValueError("v must have the shape %s (k's rows, n_kv_heads*v_head_dim columns), "
                             "got %s" % (k.shape[:-1] + (vw,), v.shape))
        if two != twok or bq != bk:
            raise ValueError("q %s and k %s must have the same batch" % (q.shape, k.shape))
        return q, k, v, bq, lq, lk, two

    def _out_shape(self, q):
        """The shape of attend's output for q: q's rows, n_heads*v_head_dim columns."""
        return q.shape[:-1] + (self._n_heads * self._dv(),)

    def _dv(self):
        """The value heads' width: v_head_dim, or head_dim from a library before 1.3 (which
        does not know the option)."""
        try:
            return self.get("v_head_dim")
        except InvalidError:
            return self.head_dim

    def attend(self, q, k, v, kv_lengths=None, attn_bias=None, return_weights=False,
               return_lse=False, out=None, scores=None):
        """Attention alone on projected tensors (selfattn_attend; _ex for the 1.1 extras):
        q [batch][q_len][n_heads*head_dim], k and v [batch][kv_len][n_kv_heads*head_dim] (or all
        2-D without batch). Returns out like q, or a tuple as layer(...) does (scores= as
        there). With v_head_dim (1.3) v is [batch][kv_len][n_kv_heads*v_head_dim] and out
        [batch][q_len][n_heads*v_head_dim]. Honours every causal alignment of the layer: with
        causal "top_left" query i sees keys j <= i, with "varlen" keys j <= i + kv_lengths[b] -
        q_len."""
        h = self._handle()
        q, k, v, batch, lq, lk, two = self._qkv(q, k, v)
        lp = None
        if kv_lengths is not None:
            kv_lengths = _int32_array(kv_lengths, batch, "kv_lengths")
            lp = kv_lengths.ctypes.data
        o = _out_array(out, self._out_shape(q))
        if attn_bias is None and not return_weights and not return_lse and scores is None:
            _check(_C.selfattn_attend(h, batch, lq, lk, q.ctypes.data, k.ctypes.data,
                                      v.ctypes.data, lp, o.ctypes.data), "selfattn_attend")
            return o
        ex, keep, extra = self._extras(batch, lq, lk, attn_bias, return_weights, return_lse, two,
                                       scores)
        _check(_C.selfattn_attend_ex(h, batch, lq, lk, q.ctypes.data, k.ctypes.data,
                                     v.ctypes.data, lp, ctypes.addressof(ex), o.ctypes.data),
               "selfattn_attend_ex")
        return (o,) + extra if extra else o

    # ---- gradients (1.1) -----------------------------------------------------------------------
    def _x_lengths(self, x, lengths):
        """(x as float32 C-contiguous, batch, seq_len, x was 2-D, lengths as [batch] int32 or
        None, its pointer or None): the checked input of a whole-layer call."""
        x = _f32(x, "x", self._seq_first)
        batch, seq, two = _split3(x, "x", self._d_model, "d_model")
        lp = None
        if lengths is not None:
            lengths = _int32_array(lengths, batch, "lengths")
            lp = lengths.ctypes.data
        return x, batch, seq, two, lengths, lp

    def _layout(self, a):
        """a [batch][seq][...] as the caller's layout: a transposed view when batch_first=False."""
        return a.swapaxes(0, 1) if self._seq_first and a.ndim == 3 else a

    def _grad_args(self, x, dy, lengths, wrt):
        """The shared part of backward and backward_train: checks x, dy, lengths and wrt, and
        allocates the results. Returns (res, args, keep): res the dict to return, args
        (batch, seq_len, x, lengths, dy, dx, grads) as the C functions take them (pointers),
        keep the objects those pointers point into (hold it until the call returns)."""
        x, batch, seq, _, lengths, lp = self._x_lengths(x, lengths)
        dy = _f32(dy, "dy", self._seq_first)
        if dy.shape != x.shape:
            raise ValueError("dy must have the shape of x %s, got %s" % (x.shape, dy.shape))
        names = ("x",) + tuple(n for n in _GRAD_NAMES if self.out_proj or n not in ("w_o", "b_o"))
        if wrt is None:
            wrt = names
        else:
            wrt = tuple(wrt)
            for n in wrt:
                if n not in names:
                    raise ValueError("wrt: %r is not one of %s" % (n, names))
        res = {}
        dx = None
        if "x" in wrt:
            dx = res["x"] = np.empty(x.shape, _F32)
        g = None
        if any(n != "x" for n in wrt):
            g = _lib.Grads()
            g.struct_size = ctypes.sizeof(_lib.Grads)
            for n in wrt:
                if n != "x":
                    a = res[n] = np.empty(self.weight_shape(n), _F32)
                    setattr(g, n, a.ctypes.data)
        args = (batch, seq, x.ctypes.data, lp, dy.ctypes.data,
                None if dx is None else dx.ctypes.data, None if g is None else ctypes.addressof(g))
        return res, args, (x, dy, lengths, g)

    def backward(self, x, dy, lengths=None, wrt=None):
        """Gradients of the forward pass y = layer(x, lengths) given dy = dL/dy
        (selfattn_backward, libselfattn 1.1). Returns a dict: "x" (dL/dx, shape of x) and the
        weight gradients "w_q", "w_k", "w_v", "b_q", "b_k", "b_v" and, with the output
        projection on, "w_o", "b_o" (layouts of the weights). wrt: an iterable of those names to
        compute only some (default all)."""
        h = self._handle()
        res, args, keep = self._grad_args(x, dy, lengths, wrt)
        self._check_call(_C.selfattn_backward(h, *args), "selfattn_backward")
        if "x" in res:
            res["x"] = self._layout(res["x"])
        return res

    # ---- training with kept activations (1.2) --------------------------------------------------
    def train_state_size(self, batch, seq_len):
        """Bytes of the TrainState that forward_train keeps for (batch, seq_len) on this layer
        (selfattn_train_state_size, libselfattn 1.2): linear in seq_len."""
        h = self._handle()
        batch, seq_len = _int32(batch, "batch"), _int32(seq_len, "seq_len")
        n = ctypes.c_size_t()
        _check(_C.selfattn_train_state_size(h, batch, seq_len, ctypes.byref(n)),
               "selfattn_train_state_size", "batch=%d, seq_len=%d" % (batch, seq_len))
        return n.value

    def forward_train(self, x, lengths=None):
        """(y, state) = layer.forward_train(x, lengths=None): y exactly as layer(x, lengths), and
        a TrainState keeping the activations (Q, K, V, the attention output, the log-sum-exps)
        that backward_train reads instead of recomputing them (selfattn_forward_train,
        libselfattn 1.2). The state is a plain buffer of train_state_size(batch, seq_len) bytes:
        drop it, or keep it for any number of backward_train calls of this forward."""
        h = self._handle()
        x, batch, seq, _, lengths, lp = self._x_lengths(x, lengths)
        state = TrainState(self.train_state_size(batch, seq), batch, seq)
        y = np.empty(x.shape, _F32)
        self._check_call(_C.selfattn_forward_train(h, batch, seq, x.ctypes.data, lp,
                                                   y.ctypes.data, state._ptr, state._capacity),
                         "selfattn_forward_train")
        return self._layout(y), state

    def backward_train(self, x, dy, state, lengths=None, wrt=None):
        """Gradients of y = layer.forward_train(x, lengths)[0] given dy = dL/dy, reading the
        activations kept in `state` (selfattn_backward_train, libselfattn 1.2). Returns what
        backward(x, dy, lengths, wrt) returns (equal to rounding), with less work (selfattn.h:
        about 2.3 forwards instead of 3.2 at seq_len 2048, d_model 768).

        x and lengths must be those of the forward_train call that made `state`: x is read for
        the weight gradients and not compared with the state (other values give wrong gradients,
        not an error). StateError (a RuntimeError) when the state comes from another layer,
        another batch or seq_len or other lengths, or when the layer's weights or options (other
        than threads) changed since; TypeError when `state` is not a TrainState. The state is
        only read: several backward_train calls (different dy) may use it."""
        h = self._handle()
        if not isinstance(state, TrainState):
            raise TypeError("state must be the TrainState of Layer.forward_train, got %s"
                            % type(state).__name__)
        res, args, keep = self._grad_args(x, dy, lengths, wrt)
        # the library checks the state's header (layer, batch, seq_len, lengths) before its size
        st = _C.selfattn_backward_train(h, *args, state._ptr, state._capacity)
        self._check_call(st, "selfattn_backward_train",
               "the state (batch=%d, seq_len=%d) was not made by forward_train on this layer with "
               "this batch, seq_len and lengths, or the layer changed since"
               % (state.batch, state.seq_len) if st == _lib.ERR_STATE else None)
        if "x" in res:
            res["x"] = self._layout(res["x"])
        return res

    def attend_backward(self, q, k, v, dout, kv_lengths=None, wrt=("q", "k", "v")):
        """Gradients of attend(q, k, v, kv_lengths) given dout (selfattn_attend_backward,
        libselfattn 1.1): a dict with "q", "k", "v" (those named in wrt). Honours every causal
        alignment, as attend."""
        h = self._handle()
        q, k, v, batch, lq, lk, two = self._qkv(q, k, v)
        dout = _f32(dout, "dout")
        if dout.shape != self._out_shape(q):
            raise ValueError("dout must have the shape of attend's output %s, got %s"
                             % (self._out_shape(q), dout.shape))
        lp = None
        if kv_lengths is not None:
            kv_lengths = _int32_array(kv_lengths, batch, "kv_lengths")
            lp = kv_lengths.ctypes.data
        res = {}
        for n, like in (("q", q), ("k", k), ("v", v)):
            if n in wrt:
                res[n] = np.empty(like.shape, _F32)
        for n in wrt:
            if n not in ("q", "k", "v"):
                raise ValueError("wrt: %r is not one of q, k, v" % (n,))
        p = [res[n].ctypes.data if n in res else None for n in ("q", "k", "v")]
        _check(_C.selfattn_attend_backward(h, batch, lq, lk, q.ctypes.data, k.ctypes.data,
                                           v.ctypes.data, lp, dout.ctypes.data, *p),
               "selfattn_attend_backward")
        return res


def from_torch(module, cls=None, **options):
    """A selfattn Layer computing what `module`, a torch.nn.MultiheadAttention, computes for
    self-attention (query = key = value = x), with a copy of its weights (later changes to the
    module are not seen). Options of Layer are keyword arguments (e.g. causal=True, threads=1).

    The Layer takes x in the module's layout: [batch][seq][d_model] for batch_first=True,
    [seq][batch][d_model] for batch_first=False (PyTorch's default), and returns y in the same
    layout (see Layer's batch_first); batch_first=True/False as an option overrides the module's.
    PyTorch's key_padding_mask corresponds to lengths= when it masks a suffix of each sequence; an
    attn_mask equal to the causal mask, to causal=True. Dropout is not applied (inference).
    Not supported (ValueError): kdim/vdim different from embed_dim (separate q/k/v_proj_weight),
    add_bias_kv, add_zero_attn, and out_proj=False.

    Half precision (libselfattn 1.3): torch.float16 and torch.bfloat16 parameters are copied bit
    for bit (no float32 round trip), and weight_dtype defaults to the dtype of the module's
    in_proj_weight ("f16", "bf16", else "f32"); weight_dtype="f32" (or another) overrides it
    (f16 / bf16 values widen to float32 exactly; float32 ones are rounded once)."""
    return _torch.from_torch(module, Layer if cls is None else cls, **options)


class TrainState:
    """The activations Layer.forward_train keeps for Layer.backward_train (libselfattn 1.2's
    train state): a NumPy buffer owned by this object, nbytes long, 8-byte aligned. It holds no
    C resource and no reference to the layer or to x (the library recognises its layer, shapes
    and lengths from a header in the buffer). batch and seq_len: those of the forward."""

    __slots__ = ("_words", "_capacity", "_ptr", "nbytes", "batch", "seq_len")

    def __init__(self, nbytes, batch, seq_len):
        self._words = np.empty(nbytes // 8 + 1, np.uint64)   # uint64: 8-byte aligned
        self._capacity = self._words.nbytes
        self._ptr = self._words.ctypes.data
        self.nbytes, self.batch, self.seq_len = nbytes, batch, seq_len

    @property
    def buffer(self):
        """The state's bytes, a uint8 view (writing to it makes the state invalid or wrong)."""
        return self._words.view(np.uint8)[:self.nbytes]

    def __repr__(self):
        return "<selfattn.TrainState batch=%d seq_len=%d nbytes=%d>" % (
            self.batch, self.seq_len, self.nbytes)


class Cache(_Handle):
    """Key/value cache for incremental decoding (selfattn_cache, libselfattn 1.1).

    Cache(layer, n_seqs, capacity): room for n_seqs sequences of up to capacity positions each,
    bound to layer (which must be causal: StateError otherwise; the cache keeps a reference to
    it, and layer.close() closes the cache first). y = cache(x, n_new=None) runs the layer on new
    tokens, x [n_seqs][max_new][d_model] (2-D [max_new][d_model] when n_seqs == 1). One call at a
    time per cache; distinct caches of one layer may run concurrently."""

    def __init__(self, layer, n_seqs, capacity):
        self._h = None
        n_seqs, capacity = _int32(n_seqs, "n_seqs"), _int32(capacity, "capacity")
        if not layer.causal:   # selfattn_forward_cached would refuse every call (ERR_STATE)
            raise StateError(_lib.ERR_STATE, "selfattn.Cache",
                             "the layer is not causal: a Cache needs a causal layer (Layer(..., "
                             "causal=True) or layer.causal = True, i.e. SELFATTN_OPT_CAUSAL 1)")
        out = ctypes.c_void_p()
        _check(_C.selfattn_cache_create(layer._handle(), n_seqs, capacity, ctypes.byref(out)),
               "selfattn_cache_create", "n_seqs=%d, capacity=%d" % (n_seqs, capacity))
        self._h = out.value
        self._layer, self._n_seqs, self._capacity = layer, n_seqs, capacity
        layer._caches.add(self)

    _what = "Cache"

    @staticmethod
    def _destroy(h):
        _C.selfattn_cache_destroy(h)

    layer = property(lambda self: self._layer)
    n_seqs = property(lambda self: self._n_seqs)
    capacity = property(lambda self: self._capacity)

    def length(self, seq):
        """Positions processed so far for sequence seq."""
        out = ctypes.c_int32()
        _check(_C.selfattn_cache_length(self._handle(), _int32(seq, "seq"), ctypes.byref(out)),
               "selfattn_cache_length", "seq=%s" % seq)
        return out.value

    @property
    def lengths(self):
        """[length(s) for every sequence]."""
        return [self.length(s) for s in range(self._n_seqs)]

    def truncate(self, seq, length):
        """Forget positions at and after length for sequence seq (-1: every sequence)."""
        _check(_C.selfattn_cache_truncate(self._handle(), _int32(seq, "seq"),
                                          _int32(length, "length")),
               "selfattn_cache_truncate", "seq=%s, length=%s" % (seq, length))

    def reset(self, seq=-1):
        """truncate(seq, 0)."""
        self.truncate(seq, 0)

    def copy(self, src_seq, dst_seq):
        """Make sequence dst_seq a copy of sequence src_seq."""
        _check(_C.selfattn_cache_copy(self._handle(), _int32(src_seq, "src_seq"),
                                      _int32(dst_seq, "dst_seq")),
               "selfattn_cache_copy", "src_seq=%s, dst_seq=%s" % (src_seq, dst_seq))

    def __call__(self, x, n_new=None, out=None):
        """selfattn_forward_cached: y (shape of x) for the new tokens of each sequence; rows past
        n_new[s] are not read and are zeros in y. On a batch_first=False layer x and y are
        [max_new][n_seqs][d_model]."""
        h = self._handle()
        sf = self._layer._seq_first
        x = _f32(x, "x", sf)
        if x.ndim == 2 and self._n_seqs == 1:
            nseq, max_new, _ = _split3(x, "x", self._layer.d_model, "d_model")
        else:
            nseq, max_new, two = _split3(x, "x", self._layer.d_model, "d_model")
            if two or nseq != self._n_seqs:
                raise ValueError("x must be %s, got shape %s" % (
                    "[max_new][n_seqs=%d][d_model] (batch_first=False)" % self._n_seqs if sf
                    else "[n_seqs=%d][max_new][d_model]" % self._n_seqs,
                    x.swapaxes(0, 1).shape if sf and x.ndim == 3 else x.shape))
        np_ = None
        if n_new is not None:
            n_new = _int32_array(n_new, self._n_seqs, "n_new")
            np_ = n_new.ctypes.data
        sf = sf and x.ndim == 3
        if sf and out is not None:
            out = _out_array(out, (x.shape[1], x.shape[0], x.shape[2]))
        y = _out_array(None if sf else out, x.shape)
        layer = self._layer
        st = _C.selfattn_forward_cached(layer._handle(), h, max_new, x.ctypes.data, np_,
                                        y.ctypes.data)
        if st == _lib.ERR_STATE and layer._state_detail() is None:
            if not layer.causal:
                detail = ("the layer is not causal (any more): a Cache needs a causal layer "
                          "(layer.causal = True, i.e. SELFATTN_OPT_CAUSAL 1)")
            else:
                detail = ("the layer's window, rope, rope_dims, rope_theta, n_kv_heads, "
                          "head_dim, v_head_dim or kv_dtype changed since the Cache was created")
            raise error_for(st, "selfattn_forward_cached", detail, from_library=True)
        layer._check_call(st, "selfattn_forward_cached")
        if sf:
            y = y.swapaxes(0, 1)
            if out is not None:
                out[...] = y
                y = out
        return y

    forward = __call__
