"""Copies of the policy's weights for generation: frozen snapshots refreshed in place.

Two users:
- async prefetch (`async_prefetch.py`) samples in a background thread from a snapshot, so the optimizer
  can update the live weights meanwhile;
- full fine-tuning on a GPU keeps fp32 master weights and trains under bf16/fp16 autocast. Decoding
  under autocast would cast every weight matrix again at every generated token (autocast caches casts
  only while gradients are recorded), which for a 1B model is ~7 GB of memory traffic per token, more
  than the decode step itself. `HalfPrecisionSampler` instead generates from a half-precision snapshot
  that is refreshed once per generation (one cast per optimizer step), at the cost of 2 bytes per
  parameter of extra memory. `generation_kwargs: {half_precision_copy: false}` turns it off; fp32
  weights then generate in fp32 (see `rollout/factory.py`).
"""

from __future__ import annotations

import copy

import torch

from .base import Rollout, SamplingParams


class WeightSnapshot:
    """A frozen copy of a model (optionally in `dtype`) whose parameters and buffers are refreshed in place."""

    def __init__(self, model, dtype: torch.dtype | None = None):
        self.copy = copy.deepcopy(model)
        self.copy.requires_grad_(False)
        if dtype is not None:
            self.copy.to(dtype)
        self.syncs = 0

    @torch.no_grad()
    def refresh(self, model) -> None:
        for dst, src in zip(self.copy.parameters(), model.parameters(), strict=True):
            dst.copy_(src)  # casts to the snapshot's dtype
        for dst, src in zip(self.copy.buffers(), model.buffers(), strict=True):
            dst.copy_(src)
        self.syncs += 1


def wants_half_precision_copy(model, autocast_dtype: torch.dtype | None) -> bool:
    """True when most weights are fp32 and generation would run under half-precision autocast."""
    if autocast_dtype is None:
        return False
    total = fp32 = 0
    for p in model.parameters():
        total += p.numel()
        fp32 += p.numel() if p.dtype == torch.float32 else 0
    return total > 0 and 2 * fp32 > total


class HalfPrecisionSampler:
    """Generates with a `dtype` snapshot of the policy; `sync_weights` refreshes it (call before generating)."""

    def __init__(self, model, make_sampler, dtype: torch.dtype):
        self.snapshot = WeightSnapshot(model, dtype)
        self.sampler = make_sampler(self.snapshot.copy)

    def sync_weights(self, model) -> None:
        self.snapshot.refresh(model)

    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams) -> Rollout:
        return self.sampler.generate(prompt_ids, n, params)
