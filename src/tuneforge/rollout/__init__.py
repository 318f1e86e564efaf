"""Generation backends for online RL: the embedded engine (default), async prefetch, and an
experimental vLLM server client. See `base.py` for the sampler interface."""

from .base import Rollout, Sampler, SamplingParams

__all__ = ["Rollout", "Sampler", "SamplingParams"]
