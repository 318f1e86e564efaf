"""Put the fused LoRA blocks of lora_kernels.py into a PEFT model (`lora_mlp_kernel`, `lora_qkv_kernel`,
`lora_o_kernel`).

The modules stay PEFT's (saving, merging and the adapter's state dict are unchanged); only the forward of
the MLP, the attention or the output projection is replaced by one that calls the fused Function. A block
is fused only when every LoRA layer in it is plain LoRA: one adapter, no dropout, no DoRA, no bias on B,
a frozen base that is an nn.Linear or a bitsandbytes 4-bit layer (QLoRA: dequantized inside the block).
rsLoRA and rank/alpha patterns only change the scaling and are fused. At call time the fused forward falls back to PEFT's when the adapter is disabled (a DPO
reference pass), merged or switched, so those keep PEFT's exact behaviour.
"""

from __future__ import annotations

import logging
import sys
import types

import torch

from . import lora_kernels
from .nf4 import is_nf4

log = logging.getLogger("tuneforge")

# Module classes whose forward the fused one reproduces (checked against transformers by the tests).
MLP_CLASSES = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}
ATTENTION_CLASSES = {"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention"}


def why_not(layer) -> str | None:
    """None when this PEFT LoRA layer can be fused, else the reason."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    if not (isinstance(layer, LoraLinear) or _is_4bit(layer) and isinstance(layer, LoraLayer)):
        return "not a PEFT LoRA linear layer"
    base = layer.get_base_layer()
    if type(base) is not torch.nn.Linear and not _is_4bit(base):
        return (f"its base layer is {type(base).__name__}; fused kernels need an unquantized or a bitsandbytes "
                "4-bit base")
    if is_nf4(base.weight):
        return "its base weight is 4-bit NF4 (QLoRA under FSDP2); fused kernels need an unquantized base"
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return "its base weight is trained"
    if len(layer.active_adapters) != 1:
        return "several adapters are active"
    name = layer.active_adapters[0]
    if name not in layer.lora_A or layer.use_dora.get(name, False) or name in getattr(layer, "lora_variant", {}):
        return "it uses DoRA (or another LoRA variant)"
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return "lora_dropout > 0 (the fused backward has no dropout mask)"
    if layer.lora_B[name].bias is not None or getattr(layer, "fan_in_fan_out", False):
        return "it has a LoRA bias or fan_in_fan_out"
    return None


def _is_4bit(module) -> bool:
    """A bitsandbytes 4-bit linear layer with its weight quantized (QLoRA), or PEFT's LoRA layer around one."""
    if type(module).__name__ != "Linear4bit":
        return False
    if hasattr(module, "get_base_layer"):  # PEFT's lora.bnb.Linear4bit
        module = module.get_base_layer()
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None


def _live(layer) -> bool:
    """The fused path reproduces the layer right now: adapter on, not merged, the same single adapter."""
    return not layer.disable_adapters and not layer.merged and len(layer.active_adapters) == 1


def _params(layer) -> lora_kernels.Lora:
    name = layer.active_adapters[0]
    base = layer.get_base_layer()
    return base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]


def _mlp_forward(self, x):
    layers = (self.gate_proj, self.up_proj, self.down_proj)
    if not all(_live(m) for m in layers):
        return self._tuneforge_unfused(x)
    return lora_kernels.lora_swiglu(x, *(_params(m) for m in layers))


def _o_forward(self, x, *args, **kwargs):
    if args or kwargs or not _live(self):
        return self._tuneforge_unfused(x, *args, **kwargs)
    return lora_kernels.lora_linear(x, _params(self))


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """The Llama-family attention forward (transformers' LlamaAttention / Qwen2 / Qwen3 / Mistral) with q, k
    and v from one fused LoRA call; the rest (norms, RoPE, the attention kernel, o_proj) as there."""
    projections = (self.q_proj, self.k_proj, self.v_proj)
    if "past_key_values" in kwargs or not all(_live(m) for m in projections):
        return self._tuneforge_unfused(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    family = sys.modules[type(self).__module__]
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = (t.view(hidden_shape) for t in lora_kernels.lora_qkv(hidden_states, *(_params(m) for m in projections)))
    if hasattr(self, "q_norm"):  # Qwen3 normalises each head before RoPE
        q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cos, sin = position_embeddings
    q, k = family.apply_rotary_pos_emb(q, k, cos, sin)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, family.eager_attention_forward)
    if type(self).__name__ != "LlamaAttention":  # the others pass their sliding window (None when unused)
        kwargs["sliding_window"] = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
    out, weights = attend(self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                          scaling=self.scaling, **kwargs)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _is_silu(act) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"  # transformers' ACT2FN["silu"]


def _patch(module, forward) -> None:
    module._tuneforge_unfused = module.forward
    module.forward = types.MethodType(forward, module)


def fuse_lora(model, mlp: bool, qkv: bool, o: bool) -> dict[str, int]:
    """Replace the forwards of eligible blocks in place; returns how many of each were fused. Blocks that
    cannot be fused are listed in one log line with the reason (training is still correct, only unfused)."""
    counts = {"mlp": 0, "qkv": 0, "o": 0}
    skipped: dict[str, str] = {}

    def eligible(kind: str, layers) -> bool:
        reasons = [why_not(m) for m in layers]
        reason = next((r for r in reasons if r), None)
        if reason:
            skipped.setdefault(kind, reason)
        return reason is None

    for module in model.modules():
        name = type(module).__name__
        if mlp and name in MLP_CLASSES:
            if not _is_silu(module.act_fn):
                skipped.setdefault("lora_mlp_kernel", f"the activation is {type(module.act_fn).__name__}, not SiLU")
            elif eligible("lora_mlp_kernel", (module.gate_proj, module.up_proj, module.down_proj)):
                _patch(module, _mlp_forward)
                counts["mlp"] += 1
        if name in ATTENTION_CLASSES:
            if qkv and eligible("lora_qkv_kernel", (module.q_proj, module.k_proj, module.v_proj)):
                _patch(module, _attention_forward)
                counts["qkv"] += 1
            if o and eligible("lora_o_kernel", (module.o_proj,)):
                _patch(module.o_proj, _o_forward)
                counts["o"] += 1
    for key, reason in skipped.items():
        log.warning("%s: some blocks stay unfused (PEFT's path, same results): %s", key, reason)
    wanted = {"mlp": mlp, "qkv": qkv, "o": o}
    if not any(counts[k] for k in counts if wanted[k]) and any(wanted.values()):
        log.warning("fused LoRA kernels: no block of this model could be fused (supported: %s and %s)",
                    ", ".join(sorted(MLP_CLASSES)), ", ".join(sorted(ATTENTION_CLASSES)))
    log.info("fused LoRA kernels: %d MLP, %d QKV, %d output-projection blocks", counts["mlp"], counts["qkv"], counts["o"])
    return counts
