"""`selective_checkpointing`: what gradient checkpointing keeps instead of recomputing.

Plain checkpointing reruns every op of a layer in the backward. With a save policy (torch's
`create_selective_checkpoint_contexts`, handed to `torch.utils.checkpoint.checkpoint` as its `context_fn`)
the outputs of the named ops are kept from the forward and the recompute takes them from there: by default
the attention kernels, whose recompute costs the most at long sequences, for one [tokens, heads x head_dim]
tensor per layer. Ops are matched by their qualified name as they dispatch (`aten::_scaled_dot_product_
flash_attention`, ...), so a kernel that is not a registered op is simply recomputed.

Hybrid models (a `layer_types` list in the model config) recompute the attention of the layer types in
`recompute_layer_types` (sliding-window attention is cheap) unless `save_sliding_window`: a forward
pre-hook on each decoder layer says which type is running, in the forward and again in the recompute.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from tuneforge.config.model import SelectiveCheckpointing
from tuneforge.config.schema import Config
from tuneforge.errors import ModelError

log = logging.getLogger("tuneforge")

ATTENTION = "attention"


def is_attention(name: str) -> bool:
    """An attention kernel's forward: SDPA's variants, flash / efficient / cuDNN / varlen attention."""
    low = name.lower()
    return ("attention" in low or "attn" in low) and "backward" not in low


class SavePolicy:
    """The policy function of `create_selective_checkpoint_contexts`, plus the layer type now running."""

    def __init__(self, sac: SelectiveCheckpointing):
        self.attention = ATTENTION in sac.save
        self.patterns = [p for p in sac.save if p != ATTENTION]
        self.recompute_types = set() if sac.save_sliding_window else set(sac.recompute_layer_types)
        self.layer_type: str | None = None
        self.saved: set[str] = set()

    def __call__(self, ctx, op, *args, **kwargs) -> CheckpointPolicy:
        name = op.name() if hasattr(op, "name") else str(op)
        if self.wants(name):
            if name not in self.saved and not ctx.is_recompute:
                self.saved.add(name)
                log.info("selective_checkpointing: keeping the outputs of %s", name)
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    def wants(self, name: str) -> bool:
        if any(p in name for p in self.patterns):
            return True
        return self.attention and is_attention(name) and self.layer_type not in self.recompute_types

    def context_fn(self):
        return create_selective_checkpoint_contexts(self)


def checkpoint_kwargs(cfg: Config, model) -> dict:
    """What `torch.utils.checkpoint.checkpoint` gets for this config: non-reentrant unless the user says
    otherwise, the user's gradient_checkpointing_kwargs, and the save policy's context_fn."""
    return {"use_reentrant": False, **(cfg.gradient_checkpointing_kwargs or {}), **install(cfg, model)}


def install(cfg: Config, model) -> dict:
    """The checkpoint kwargs that apply the policy (empty without selective checkpointing); on a hybrid model,
    hooks on the decoder layers tell the policy each layer's type. Once per model: QLoRA's preparation
    enables checkpointing a second time."""
    sac = cfg.selective_checkpoint_settings
    if sac is None:
        return {}
    policy = getattr(model, "_tuneforge_save_policy", None)
    if policy is not None:
        return {"context_fn": policy.context_fn}
    policy = SavePolicy(sac)
    types = getattr(getattr(model, "config", None), "layer_types", None)
    layers = _decoder_layers(model)
    if types and layers is not None and len(types) == len(layers):
        for layer, kind in zip(layers, types, strict=True):
            layer.register_forward_pre_hook(functools.partial(_set_type, policy, kind))
    model._tuneforge_save_policy = policy  # kept for inspection (tests, debugging)
    return {"context_fn": policy.context_fn}


def limit_layers(cfg: Config, model) -> None:
    """gradient_checkpointing_layers: N: the decoder layers after the first N run without checkpointing
    (transformers' per-layer `gradient_checkpointing` switch). Applied after every enabling of checkpointing,
    which switches all layers on."""
    n = cfg.gradient_checkpointing_layers
    if not cfg.gradient_checkpointing or not isinstance(n, int):
        return
    layers = _decoder_layers(model)
    if layers is None or not all(hasattr(layer, "gradient_checkpointing") for layer in layers):
        raise ModelError(f"gradient_checkpointing_layers: {n}: {type(model).__name__}'s decoder layers cannot be "
                         "checkpointed one by one; remove the key to checkpoint them all")
    if n > len(layers):
        raise ModelError(f"gradient_checkpointing_layers: {n}, but the model has {len(layers)} decoder layers; "
                         f"use at most {len(layers)}")
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < n
    log.info("gradient checkpointing: the first %d of %d decoder layers (the rest keep their activations)",
             n, len(layers))


def _set_type(policy: SavePolicy, kind: str, module, args) -> None:
    policy.layer_type = kind


def _decoder_layers(model) -> torch.nn.ModuleList | None:
    from tuneforge.models.losses import unwrap_peft

    base = unwrap_peft(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    return getattr(decoder, "layers", None)
