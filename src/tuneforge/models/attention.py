"""Packed (variable-length) attention registered with transformers' attention interface.

A packed row holds several documents; attention must not cross them. On CUDA we hand the documents'
cumulative lengths (`cu_seqlens` from the collator) to `torch.nn.attention.varlen.varlen_attn`, a
FlashAttention kernel shipped with PyTorch, so no flash-attn install and no [T, T] mask are needed.
Register it with `register()`, load the model with `attn_implementation="tuneforge_varlen"` and call
the model with `**varlen_kwargs(batch)`.

Without the cumulative lengths (generation, other objectives' plain forwards) the function falls back
to SDPA with the mask transformers builds for SDPA (padding, KV cache and packed position_ids all
handled there), so the implementation is always correct and only fast where it matters.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

NAME = "tuneforge_varlen"
DECODE_NAME = "tuneforge_decode"
# Model-forward keywords that reach the decode attention: each row's first cache slot to attend ([B]
# int32) and one past the last filled slot ([1] int32, a device tensor so captured graphs stay valid).
KV_START, KV_END = "tuneforge_kv_start", "tuneforge_kv_end"


def available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _causal_kwargs(fn) -> dict:
    # The keyword for causal masking changed across torch releases.
    params = inspect.signature(fn).parameters
    if "is_causal" in params:
        return {"is_causal": True}
    return {"window_size": (-1, 0)}


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """query/key/value: [B, H, T, D]; returns ([B, T, H, D], None) as transformers expects."""
    cu = kwargs.get("cu_seq_lens_q")
    dtype = _kernel_dtype(query)
    if cu is None or dtype is None:
        return _sdpa_fallback(query, key, value, attention_mask, scaling)
    from torch.nn.attention.varlen import varlen_attn

    out_dtype = query.dtype
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)

    B, H, T, D = query.shape
    q = query.transpose(1, 2).reshape(B * T, H, D)
    k = key.transpose(1, 2).reshape(B * T, key.shape[1], D)
    v = value.transpose(1, 2).reshape(B * T, value.shape[1], D)
    extra = _causal_kwargs(varlen_attn)
    if k.shape[1] != H:
        if "enable_gqa" in inspect.signature(varlen_attn).parameters:
            extra["enable_gqa"] = True
        else:
            k = k.repeat_interleave(H // k.shape[1], dim=1)
            v = v.repeat_interleave(H // v.shape[1], dim=1)
    max_len = int(kwargs.get("max_length_q") or T)
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, **extra)
    return out.reshape(B, T, H, D).to(out_dtype), None


def _kernel_dtype(query):
    """The flash kernel takes bf16/fp16 only: under autocast use its dtype; plain fp32 falls back."""
    if query.dtype in (torch.bfloat16, torch.float16):
        return query.dtype
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return None


def _sdpa_fallback(query, key, value, attention_mask, scaling):
    if key.shape[1] != query.shape[1]:
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    causal = attention_mask is None and query.shape[2] > 1
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, is_causal=causal, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the kernel under `tuneforge_varlen` (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, varlen_attention_forward)
    # The SDPA mask serves the fallback path; the varlen kernel ignores it.
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def decode_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """Attention for generation over a static KV cache; returns ([B, T, H, D], None).

    One query token per row (decode): the query heads that share a KV head are grouped, so the cache
    is read once as [B, Hkv, L, D] and never expanded to all query heads. SDPA with a mask (needed for
    left padding and unwritten cache slots) would first copy every KV head `Hq / Hkv` times, which for
    a batch of 256 over a 768-slot cache is gigabytes of traffic per generated token. `attention_mask`
    is boolean [B, 1, 1, L] (True = attend). When the caller passes the filled slot range (`KV_START`,
    `KV_END` keywords), the mask is not read and only that range of the cache is (custom op in
    `decode_kernel`). Prompts (several query tokens, once per generation) go through SDPA.
    """
    if query.shape[2] != 1:
        return _sdpa_fallback(query, key, value, attention_mask, scaling)
    from .decode_kernel import decode_attention, grouped_attention

    B, Hq, _, D = query.shape
    scale = scaling if scaling is not None else D**-0.5
    q = query.reshape(B, Hq, D)
    start = kwargs.get(KV_START)
    if start is not None:  # the filled cache range is known: read only that (see models/decode_kernel.py)
        out = decode_attention(q, key, value, start, kwargs[KV_END], scale)
    else:  # transformers' boolean mask [B, 1, 1, L] (True = attend)
        valid = torch.ones_like(key[:, 0, :, 0], dtype=torch.bool) if attention_mask is None else attention_mask
        out = grouped_attention(q, key, value, valid.view(B, -1), scale)
    return out.view(B, 1, Hq, D), None


def register_decode() -> str:
    """Register the generation attention under `tuneforge_decode` (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(DECODE_NAME, decode_attention_forward)
    AttentionMaskInterface.register(DECODE_NAME, sdpa_mask)
    return DECODE_NAME


def varlen_kwargs(batch: dict) -> dict:
    """Model kwargs that carry the packed documents' boundaries to the attention function."""
    cu = batch["cu_seqlens"].to(batch["input_ids"].device, dtype=torch.int32)
    return {
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": int(batch["max_seqlen"]),
        "max_length_k": int(batch["max_seqlen"]),
    }
