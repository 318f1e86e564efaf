"""Decode attention that reads only the filled part of a static KV cache (one query token per row).

Why: a static cache has L = prompt bucket + max_tokens slots, and a plain attention over it reads all
L slots every step although, on average, a third of them are still empty (and the left padding of
short prompts is never attended). At batch 256 that is gigabytes of dead reads per generated token.
Here each row attends to slots [start[b], end) only, where `end` is a device tensor: the kernel's
loop bounds come from memory, so the shapes stay fixed and the step can still be captured as a CUDA
graph.

`decode_attention(q, k, v, start, end, scale)` is a torch custom op (opaque to torch.compile):

- on CUDA with Triton installed, a split-KV ("flash-decoding") Triton kernel. Program (b, kv-head,
  split) keeps the Hq/Hkv query heads that share the KV head together, so each cache block is read
  once; splits only exist to fill the GPU when batch x KV heads is small, and a second tiny kernel
  merges their partial softmax sums (with one split the first kernel writes the output itself);
- everywhere else, the same arithmetic in plain torch (masked softmax over the whole cache).

Shapes: q [B, Hq, D]; k, v [B, Hkv, L, D] (transformers' StaticCache layout); start [B] and end [1]
int32; returns [B, Hq, D] in q's dtype. Query head h uses KV head h // (Hq / Hkv), as repeat_kv does.

An FP8 cache (`kv_scales` [2] float32 given: k = k_fp8 * kv_scales[0], v = v_fp8 * kv_scales[1]) is
read at one byte per value and widened to q's dtype in registers (every e4m3 value is exact in bf16);
the key scale is folded into the softmax scale and the value scale into the output, so dequantizing
costs no extra pass.
"""

from __future__ import annotations

import functools
import math
import os
from types import SimpleNamespace

import torch

BLOCK = 64  # cache slots per loop iteration


def triton_usable(device: torch.device) -> bool:
    """Triton importable, and a CUDA device (or Triton's CPU interpreter, which tests use)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def reference(q, k, v, start, end, scale: float, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's contract in plain torch: softmax(q k^T * scale) v over slots start[b] <= s < end."""
    slots = torch.arange(k.shape[2], device=q.device).view(1, -1)
    valid = (slots >= start.view(-1, 1)) & (slots < end.view(1, 1))
    if kv_scales is None:
        return grouped_attention(q, k, v, valid, scale)
    out = grouped_attention(q, k.to(q.dtype), v.to(q.dtype), valid, scale * kv_scales[0])
    return (out * kv_scales[1]).to(q.dtype)


def grouped_attention(q, k, v, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per row over the slots where `valid` [B, L] is True, query heads grouped per KV head
    (head h uses KV head h // (Hq / Hkv), as repeat_kv orders them), so K and V are never expanded."""
    B, Hq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    qg = q.reshape(B, Hkv, Hq // Hkv, D).to(k.dtype)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [B, Hkv, G, L]
    scores = scores.masked_fill(~valid.view(B, 1, 1, L), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(B, Hq, D).to(q.dtype)


@torch.library.custom_op("tuneforge::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
                     scale: float, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    if triton_usable(q.device):
        return _triton_decode(q, k, v, start, end, scale, kv_scales=kv_scales)
    return reference(q, k, v, start, end, scale, kv_scales)


@decode_attention.register_fake
def _(q, k, v, start, end, scale, kv_scales=None):
    return torch.empty_like(q)


def _num_splits(programs: int, L: int, device: torch.device, block: int = BLOCK) -> int:
    """Enough (b, head, split) programs for ~2 waves over the SMs, but never a split under `block` slots."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(math.ceil(L / block), math.ceil(2 * sms / programs)))


def _triton_decode(q, k, v, start, end, scale, block: int = BLOCK, num_warps: int = 4, num_stages: int | None = None,
                   kv_scales: torch.Tensor | None = None, splits: int | None = None):
    """The kernels' launch; block / num_warps / num_stages / splits are exposed for bench/decode_attention.py."""
    kernels = _kernels()
    B, Hq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = Hq // Hkv
    GP = max(16, 1 << (G - 1).bit_length())  # tl.dot needs >= 16 rows; padded heads are masked out
    S = splits or _num_splits(B * Hkv, L, q.device, block)
    split_len = math.ceil(math.ceil(L / S) / block) * block
    S = math.ceil(L / split_len)
    q = q.contiguous()
    out = torch.empty_like(q)
    # One split per row (batch x KV heads already fills the GPU, as at GRPO batch sizes): the kernel
    # normalises and writes the output itself; the partial buffers and the merge pass are skipped.
    direct = S == 1
    parts = (1, 1, 1, 1) if direct else (B, Hkv, S, GP)
    acc = torch.empty((*parts, D), dtype=torch.float32, device=q.device)
    row_max = torch.empty(parts, dtype=torch.float32, device=q.device)
    row_sum = torch.empty_like(row_max)
    scaled = kv_scales is not None
    precision = "ieee" if (q.dtype if scaled else k.dtype) == torch.float32 else "tf32"
    kernels.split[(B, Hkv, S)](
        q, k, v, start, end, kv_scales if scaled else row_max, acc, row_max, row_sum, out, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), Hkv, S, split_len, G=G, GP=GP, D=D, BLOCK=block, PRECISION=precision,
        DIRECT=direct, SCALED=scaled, num_warps=num_warps, **({} if num_stages is None else {"num_stages": num_stages}))
    if direct:
        return out
    kernels.combine[(B, Hkv)](acc, row_max, row_sum, out, out.stride(0), out.stride(1), Hkv, S,
                              G=G, GP=GP, D=D, SP=max(2, 1 << (S - 1).bit_length()), num_warps=4)
    return out


@functools.cache
def _kernels():
    """Define the Triton kernels on first use (Triton is optional and never imported at module load)."""
    import triton
    import triton.language as tl

    @triton.jit
    def split(Q, K, V, Start, End, Scales, Acc, Max, Sum, Out, qk_scale,
              sqb, sqh, skb, skh, skl, svb, svh, svl, sob, soh, Hkv, S, split_len,
              G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
              DIRECT: tl.constexpr, SCALED: tl.constexpr):
        b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        lo = tl.maximum(tl.load(Start + b), s * split_len)
        hi = tl.minimum(tl.load(End), (s + 1) * split_len)
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + (h * G + g)[:, None] * sqh + d[None, :], mask=(g < G)[:, None], other=0.0)
        v_scale = 1.0
        if SCALED:  # FP8 cache: widen K and V to q's dtype, fold the key scale into the softmax scale
            qk_scale = qk_scale * tl.load(Scales)
            v_scale = tl.load(Scales + 1)
        else:
            q = q.to(K.dtype.element_ty)
        m = tl.full([GP], float("-inf"), tl.float32)
        total = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        # Every block from the one holding `lo` up to `hi` has at least one valid slot, so the running
        # max is finite after the first iteration; an empty split runs no iteration at all.
        for n in range((lo // BLOCK) * BLOCK, hi, BLOCK):
            slot = n + tl.arange(0, BLOCK)
            valid = (slot >= lo) & (slot < hi)
            kb = tl.load(k_base + slot[:, None] * skl + d[None, :], mask=valid[:, None], other=0.0).to(q.dtype)
            scores = tl.dot(q, tl.trans(kb), input_precision=PRECISION) * qk_scale  # log2 units
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            p = tl.exp2(scores - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            vb = tl.load(v_base + slot[:, None] * svl + d[None, :], mask=valid[:, None], other=0.0).to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
            total = total * alpha + tl.sum(p, 1)
            m = m_new
        acc = acc * v_scale  # partial sums are linear in V: scaling them scales the merged output
        if DIRECT:  # the only split: its softmax sums are final (a filled range is never empty)
            tl.store(Out + b * sob + (h * G + g)[:, None] * soh + d[None, :],
                     (acc / total[:, None]).to(Out.dtype.element_ty), mask=(g < G)[:, None])
        else:
            row = ((b * Hkv + h) * S + s) * GP + g
            tl.store(Acc + row[:, None] * D + d[None, :], acc)
            tl.store(Max + row, m)
            tl.store(Sum + row, total)

    @triton.jit
    def combine(Acc, Max, Sum, Out, sob, soh, Hkv, S,
                G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, SP: tl.constexpr):
        b, h = tl.program_id(0), tl.program_id(1)
        s = tl.arange(0, SP)
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        row = ((b * Hkv + h) * S + s)[:, None] * GP + g[None, :]  # [SP, GP]
        live = (s < S)[:, None]
        m = tl.load(Max + row, mask=live, other=float("-inf"))
        weight = tl.exp2(m - tl.max(m, 0)[None, :])  # empty splits (max -inf) weigh 0
        denom = tl.sum(weight * tl.load(Sum + row, mask=live, other=0.0), 0)
        acc = tl.load(Acc + row[:, :, None] * D + d[None, None, :], mask=live[:, :, None], other=0.0)
        out = tl.sum(acc * weight[:, :, None], 0) / denom[:, None]
        tl.store(Out + b * sob + (h * G + g)[:, None] * soh + d[None, :], out.to(Out.dtype.element_ty),
                 mask=(g < G)[:, None])

    return SimpleNamespace(split=split, combine=combine)
