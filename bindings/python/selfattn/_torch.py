"""Layer.from_torch: the weights of a torch.nn.MultiheadAttention (PyTorch imported lazily)."""
import numpy as np


def _np(t):
    return np.ascontiguousarray(t.detach().to(device="cpu").float().numpy(), dtype=np.float32)


def from_torch(module, cls=None, **options):
    """A selfattn Layer computing what `module`, a torch.nn.MultiheadAttention, computes for
    self-attention (query = key = value = x), with a copy of its weights (later changes to the
    module are not seen). Options of Layer are keyword arguments (e.g. causal=True, threads=1).

    The Layer always takes x as [batch][seq][d_model], whatever module.batch_first says: with
    batch_first=False, pass x.transpose(0, 1) (or np.swapaxes(x, 0, 1)). PyTorch's
    key_padding_mask corresponds to lengths= when it masks a suffix of each sequence; an
    attn_mask equal to the causal mask, to causal=True. Dropout is not applied (inference).
    Not supported (ValueError): kdim/vdim different from embed_dim (separate q/k/v_proj_weight),
    add_bias_kv, add_zero_attn, and out_proj=False."""
    import torch  # noqa: F401  (a clear ImportError when PyTorch is absent)
    from torch import nn

    if cls is None:
        from ._layer import Layer as cls
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
