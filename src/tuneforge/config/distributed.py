"""Sharded training keys: `fsdp_version` / `fsdp_config` (FSDP2) and `deepspeed`, in Axolotl's vocabulary.

Older spellings are translated before validation by `normalize` (each with a note): FSDP1's
`fsdp_version: 1`, the list form `fsdp: [full_shard, auto_wrap, offload]`, and `fsdp_config` keys with
the FSDP1 `fsdp_` prefix. Everything runs on PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from .base import Section

WrapPolicy = Literal["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP"]
StateDictType = Literal["FULL_STATE_DICT", "SHARDED_STATE_DICT"]


class FsdpConfig(Section):
    """The `fsdp_config:` block (Axolotl's field names)."""

    reshard_after_forward: bool = Field(
        True, description="Free each layer's gathered parameters after its forward (ZeRO-3 style, least memory); "
        "false keeps them until the backward (ZeRO-2 style, less communication).")
    offload_params: bool = Field(
        False, description="Keep parameters, gradients and optimizer states in CPU memory (FSDP2 CPU offload): "
        "models that do not fit the GPUs train, slower.")
    cpu_offload_pin_memory: bool = Field(True, description="Pin the offloaded CPU memory (faster copies).")
    cpu_ram_efficient_loading: bool = Field(
        False, description="Accepted for Axolotl configs; every process loads the weights and keeps only its shard.")
    auto_wrap_policy: WrapPolicy = Field(
        "TRANSFORMER_BASED_WRAP", description="Which modules become their own shard group: the decoder layers "
        "(TRANSFORMER_BASED_WRAP), or any module with at least min_num_params parameters (SIZE_BASED_WRAP).")
    transformer_layer_cls_to_wrap: str | list[str] | None = Field(
        None, description="Decoder layer class name(s) to shard one by one (default: the model's own, from its "
        "`_no_split_modules`).")
    min_num_params: int = Field(100_000_000, ge=1, description="SIZE_BASED_WRAP's threshold.")
    state_dict_type: StateDictType = Field(
        "SHARDED_STATE_DICT", description="Checkpoints: each process writes its own shards "
        "(SHARDED_STATE_DICT, torch.distributed.checkpoint; resumable on any process count), or in addition the "
        "whole model as a loadable folder (FULL_STATE_DICT).")
    final_state_dict_type: StateDictType | None = Field(
        None, description="Accepted for Axolotl configs: the final output is always a Hugging Face folder "
        "(safetensors, or the PEFT adapter), gathered one tensor at a time.")
    activation_checkpointing: bool = Field(
        False, description="Recompute each layer's activations in the backward (same as gradient_checkpointing).")
    mixed_precision_policy: str | dict | None = Field(
        None, description="Accepted for Axolotl configs: mixed precision follows bf16/fp16 (fp32 master "
        "shards, each layer gathered and computed in bf16/fp16, gradients reduced in fp32).")
    use_orig_params: bool | None = Field(None, description="FSDP1 only; FSDP2 always keeps the original parameters.")
    sync_module_states: bool | None = Field(
        None, description="FSDP1 only; every process loads the same weights here.")
    limit_all_gathers: bool | None = Field(None, description="FSDP1 only; FSDP2 limits them itself.")
    backward_prefetch: str | None = Field(None, description="FSDP1 only; FSDP2 prefetches itself.")
    forward_prefetch: bool | None = Field(None, description="FSDP1 only; FSDP2 prefetches itself.")
    version: int | None = Field(None, description="Same as the top-level fsdp_version.")

    @field_validator("transformer_layer_cls_to_wrap")
    @classmethod
    def _names(cls, value):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return value or None


class DistributedKeys(Section):
    fsdp_version: Literal[2] | None = Field(
        None, description="2: shard parameters, gradients and optimizer states over the processes with PyTorch's "
        "FSDP2 (fsdp_config holds its settings). FSDP1 configs (1, or the `fsdp:` list) are translated.")
    fsdp_config: FsdpConfig | None = Field(None, description="FSDP2 settings (see the fsdp_config.* keys).")
    dp_shard_size: int | None = Field(
        None, description="Processes that shard the model (Axolotl's N-D parallelism key). With FSDP2 every "
        "process holds one shard, so it must equal the number of processes (-1: all of them); checked at start.")
    dp_replicate_size: int | None = Field(
        None, description="Replicas of the sharded model (HSDP). Only 1 is supported: every process shards.")
    deepspeed: str | dict | None = Field(
        None, description="A DeepSpeed JSON (path, or the dict itself; its \"auto\" values are filled from this "
        "config). Runs through DeepSpeed ZeRO where it is installed (GPUs, or CPU processes); otherwise the message "
        "names the equivalent fsdp_config.")

    @property
    def fsdp_enabled(self) -> bool:
        return self.fsdp_version == 2 or self.fsdp_config is not None


_FSDP1_ONLY = ("use_orig_params", "sync_module_states", "limit_all_gathers", "backward_prefetch", "forward_prefetch")


def normalize(raw: dict[str, Any], notes: list[str], problem) -> None:
    """Rewrite FSDP1 spellings into FSDP2's keys in place; `problem(key, message)` records an error."""
    legacy = raw.pop("fsdp", None)
    if legacy:
        _from_list(raw, legacy, notes, problem)
    block = raw.get("fsdp_config")
    if isinstance(block, dict):
        for key in [k for k in block if isinstance(k, str) and k.startswith("fsdp_")]:
            new = key.removeprefix("fsdp_")
            if new == "version":
                raw.setdefault("fsdp_version", block.pop(key))
                continue
            if new in block:
                problem(f"fsdp_config.{key}", f"is the FSDP1 name of fsdp_config.{new}, which is also set; keep one")
                continue
            block[new] = block.pop(key)
            notes.append(f"fsdp_config.{key} is FSDP1's name; using fsdp_config.{new}")
        if "version" in block and "fsdp_version" not in raw:
            raw["fsdp_version"] = block["version"]
        set_fsdp1 = [k for k in _FSDP1_ONLY if block.get(k) is not None]
        if set_fsdp1:
            notes.append(f"fsdp_config: {', '.join(set_fsdp1)} only apply to FSDP1 and have no effect with FSDP2")
        if block.get("state_dict_type") == "LOCAL_STATE_DICT":
            block["state_dict_type"] = "SHARDED_STATE_DICT"
            notes.append("fsdp_config.state_dict_type LOCAL_STATE_DICT (FSDP1) -> SHARDED_STATE_DICT")
    if raw.get("fsdp_version") == 1:
        raw["fsdp_version"] = 2
        notes.append("fsdp_version: 1 (FSDP1, deprecated in PyTorch) runs as FSDP2 with the same settings")
    if raw.get("fsdp_version") is not None and raw.get("fsdp_config") is None:
        raw["fsdp_config"] = {}
    if raw.get("fsdp_config") is not None and raw.get("fsdp_version") is None:
        raw["fsdp_version"] = 2
    block = raw.get("fsdp_config")
    if isinstance(block, dict) and block.get("activation_checkpointing") and not raw.get("gradient_checkpointing"):
        raw["gradient_checkpointing"] = True
        notes.append("fsdp_config.activation_checkpointing: using gradient_checkpointing: true (each layer's "
                     "activations are recomputed in the backward)")


def _from_list(raw: dict[str, Any], legacy: Any, notes: list[str], problem) -> None:
    words = legacy.split() if isinstance(legacy, str) else list(legacy) if isinstance(legacy, list) else None
    if words is None:
        problem("fsdp", "give a list such as [full_shard, auto_wrap], or use fsdp_version: 2 with fsdp_config")
        return
    block = raw.setdefault("fsdp_config", {}) or {}
    raw["fsdp_config"] = block
    before = dict(block)
    for word in words:
        if word == "full_shard":
            block.setdefault("reshard_after_forward", True)
        elif word == "shard_grad_op":
            block.setdefault("reshard_after_forward", False)
        elif word == "offload":
            block.setdefault("offload_params", True)
        elif word in ("hybrid_shard", "hybrid_shard_zero2"):
            problem("fsdp", f"`{word}` (sharding within a node, replicating across nodes) is not supported; use "
                    "full_shard")
        elif word != "auto_wrap":
            problem("fsdp", f"unknown FSDP option `{word}`; expected full_shard, shard_grad_op, offload, auto_wrap")
    implied = {k: v for k, v in block.items() if k not in before}
    notes.append(f"fsdp: {words} is FSDP1's list form; using fsdp_version: 2" + (f" with fsdp_config {implied}"
                                                                                 if implied else ""))


def check(cfg) -> list:
    """Cross-field rules of the sharded-training keys (`config.rules` runs them with the others)."""
    from .errors import ConfigIssue

    issues = []
    if cfg.deepspeed and cfg.fsdp_enabled:
        issues.append(ConfigIssue("deepspeed", "DeepSpeed and FSDP both shard the model; keep one (fsdp_version: 2 "
                                  "with fsdp_config, or deepspeed)"))
    if cfg.deepspeed:
        try:
            deepspeed_settings(cfg)
        except ValueError as exc:
            issues.append(ConfigIssue("deepspeed", str(exc)))
    issues += _mesh_sizes(cfg)
    if cfg.fsdp_enabled and cfg.load_in_8bit:
        # QLoRA (load_in_4bit) shards as torchao NF4 tensors; bitsandbytes' 8-bit weights do not survive sharding.
        issues.append(ConfigIssue("load_in_8bit", "an 8-bit base cannot be sharded by FSDP2; use adapter: qlora with "
                                  "load_in_4bit: true under FSDP2 (4-bit NF4 shards), or load_in_8bit on one GPU "
                                  "without the fsdp keys"))
    return issues


def _mesh_sizes(cfg) -> list:
    """dp_shard_size / dp_replicate_size: the one layout FSDP2 runs here is every process holding one shard."""
    from .errors import ConfigIssue

    issues = []
    if cfg.dp_replicate_size not in (None, 1):
        issues.append(ConfigIssue("dp_replicate_size", "replicating the sharded model (HSDP) is not supported: every "
                                  "process holds one shard. Remove dp_replicate_size (or set it to 1)."))
    if cfg.dp_shard_size not in (None, 1) and not cfg.fsdp_enabled:
        issues.append(ConfigIssue("dp_shard_size", "shards the model with FSDP2: add `fsdp_version: 2` (and "
                                  "fsdp_config), or remove dp_shard_size for plain data parallelism."))
    if cfg.dp_shard_size is not None and cfg.dp_shard_size < 1 and cfg.dp_shard_size != -1:
        issues.append(ConfigIssue("dp_shard_size", "must be the number of processes, or -1 for all of them."))
    return issues


def check_shard_size(cfg, processes: int) -> None:
    """At start, with the process count known: dp_shard_size must be that count (or -1)."""
    from .errors import ConfigError, ConfigIssue

    if cfg.dp_shard_size not in (None, -1) and cfg.fsdp_enabled and cfg.dp_shard_size != processes:
        raise ConfigError([ConfigIssue("dp_shard_size", f"is {cfg.dp_shard_size}, but {processes} process(es) were started, and "
                           "FSDP2 here shards over all of them. Start that many processes (`tuneforge train "
                           f"--num-processes {cfg.dp_shard_size}`), or set dp_shard_size to {processes} or remove it.")])


def deepspeed_settings(cfg) -> dict:
    """The DeepSpeed JSON as a dict (a ValueError names the problem: missing file, not JSON, not an object)."""
    import json
    from pathlib import Path

    value = cfg.deepspeed
    if isinstance(value, dict):
        return value
    path = Path(cfg.resolve_path(value))
    if not path.is_file():
        raise ValueError(f"DeepSpeed config file not found: {value} (looked beside the config and in the working "
                         "directory); `tuneforge fetch deepspeed_configs` copies the usual ones")
    try:
        settings = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path} must hold a JSON object with a zero_optimization block")
    return settings


def zero_stage(settings: dict) -> int:
    """The ZeRO stage of a DeepSpeed JSON (0 without a zero_optimization section)."""
    return int((settings.get("zero_optimization") or {}).get("stage", 0) or 0)


def zero_offloads(settings: dict) -> list[str]:
    """Which of offload_param and offload_optimizer a DeepSpeed JSON sends to CPU memory or NVMe."""
    zero = settings.get("zero_optimization") or {}
    return [k for k in ("offload_param", "offload_optimizer") if (zero.get(k) or {}).get("device") in ("cpu", "nvme")]


def fsdp_equivalent(settings: dict) -> dict:
    """The fsdp_config that shards like a DeepSpeed ZeRO config (stage 3: per-layer parameter sharding; stage
    1/2: parameters kept whole between forward and backward; any offload: FSDP2 CPU offload)."""
    block: dict = {"reshard_after_forward": zero_stage(settings) >= 3}
    if zero_offloads(settings):
        block["offload_params"] = True
    return block
