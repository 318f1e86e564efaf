"""EAFT, entropy-aware focal training: SFT cross-entropy weighted, token by token, by the model's own uncertainty.

For a trained position with logits z, the weight is H_k(z)^alpha, where H_k is the entropy of the softmax over
the k largest logits (an approximation of the full distribution's entropy that costs a top-k). The weight is
computed without gradient, so the gradient is the cross-entropy's scaled by the weight: tokens the model is
already confident about (low entropy) contribute little, uncertain ones more. alpha = 0 is plain cross-entropy.

The loss of a step is sum(weight x cross-entropy) / trained tokens of the step, as SFT's (methods/sft.py).
"""

from __future__ import annotations

from functools import partial

import torch

from .logprobs import chunk_rows, token_logps

ENTROPY_EPS = 1e-10  # inside the log, so that a probability that underflows to 0 contributes 0


def topk_entropy_weights(logits: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """H_k(logits)^alpha for each row of `logits` [N, V] (fp32, no gradient)."""
    with torch.no_grad():
        top = torch.topk(logits.float(), k=min(k, logits.shape[-1]), dim=-1).values
        p = torch.softmax(top, dim=-1)
        entropy = -(p * torch.log(p + ENTROPY_EPS)).sum(-1)
        return entropy.pow(alpha)


def weighted_cross_entropy(head, hidden: torch.Tensor, targets: torch.Tensor, chunk: int | None = None, *,
                           alpha: float, k: int) -> torch.Tensor:
    """Sum over rows of `hidden` [N, H] of H_k^alpha x cross-entropy against `targets` (a drop-in for
    `models.losses.chunked_cross_entropy`). The weights take one extra pass of the head, without gradient."""
    chunk = chunk or chunk_rows(head.vocab, hidden)
    with torch.no_grad():
        weights = [topk_entropy_weights(head(hidden[s : s + chunk]), k, alpha) for s in range(0, hidden.shape[0], chunk)]
    weights = torch.cat(weights) if weights else hidden.new_zeros((0,), dtype=torch.float32)
    return -(weights * token_logps(head, hidden, targets, chunk=chunk)).sum()


def token_loss_fn(cfg):
    """The SFT token loss the config asks for: EAFT's weighted cross-entropy, or None (plain)."""
    return partial(weighted_cross_entropy, alpha=cfg.eaft_alpha, k=cfg.eaft_k) if cfg.use_eaft else None
