"""Token log-probabilities from hidden states, without materialising the [N, V] logits at once.

`token_logps(head, hidden, targets)` is log softmax(head(hidden) / temperature)[target] for each row of
`hidden` [N, H]. The LM head runs a chunk of rows at a time; under autograd each chunk is checkpointed,
so its logits are recomputed in the backward pass instead of being kept (peak memory: one chunk of fp32
logits). SFT's token loss (`models/losses.py`), the preference methods' sequence log-probs and GRPO's
completion log-probs all go through it, with the same chunk size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Elements of fp32 logits per chunk. CPU: 64 Mi floats (256 MiB, 512 positions at a 128K vocabulary).
# CUDA: 256 Mi floats (1 GiB): every chunk adds a full-size LM-head weight gradient, so few large
# chunks cost far less memory traffic than many small ones (measured: docs/benchmarks.md).
CHUNK_ELEMENTS = 1 << 26
CHUNK_ELEMENTS_CUDA = 1 << 28
MIN_CHUNK_ROWS = 256


def chunk_rows(vocab: int, hidden: torch.Tensor) -> int:
    """Rows of `hidden` per chunk so that one chunk's fp32 logits stay within the budget of its device."""
    elements = CHUNK_ELEMENTS_CUDA if hidden.is_cuda else CHUNK_ELEMENTS
    return max(MIN_CHUNK_ROWS, elements // vocab)


def _chunk_logps(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = head(hidden)
    if temperature != 1.0:
        logits = logits / temperature
    return -F.cross_entropy(logits, targets, reduction="none")


def token_logps(head, hidden: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                chunk: int | None = None) -> torch.Tensor:
    """log p(target) [N] (fp32) for each row of `hidden` [N, H]; `head` maps [n, H] to fp32 logits [n, V]
    (`models.losses.LogitHead`). Chunks are checkpointed when gradients are enabled."""
    chunk = chunk or chunk_rows(head.vocab, hidden)
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        args = (head, hidden[start : start + chunk], targets[start : start + chunk], temperature)
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logps, *args, use_reentrant=False))
        else:
            parts.append(_chunk_logps(*args))
    return torch.cat(parts) if parts else hidden.new_zeros((0,), dtype=torch.float32)
