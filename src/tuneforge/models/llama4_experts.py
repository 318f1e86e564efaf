"""Llama 4's routed experts as one nn.Linear per expert (`llama4_linearized_experts`), and back.

transformers keeps a Llama 4 layer's experts as two fused 3-D parameters (Llama4TextExperts: gate_up_proj
[experts, hidden, 2 x intermediate] and down_proj [experts, intermediate, hidden]), which LoRA cannot target
by module name. `linearize` swaps each such module for `LinearizedExperts`, which holds `experts.<e>.gate_proj`,
`up_proj` and `down_proj` nn.Linear layers with the same weights and computes the same function, so that
`lora_target_modules` can name them (e.g. `experts.0.gate_proj`, or a regex over all experts). `fuse` is the
inverse: the saved model has transformers' own layout and loads with plain `from_pretrained`.

Swapping a submodule is module replacement through nn.Module's public API; no library code is patched.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from tuneforge.errors import TuneforgeError

log = logging.getLogger("tuneforge")


def _experts_class():
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    return Llama4TextExperts


class ExpertMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act_fn: nn.Module, dtype, device):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, dtype=dtype, device=device)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.up_proj(x) * self.act_fn(self.gate_proj(x)))


class LinearizedExperts(nn.ModuleList):
    """Llama4TextExperts's function with one ExpertMLP per expert (`experts.<e>.gate_proj` ...). Input:
    [experts x tokens, hidden], the tokens routed to each expert in expert order (as Llama4TextMoe passes them)."""

    def __init__(self, fused: nn.Module):
        weight, hidden, i = fused.gate_up_proj, fused.hidden_size, fused.expert_dim
        super().__init__(ExpertMLP(hidden, i, fused.act_fn, weight.dtype, weight.device)
                         for _ in range(fused.num_experts))
        self.hidden_size = hidden
        with torch.no_grad():
            for e, expert in enumerate(self):  # nn.Linear keeps [out, in]: the transposes
                expert.gate_proj.weight.copy_(fused.gate_up_proj[e, :, :i].T)
                expert.up_proj.weight.copy_(fused.gate_up_proj[e, :, i:].T)
                expert.down_proj.weight.copy_(fused.down_proj[e].T)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        routed = hidden_states.view(len(self), -1, self.hidden_size)
        return torch.stack([expert(x) for expert, x in zip(self, routed, strict=True)]).view(-1, self.hidden_size)

    @torch.no_grad()
    def fused(self, config) -> nn.Module:
        """A Llama4TextExperts holding these weights (`config`: the model's text config)."""
        module = _experts_class()(config).to(self[0].gate_proj.weight)
        for e, expert in enumerate(self):
            module.gate_up_proj[e].copy_(torch.cat([expert.gate_proj.weight.T, expert.up_proj.weight.T], dim=-1))
            module.down_proj[e].copy_(expert.down_proj.weight.T)
        return module


def _swap(model, match, build) -> int:
    targets = [(name, module) for name, module in model.named_modules() if match(module)]
    for name, module in targets:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, build(module))
    return len(targets)


def linearize(model) -> int:
    """Replace every Llama4TextExperts of `model` by LinearizedExperts; returns how many were replaced."""
    fused = _experts_class()
    count = _swap(model, lambda m: type(m) is fused, LinearizedExperts)
    if not count:
        raise TuneforgeError(f"llama4_linearized_experts: the model ({type(model).__name__}) has no Llama 4 expert "
                             "blocks to linearize; remove the key (it applies to Llama 4 models only)")
    log.info("llama4_linearized_experts: %d expert blocks as one nn.Linear per expert", count)
    return count


def fuse(model) -> int:
    """The inverse of `linearize` (before saving): transformers' fused expert parameters again."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return _swap(model, lambda m: isinstance(m, LinearizedExperts), lambda m: m.fused(text))


def save_merged(model, tokenizer, dest, safe: bool = True) -> None:
    """merge_lora with linearized experts: the adapter merged into its per-expert layers, fused into transformers'
    layout and saved to `dest` (the generic merge works on the fused checkpoint, which has no per-expert names)."""
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    fuse(merged)
    merged.save_pretrained(str(dest), safe_serialization=safe)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(dest))
