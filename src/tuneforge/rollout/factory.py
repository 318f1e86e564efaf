"""Build the sampler an online-RL objective generates with, from the config: the embedded engine (the
default, optionally from a half-precision copy of fp32 weights), a vLLM server, or vLLM colocated in the
training process; plus the asynchronous prefetcher (`trl.async_prefetch`) around the embedded engine or
the server."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tuneforge.config.schema import Config

from .base import EMBEDDED_GENERATION_KWARGS, Sampler

log = logging.getLogger("tuneforge")


@dataclass
class Samplers:
    sampler: Sampler  # generates with the current weights (synced by the objective)
    prefetcher: object | None = None  # rollout.async_prefetch.Prefetcher with trl.async_prefetch


def build_samplers(cfg: Config, model, tokenizer, *, use_vllm: bool, fp8_kv_cache: bool, async_prefetch: bool,
                   prefetch_depth: int) -> Samplers:
    from .embedded import EmbeddedSampler
    from .snapshot import HalfPrecisionSampler, wants_half_precision_copy

    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    autocast = _autocast_dtype(cfg, next(model.parameters()).device)
    gen_kwargs = (cfg.trl.generation_kwargs if cfg.trl else None) or {}
    _warn_unused_generation_kwargs(gen_kwargs, use_vllm)
    cuda_graphs = bool(gen_kwargs.get("cuda_graphs", True))
    fused = bool(gen_kwargs.get("fused_decode", True))
    # torch_compile also compiles the decode step (first generation pays the compile time).
    compile_decode = bool(gen_kwargs.get("compile", cfg.torch_compile in (True, "auto")))

    # Full fine-tuning keeps fp32 weights: generate from a half-precision copy (see rollout/snapshot.py).
    # Without the copy, fp32 weights generate in fp32: under autocast, RoPE over the fp32 embeddings
    # gives fp32 keys next to half-precision values, which transformers' static cache cannot hold.
    mostly_fp32 = wants_half_precision_copy(model, autocast)
    half = half_precision_dtype(cfg, model, next(model.parameters()).device)
    kv_dtype = torch.float8_e4m3fn if fp8_kv_cache else None  # the one value besides auto

    def make(m):
        return EmbeddedSampler(m, pad, cuda_graphs=cuda_graphs, autocast_dtype=None if mostly_fp32 else autocast,
                               compile=compile_decode, fused=fused, kv_cache_dtype=kv_dtype)

    if use_vllm and cfg.trl.vllm_mode == "colocate":
        from .generation_server import BackendSampler, backend_from_config

        log.warning("trl.vllm_mode: colocate is EXPERIMENTAL: tested only against a stand-in for vllm.LLM")
        lora_sync = bool(cfg.trl.vllm_lora_sync) and bool(cfg.adapter)
        sampler = BackendSampler(backend_from_config(cfg, "vllm", colocate=True), lora_sync=lora_sync)
    elif use_vllm:
        from .vllm_client import VLLMServerSampler

        sampler = VLLMServerSampler.from_config(cfg, tokenizer)
    else:
        sampler = HalfPrecisionSampler(model, make, half) if half else make(model)
    prefetcher = None
    if async_prefetch and use_vllm:  # the server's weights are the snapshot (settings allow server mode only)
        from .async_prefetch import RemotePrefetcher

        prefetcher = RemotePrefetcher(sampler, sync_interval=cfg.trl.vllm_sync_interval)
    elif async_prefetch:
        from .async_prefetch import Prefetcher

        prefetcher = Prefetcher(model, make, sampler, depth=prefetch_depth, dtype=half)
    return Samplers(sampler, prefetcher)


def half_precision_dtype(cfg: Config, model, device: torch.device) -> torch.dtype | None:
    """The half-precision dtype in which a model of mostly fp32 weights (full fine-tuning under mixed
    precision, on CUDA) generates, from a copy in that dtype (rollout/snapshot.py); None where it generates
    in its own dtype (no mixed precision, not on CUDA, half-precision weights already, or
    generation_kwargs.half_precision_copy: false)."""
    from .snapshot import wants_half_precision_copy

    autocast = _autocast_dtype(cfg, device)
    gen_kwargs = (cfg.trl.generation_kwargs if cfg.trl else None) or {}
    wanted = gen_kwargs.get("half_precision_copy", True) and wants_half_precision_copy(model, autocast)
    return autocast if wanted else None


def _autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The dtype generation autocasts to: the run's mixed precision, on CUDA only."""
    from tuneforge.models.load import mixed_precision

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision(cfg))
    return dtype if torch.device(device).type == "cuda" else None


def _warn_unused_generation_kwargs(gen_kwargs: dict, use_vllm: bool) -> None:
    if not use_vllm and (ignored := sorted(set(gen_kwargs) - EMBEDDED_GENERATION_KWARGS)):
        log.warning("trl.generation_kwargs %s are not used by the embedded engine (it reads %s)", ignored,
                    sorted(EMBEDDED_GENERATION_KWARGS))
    if use_vllm and (ignored := sorted(set(gen_kwargs) & EMBEDDED_GENERATION_KWARGS - {"stop_token_ids"})):
        log.warning("trl.generation_kwargs %s are the embedded engine's; vLLM does not receive them", ignored)
