"""NEFTune (Jain et al., 2023): uniform noise on the input embeddings while training.

The noise is U(-b, b) per element with b = alpha / sqrt(L * d), L the length of the row (padding and, with
sample_packing, every packed sample included, as transformers computes it) and d the hidden size. It is
added in training mode only, so evaluation, generation and the saved model see the plain embeddings.
"""

from __future__ import annotations

import math

import torch


def attach(model, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """Add NEFTune noise to `model`'s input embeddings; returns the hook's handle (`.remove()` detaches it)."""

    def noisy(module, args, output):
        if not module.training:
            return output
        bound = alpha / math.sqrt(output.shape[1] * output.shape[2])
        return output + torch.empty_like(output).uniform_(-bound, bound)

    return model.get_input_embeddings().register_forward_hook(noisy)
