"""The Triton kernel of `sampling.block_logsumexp` (imported only where Triton is usable)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _block_lse(X, Out, V, stride, blocks, temperature, BLOCK: tl.constexpr):
    """Program (row, block): logsumexp of X[row, block * BLOCK : (block + 1) * BLOCK] / temperature."""
    row, blk = tl.program_id(0), tl.program_id(1)
    slot = blk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + row * stride + slot, mask=slot < V, other=float("-inf")).to(tl.float32) / temperature
    top = tl.max(x, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # a wholly masked block: log(0) = -inf, not NaN
    tl.store(Out + row * blocks + blk, top + tl.log(tl.sum(tl.exp(x - top), 0)))


def block_logsumexp(logits: torch.Tensor, block: int, temperature: float) -> torch.Tensor:
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    N, V = logits.shape
    blocks = triton.cdiv(V, block)
    out = torch.empty((N, blocks), dtype=torch.float32, device=logits.device)
    _block_lse[(N, blocks)](logits, out, V, logits.stride(0), blocks, temperature, BLOCK=block,
                            num_warps=4 if block <= 1024 else 8)
    return out
