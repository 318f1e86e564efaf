"""Axolotl values with a tuneforge meaning: rewritten into tuneforge's keys before validation, each with a note.

apply_compat.py handles whole keys (renamed, built in, refused); this module handles values that need a
translation: FSDP1's `sharding_strategy`, attention and experts kernels named by Axolotl, a transformers
quantization config named by class, the older `tokens:` mapping, the thinking fields of chat datasets,
`warmup_steps` given as a fraction, and `activation_offloading`'s spellings.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigIssue

# FSDP1 sharding strategies -> FSDP2's reshard_after_forward (FSDP2 always shards parameters, gradients and
# optimizer state; what remains of the choice is whether parameters are freed after the forward).
_SHARDING = {"FULL_SHARD": True, "SHARD_GRAD_OP": False}
_SHARDING_REFUSED = {
    "NO_SHARD": "NO_SHARD is plain data parallelism: remove fsdp_config and fsdp_version (torchrun trains "
                "data-parallel without them)",
    "HYBRID_SHARD": "hybrid sharding (HSDP) is not implemented; use FULL_SHARD",
    "_HYBRID_SHARD_ZERO2": "hybrid sharding (HSDP) is not implemented; use SHARD_GRAD_OP",
}

# Axolotl's transformers-quantization class names whose weights tuneforge can train once dequantized.
_QUANT_METHODS = {"Mxfp4Config": "mxfp4"}

# Axolotl's MoE kernels -> transformers' experts implementation closest to them (one grouped GEMM for all
# experts instead of a loop over them).
_EXPERTS = {"scattermoe": "grouped_mm", "sonicmoe": "grouped_mm"}
_EXPERTS_NATIVE = ("eager", "grouped_mm", "batched_mm")


# What each key handled here becomes (docs/axolotl-compatibility.md's table, scripts/gen_axolotl_table.py).
ACCEPTED = {
    "experts_implementation": "transformers' `experts_implementation` (through model_kwargs); scattermoe and "
                              "sonicmoe become grouped_mm, its grouped GEMM over all experts",
    "use_scattermoe": "`experts_implementation: grouped_mm` (transformers' grouped GEMM over all experts)",
    "use_sonicmoe": "`experts_implementation: grouped_mm` (transformers' grouped GEMM over all experts)",
    "model_quantization_config": "`Mxfp4Config` with `dequantize: true` loads the checkpoint dequantized "
                                 "(model_kwargs.quantization_config); other quantization configs are refused",
    "model_quantization_config_kwargs": "read with model_quantization_config",
}
DATASET_ACCEPTED = {
    "field_thinking": "the message key holding the reasoning; reaches the chat template under template_thinking_key "
                      "(a message_property_mappings entry)",
    "template_thinking_key": "the key the chat template reads the reasoning from (with field_thinking)",
}


def apply(raw: dict[str, Any], problem, notes: list[str]) -> None:
    """Rewrite the values in place; `problem(key, message)` records a refusal."""
    _sharding_strategy(raw, problem, notes)
    _attention(raw, notes)
    _experts(raw, problem, notes)
    _quantization_config(raw, problem, notes)
    _tokens_mapping(raw, notes)
    _fractional_warmup(raw, notes)
    _activation_offloading(raw, problem, notes)


def _sharding_strategy(raw: dict, problem, notes: list[str]) -> None:
    block = raw.get("fsdp_config")
    if not isinstance(block, dict):
        return
    # FSDP1's `fsdp_` names, before the `fsdp:` list form fills in the plain names (distributed.normalize):
    # a setting under both names with one value is no conflict.
    for key in [k for k in block if isinstance(k, str) and k.startswith("fsdp_")
                and k not in ("fsdp_version", "fsdp_sharding_strategy")]:
        new = key.removeprefix("fsdp_")
        if new not in block:
            block[new] = block.pop(key)
            notes.append(f"fsdp_config.{key} is FSDP1's name; using fsdp_config.{new}")
        elif block[key] == block[new]:
            block.pop(key)
    for key in ("sharding_strategy", "fsdp_sharding_strategy"):
        if key not in block:
            continue
        value = block.pop(key)
        name = str(value).upper()
        if name in _SHARDING_REFUSED:
            problem(f"fsdp_config.{key}", f"`{value}`: {_SHARDING_REFUSED[name]}")
        elif name not in _SHARDING:
            problem(f"fsdp_config.{key}", f"unknown sharding strategy `{value}`; use FULL_SHARD or SHARD_GRAD_OP")
        elif _set_reshard(block, _SHARDING[name]) != _SHARDING[name]:
            problem(f"fsdp_config.{key}", f"`{value}` conflicts with fsdp_config.reshard_after_forward: "
                    f"{str(not _SHARDING[name]).lower()}; keep reshard_after_forward")
        else:
            notes.append(f"fsdp_config.{key}: {value} is FSDP1's setting; FSDP2 shards parameters, gradients and "
                         f"optimizer state, with reshard_after_forward: {str(_SHARDING[name]).lower()}")


def _set_reshard(block: dict, value: bool):
    """reshard_after_forward as the block sets it (under either name), else set to `value`."""
    for key in ("reshard_after_forward", "fsdp_reshard_after_forward"):
        if block.get(key) is not None:
            return block[key]
    block["reshard_after_forward"] = value
    return value


def _attention(raw: dict, notes: list[str]) -> None:
    value = raw.get("attn_implementation")
    if value == "xformers":
        raw["attn_implementation"] = "sdpa"
        notes.append("attn_implementation: xformers -> sdpa (PyTorch's fused attention; packed rows attend per "
                     "document)")
    elif isinstance(value, str) and "/" in value and "flash" in value:
        raw["attn_implementation"] = "flash_attention_2"
        notes.append(f"attn_implementation: {value} is a hub kernel, which tuneforge does not download; using "
                     "flash_attention_2 (needs the flash-attn package; sdpa works without it)")


def _experts(raw: dict, problem, notes: list[str]) -> None:
    for switch, kernel in (("use_scattermoe", "scattermoe"), ("use_sonicmoe", "sonicmoe")):
        if raw.pop(switch, None) and raw.get("experts_implementation") is None:
            raw["experts_implementation"] = kernel
    if "experts_implementation" not in raw:
        return
    value = raw.pop("experts_implementation")
    if value is None:
        return
    native = _EXPERTS.get(value, value)
    if native not in _EXPERTS_NATIVE:
        problem("experts_implementation", f"unknown experts implementation `{value}`; use one of "
                f"{', '.join(_EXPERTS_NATIVE)} (transformers' own) or scattermoe")
        return
    kwargs = raw.setdefault("model_kwargs", {})
    if isinstance(kwargs, dict):  # another type: reported by validation
        kwargs.setdefault("experts_implementation", native)
    instead = "" if native == value else f" (the {value} kernel is not available here; transformers' grouped " \
                                           "GEMM over all experts is the closest)"
    notes.append(f"experts_implementation: {value} -> transformers' experts_implementation {native}{instead}")


def _quantization_config(raw: dict, problem, notes: list[str]) -> None:
    if "model_quantization_config" not in raw:
        return
    name = raw.pop("model_quantization_config")
    kwargs = raw.pop("model_quantization_config_kwargs", None) or {}
    if not name:
        return
    method = _QUANT_METHODS.get(str(name))
    if method is None or not isinstance(kwargs, dict) or kwargs.get("dequantize") is not True:
        problem("model_quantization_config", f"`{name}` with {kwargs or 'no kwargs'}: only a quantized checkpoint "
                "loaded dequantized can be trained here (Mxfp4Config with model_quantization_config_kwargs: "
                "{dequantize: true}); otherwise use load_in_4bit / load_in_8bit with adapter: qlora / lora")
        return
    model_kwargs = raw.setdefault("model_kwargs", {})
    if isinstance(model_kwargs, dict):
        model_kwargs.setdefault("quantization_config", {"quant_method": method, **kwargs})
    notes.append(f"model_quantization_config: {name} (dequantize: true): the checkpoint's weights load "
                 "dequantized, through model_kwargs.quantization_config")


def _tokens_mapping(raw: dict, notes: list[str]) -> None:
    """Axolotl's older `tokens:` mapping of special tokens (bos_token, pad_token, ...) is `special_tokens`."""
    tokens = raw.get("tokens")
    if not isinstance(tokens, dict):
        return
    special = raw.get("special_tokens") or {}
    if not isinstance(special, dict):
        return  # reported by validation
    raw.pop("tokens")
    for key, value in tokens.items():
        special.setdefault(key, value)
    raw["special_tokens"] = special
    notes.append("`tokens:` as a mapping of special tokens is Axolotl's older form; using special_tokens")


def _fractional_warmup(raw: dict, notes: list[str]) -> None:
    """transformers' TrainingArguments reads `warmup_steps` below 1 as a fraction of the training steps.
    (Axolotl's schema takes whole numbers only, yet some of its examples write 0.1: they mean the fraction.)"""
    value = raw.get("warmup_steps")
    if isinstance(value, float) and 0 < value < 1 and raw.get("warmup_ratio") is None:
        raw["warmup_ratio"] = raw.pop("warmup_steps")
        notes.append(f"warmup_steps: {value} is a fraction of the training steps; using warmup_ratio: {value}")


def _activation_offloading(raw: dict, problem, notes: list[str]) -> None:
    """Axolotl's offloading spellings. `gradient_checkpointing: offload` (and `unsloth`) and
    `activation_offloading: hidden_states` all mean: recompute each layer, and keep the layer inputs saved for
    the recompute in CPU memory; here that is gradient_checkpointing with activation_offloading, whose
    save_on_cpu then holds little more than those inputs."""
    value, gc = raw.get("activation_offloading"), raw.get("gradient_checkpointing")
    if value == "legacy":
        raw["activation_offloading"] = True
        notes.append("activation_offloading: legacy -> true (saved activations are kept in CPU memory)")
    elif value == "disk":
        raw.pop("activation_offloading")
        problem("activation_offloading", "`disk` (offloading activations to disk) is not implemented; use "
                "activation_offloading: true (CPU memory)")
    elif value == "hidden_states":
        _offload_layer_inputs(raw, problem, notes, "activation_offloading", "hidden_states", "gradient_checkpointing")
    if gc in ("offload", "unsloth"):
        _offload_layer_inputs(raw, problem, notes, "gradient_checkpointing", gc, "activation_offloading")
    elif gc == "offload_disk":
        raw.pop("gradient_checkpointing")
        problem("gradient_checkpointing", "`offload_disk` (layer inputs on disk) is not implemented; use "
                "gradient_checkpointing: offload (CPU memory)")


def _offload_layer_inputs(raw: dict, problem, notes: list[str], key: str, value: str, other: str) -> None:
    """`key: value` means gradient_checkpointing with activation_offloading; an explicit `other: false`
    contradicts it."""
    if raw.get(other) is False:
        raw.pop(key)
        problem(key, f"`{value}` keeps the checkpointed layer inputs in CPU memory, and {other} is false; set "
                "gradient_checkpointing: true with activation_offloading: true, or drop one of them")
        return
    raw.update(gradient_checkpointing=True, activation_offloading=True)
    notes.append(f"{key}: {value} -> gradient_checkpointing: true with activation_offloading: true (each layer's "
                 "input waits in CPU memory for its recompute)")


def dataset_thinking(entry: dict, where: str, notes: list[str]) -> None:
    """`field_thinking` (the row's key for a message's reasoning) and `template_thinking_key` (the key the chat
    template reads it from) become one message_property_mappings entry; messages keep their other keys."""
    field = entry.pop("field_thinking", None)
    template_key = entry.pop("template_thinking_key", None)
    if field is None and template_key is None:
        return
    field = field or "reasoning_content"  # Axolotl's defaults for both
    template_key = template_key or "reasoning_content"
    if field != template_key:
        mapping = entry.setdefault("message_property_mappings", {})
        if isinstance(mapping, dict):  # another type: reported by validation
            mapping.setdefault(template_key, field)
    notes.append(f"{where}: each message's `{field}` reaches the chat template as `{template_key}` (field_thinking / "
                 "template_thinking_key)")


def refuse(problem_issues: list[ConfigIssue], where):
    """A `problem(key, message)` that appends a located ConfigIssue."""
    def problem(key: str, message: str) -> None:
        problem_issues.append(ConfigIssue(key, message, *where(tuple(key.split(".")))))
    return problem
