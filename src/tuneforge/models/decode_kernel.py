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
  merges their partial softmax sums (with one split the first kernel writes the output itself).
  With `group` > 1 (GRPO: runs of rows continuing one prompt, whose prompt slots are identical copies)
  a third kernel reads each prompt's slots once for its whole run, as one partial sum per row, which
  the first kernel merges itself when a row has one split;
- everywhere else, the same arithmetic in plain torch (masked softmax over the whole cache).

Shapes: q [B, Hq, D]; k, v [B, Hkv, L, D] (transformers' StaticCache layout); start [B] and end [1]
int32; returns [B, Hq, D] in q's dtype. Query head h uses KV head h // (Hq / Hkv), as repeat_kv does.

An FP8 cache (`kv_scales` [2] float32 given: k = k_fp8 * kv_scales[0], v = v_fp8 * kv_scales[1]) is
read at one byte per value and widened to q's dtype in registers (every e4m3 value is exact in bf16);
the key scale is folded into the softmax scale and the value scale into the output, so dequantizing
costs no extra pass.
"""

from __future__ import annotations

import math
import os

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
                     scale: float, kv_scales: torch.Tensor | None = None, group: int = 1,
                     prompt_len: int = 0) -> torch.Tensor:
    """group / prompt_len: rows in runs of `group` share identical prompt slots [start, prompt_len), which
    the Triton path then reads once per run (the result is the same; see `_triton_decode`)."""
    if triton_usable(q.device):
        return _triton_decode(q, k, v, start, end, scale, kv_scales=kv_scales, group=group, prompt_len=prompt_len)
    return reference(q, k, v, start, end, scale, kv_scales)


@decode_attention.register_fake
def _(q, k, v, start, end, scale, kv_scales=None, group=1, prompt_len=0):
    return torch.empty_like(q)


def shared_prompt_pays(keys: torch.Tensor, group: int, prompt_len: int) -> bool:
    """Whether reading a group's prompt slots once (the `shared_prompt` kernel) beats reading every row's
    copy, for a cache keys [rows, Hkv, L, D] on the device the kernels run on (see `shared_prompt_saves`)."""
    return triton_usable(keys.device) and shared_prompt_saves(*keys.shape, keys.element_size(), group, prompt_len)


SHARED_MIN_SAVED_SHARE = 0.2  # of the slots a rollout's decode attention reads
SHARED_MIN_SAVED_BYTES = 40 * 2**20  # per layer and decode step


def shared_prompt_saves(rows: int, kv_heads: int, length: int, head_dim: int, itemsize: int, group: int,
                        prompt_len: int) -> bool:
    """The rule of `shared_prompt_pays` for a cache filled to prompt_len + (length - prompt_len) / 2 slots
    on average over a rollout.

    The shared path adds a kernel (~9 us per layer on an H200), so it must save both a share of the slots
    read and enough bytes to pay for it. Fitted to bench/decode_attention.py and the rollout benchmark
    (docs/benchmarks.md): Llama-1B with 256-token prompts and 512 new tokens saves 5-26% of the attention's
    time in groups of 2-16, and 6% with 128-token prompts; 64-token prompts lose 7%. Qwen-0.5B's 2 KV heads
    (a quarter of the bytes) time 13% faster on the kernel alone, whose 34 MB of filled cache per layer
    stays in the H200's 50 MB L2 across the benchmark's repeated calls, but 3% slower end to end."""
    if group < 2:
        return False
    saved_slots = prompt_len * (1 - 1 / group)
    saved_share = saved_slots / (prompt_len + (length - prompt_len) / 2)
    saved_bytes = 2 * rows * kv_heads * head_dim * itemsize * saved_slots  # keys and values
    return saved_share >= SHARED_MIN_SAVED_SHARE and saved_bytes >= SHARED_MIN_SAVED_BYTES


def _num_splits(programs: int, L: int, device: torch.device, block: int = BLOCK) -> int:
    """Enough (b, head, split) programs for ~2 waves over the SMs, but never a split under `block` slots."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(math.ceil(L / block), math.ceil(2 * sms / programs)))


def _triton_decode(q, k, v, start, end, scale, block: int | None = None, num_warps: int = 4,
                   num_stages: int | None = None,
                   kv_scales: torch.Tensor | None = None, splits: int | None = None, group: int = 1,
                   prompt_len: int = 0):
    """The kernels' launch; block / num_warps / num_stages / splits are exposed for bench/decode_attention.py.

    group > 1: rows come in runs of `group` that continue one prompt, whose cache slots [start, prompt_len)
    hold identical copies; the `shared_prompt` kernel reads them once per group (partial 0), the split
    kernel each row's own slots from prompt_len on, and `combine` merges them."""
    kernels = _kernels()
    B, Hq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    block = block or (BLOCK if D <= 128 else BLOCK // 2)  # head_dim 256 (Gemma3): half the slots per block
    G = Hq // Hkv
    GP = max(16, 1 << (G - 1).bit_length())  # tl.dot needs >= 16 rows; padded heads are masked out
    shared = group > 1
    first, s0 = (prompt_len, 1) if shared else (0, 0)
    S = splits or _num_splits(B * Hkv, L - first, q.device, block)
    split_len = math.ceil(math.ceil((L - first) / S) / block) * block
    S = math.ceil((L - first) / split_len)
    q = q.contiguous()
    out = torch.empty_like(q)
    # One split per row (batch x KV heads already fills the GPU, as at GRPO batch sizes): the split kernel
    # normalises and writes the output itself, merging the shared prompt's partial first if there is one;
    # the merge pass (and, without a shared prompt, the partial buffers) are skipped.
    direct = S == 1
    parts = 1 if direct else S + s0  # partial sums kept per row
    shape = (1, 1, 1, 1) if direct and not shared else (B, Hkv, parts, GP)
    acc = torch.empty((*shape, D), dtype=torch.float32, device=q.device)
    row_max = torch.empty(shape, dtype=torch.float32, device=q.device)
    row_sum = torch.empty_like(row_max)
    scaled = kv_scales is not None
    scales = kv_scales if scaled else row_max  # never read unless SCALED
    precision = "ieee" if (q.dtype if scaled else k.dtype) == torch.float32 else "tf32"
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2))
    stages = {} if num_stages is None else {"num_stages": num_stages}
    if shared:
        M = max(16, 1 << (group * G - 1).bit_length())
        kernels.shared_prompt[(B // group, Hkv)](
            q, k, v, start, scales, acc, row_max, row_sum, scale * 1.4426950408889634, *strides, Hkv, parts,
            prompt_len, G=G, GP=GP, GROUP=group, M=M, D=D, BLOCK=block, PRECISION=precision, SCALED=scaled,
            num_warps=4 if M <= 32 else 8, **stages)
    kernels.split[(B, Hkv, S)](
        q, k, v, start, end, scales, acc, row_max, row_sum, out, scale * 1.4426950408889634, *strides,
        out.stride(0), out.stride(1), Hkv, parts, split_len, first, s0, G=G, GP=GP, D=D, BLOCK=block,
        PRECISION=precision, DIRECT=direct, MERGE=direct and shared, SCALED=scaled, num_warps=num_warps, **stages)
    if direct:
        return out
    kernels.combine[(B, Hkv)](acc, row_max, row_sum, out, out.stride(0), out.stride(1), Hkv, parts,
                              G=G, GP=GP, D=D, SP=max(2, 1 << (parts - 1).bit_length()), num_warps=4)
    return out


def _kernels():
    """The Triton kernels (`decode_triton.py`), imported on first use: Triton is optional."""
    from . import decode_triton

    return decode_triton
