"""EBFT's features: hidden states of a frozen feature network at a few depths, pooled per sequence.

The feature network is the model as it was before training (the adapter disabled with LoRA, a frozen
copy with full fine-tuning: `methods.reference.Reference`). Features come from the hidden states at the
layers int(f * num_layers) for each fraction f of `ebft.feature_layers` (hidden state 0 is the embedding
output), concatenated along the feature dimension, then pooled over the sequence by `ebft.embed_method`.
Only the transformer body runs: the LM head (the largest matrix product of a small model) is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..base import config_error

EMBED_METHODS = ("last_token", "mean_pooling", "completion_mean", "concat")
# `concat` pooling: the states at these fractions of each sequence's valid length.
CONCAT_POINTS = (0.25, 0.5, 0.75)


def layer_indices(fractions: Sequence[float], num_layers: int) -> list[int]:
    """Indices into `hidden_states` (length num_layers + 1) of the feature layers."""
    return [min(int(f * num_layers), num_layers) for f in fractions]


def body_of(model):
    """The transformer body under a causal LM (and under a PEFT wrapper): it returns hidden states
    without computing logits."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(inner, "base_model_prefix", "")
    return getattr(inner, prefix, inner) if prefix else inner


def num_layers_of(model) -> int:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config
    return int(getattr(config, "num_hidden_layers", None) or config.get_text_config().num_hidden_layers)


@torch.no_grad()
def hidden_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int],
                    **forward_kwargs) -> torch.Tensor:
    """[B, T, len(layers) * H]: the selected hidden states, concatenated, as float32.

    `attention_mask` is whatever the model takes: [B, T] padding mask, or a 4-D mask (strided mode)."""
    out = body_of(model)(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                         use_cache=False, **forward_kwargs)
    states = out.hidden_states
    return torch.cat([states[i].float() for i in layers], dim=-1)


def pool(states: torch.Tensor, valid: torch.Tensor, method: str, completion: torch.Tensor | None = None) -> torch.Tensor:
    """Pool [B, T, D] states over the sequence. `valid` [B, T] marks real tokens (either padding side);
    `completion` [B, T] marks completion tokens (needed by completion_mean). Returns [B, D], or [B, 3D]
    for `concat`."""
    valid = valid.bool()
    if method == "last_token":
        return _at_positions(states, valid, torch.ones(states.shape[0], 1, device=states.device), last=True)
    if method == "mean_pooling":
        return _masked_mean(states, valid)
    if method == "completion_mean":
        if completion is None:
            raise ValueError("completion_mean pooling needs the completion mask")
        return _masked_mean(states, completion.bool() & valid)
    if method == "concat":
        fractions = torch.tensor(CONCAT_POINTS, device=states.device).expand(states.shape[0], -1)
        return _at_positions(states, valid, fractions).flatten(1)
    raise config_error("ebft.embed_method", f"unknown pooling {method!r}; choose one of {', '.join(EMBED_METHODS)}.")


def _masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _at_positions(states: torch.Tensor, valid: torch.Tensor, fractions: torch.Tensor, *, last: bool = False):
    """[B, K, D]: per row, the states of its valid tokens number floor(f * length) (the last valid token
    for `last`), counting valid tokens only, so left and right padding give the same result."""
    lengths = valid.sum(dim=1)  # [B]
    if last:
        rank = (lengths - 1).clamp_min(0).unsqueeze(1)  # [B, 1]
    else:
        rank = torch.minimum((fractions * lengths.unsqueeze(1)).long(), (lengths - 1).clamp_min(0).unsqueeze(1))
    # position of the k-th valid token: the first index where the running count of valid tokens exceeds k
    counts = valid.long().cumsum(dim=1)  # [B, T]
    positions = torch.searchsorted(counts, rank + 1)  # [B, K]
    positions = positions.clamp_max(states.shape[1] - 1)
    picked = torch.gather(states, 1, positions.unsqueeze(-1).expand(-1, -1, states.shape[-1]))
    return picked.squeeze(1) if last else picked
