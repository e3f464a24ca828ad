"""Layer.from_torch: the weights of a torch.nn.MultiheadAttention (PyTorch imported lazily).
The class to build is an argument: this module imports nothing from the package (no cycle)."""
import numpy as np


def _np(t):
    return np.ascontiguousarray(t.detach().to(device="cpu").float().numpy(), dtype=np.float32)


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
    for k in ("n_kv_heads", "head_dim"):
        if options.get(k) is not None:
            raise ValueError("from_torch: %s is fixed by the module" % k)
    if options.get("batch_first") is None:   # the module's layout (absent before PyTorch 1.9:
        options["batch_first"] = bool(getattr(module, "batch_first", False))   # sequence first)
    layer = cls(module.embed_dim, module.num_heads, **options)
    try:
        w = {"w_qkv": _np(module.in_proj_weight), "w_o": _np(module.out_proj.weight)}
        if module.in_proj_bias is not None:
            w["b_qkv"] = _np(module.in_proj_bias)
        if module.out_proj.bias is not None:
            w["b_o"] = _np(module.out_proj.bias)
        layer.set_weights(**w)
    except BaseException:
        layer.close()
        raise
    return layer
