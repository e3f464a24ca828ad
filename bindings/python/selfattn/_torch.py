"""Layer.from_torch: the weights of a torch.nn.MultiheadAttention (PyTorch imported lazily).
The class to build is an argument: this module imports nothing from the package (no cycle)."""
import sys

import numpy as np

# selfattn_dtype values (as _lib's DTYPE_*; not imported from _lib, which loads the library)
_F32, _F16, _BF16 = 0, 1, 2
_TORCH_HALF = {"torch.float16": _F16, "torch.bfloat16": _BF16}
_NAMES = {_F32: "f32", _F16: "f16", _BF16: "bf16"}


def _half_kind(t):
    """_F16 / _BF16 when t is a torch tensor of dtype float16 / bfloat16 (told by the dtype's
    name, so that neither torch nor a stand-in needs importing here), else None."""
    dt = getattr(t, "dtype", None)
    return None if dt is None or isinstance(dt, np.dtype) else _TORCH_HALF.get(str(dt))


def half_bits(t):
    """(uint16 C-contiguous bit patterns, _F16 or _BF16) of a torch.float16 / torch.bfloat16
    tensor, bit for bit (detached, on the CPU); None for anything else. NumPy has no bfloat16:
    its bits are read through an int16 view of the tensor."""
    kind = _half_kind(t)
    if kind is None:
        return None
    t = t.detach().to(device="cpu").contiguous()
    if kind == _BF16:
        torch = sys.modules["torch"]   # a bfloat16 tensor exists: torch is imported
        a = t.view(torch.int16).numpy()
    else:
        a = t.numpy()                  # float16
    return np.ascontiguousarray(a).view(np.uint16), kind


def _param(t):
    """A parameter as set_weight takes it: half-precision bits when the tensor is float16 or
    bfloat16 (set_weight's dtype= returned alongside), else float32 values (dtype None)."""
    bits = half_bits(t)
    if bits is not None:
        return bits[0], _NAMES[bits[1]]
    return np.ascontiguousarray(t.detach().to(device="cpu").float().numpy(),
                                dtype=np.float32), None


def from_torch(module, cls, **options):
    """selfattn.from_torch(module, **options) making an instance of cls (selfattn.Layer or a
    subclass, given by the caller so that this module needs nothing from _layer)."""
    import torch  # noqa: F401  (a clear ImportError when PyTorch is absent)
    from torch import nn

    if not isinstance(module, nn.MultiheadAttention):
        raise TypeError("from_torch expects a torch.nn.MultiheadAttention, got %s"
                        % type(module).__name__)
    if not getattr(module, "_qkv_same_embed_dim", True) or module.in_proj_weight is None:
        raise ValueError("from_torch: kdim/vdim different from embed_dim (separate q_proj_weight, "
                         "k_proj_weight, v_proj_weight) is not supported")
    if module.bias_k is not None or module.bias_v is not None:
        raise ValueError("from_torch: add_bias_kv=True is not supported")
    if module.add_zero_attn:
        raise ValueError("from_torch: add_zero_attn=True is not supported")
    if options.get("out_proj", True) is not True:
        raise ValueError("from_torch: nn.MultiheadAttention always has an output projection")
    # (nn.MultiheadAttention's vdim is the width of its value *input*, not of a value head: its
    # heads all have embed_dim / num_heads for Q, K and V alike)
    for k in ("n_kv_heads", "head_dim", "v_head_dim"):
        if options.get(k) is not None:
            raise ValueError("from_torch: %s is fixed by the module" % k)
    if options.get("batch_first") is None:   # the module's layout (absent before PyTorch 1.9:
        options["batch_first"] = bool(getattr(module, "batch_first", False))   # sequence first)
    if options.get("weight_dtype") is None:  # the module's parameter dtype (f32 unless half)
        options["weight_dtype"] = _NAMES[_half_kind(module.in_proj_weight) or _F32]
    layer = cls(module.embed_dim, module.num_heads, **options)
    try:
        params = {"w_qkv": module.in_proj_weight, "w_o": module.out_proj.weight,
                  "b_qkv": module.in_proj_bias, "b_o": module.out_proj.bias}
        for name, t in params.items():
            if t is not None:
                a, dtype = _param(t)
                layer.set_weight(name, a, dtype=dtype)
    except BaseException:
        layer.close()
        raise
    return layer
