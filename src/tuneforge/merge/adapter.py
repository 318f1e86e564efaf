"""Reading a PEFT LoRA adapter folder into per-tensor updates, and the math of one update.

    LoRA / rsLoRA   W' = W + s * B @ A,  s = alpha / r  (alpha / sqrt(r) with rsLoRA)
    DoRA            V  = W + s * B @ A,  W' = (m / ||V||_row) * V   (one norm per output feature)

`rank_pattern` / `alpha_pattern` give per-module r and alpha. Embedding LoRA (`lora_embedding_A/B`) and
`fan_in_fan_out` layers store the weight transposed, so they are merged in the transposed orientation.
Tensors saved whole in the adapter (`modules_to_save`, resized embeddings, `*.base_layer.weight`) replace
the base tensor before any delta is added.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.errors import ModelError, NotSupportedYet

ADAPTER_PREFIX = "base_model.model."
# PEFT options that change what the adapter computes in ways a weight merge cannot express.
_UNMERGEABLE_OPTIONS = {
    "alora_invocation_tokens": "activated LoRA only applies after its invocation tokens",
    "layer_replication": "layer replication changes the model's structure",
    "trainable_token_indices": "trainable-token deltas are not supported by this merge",
    "use_qalora": "QA-LoRA is not supported by this merge",
    "lora_bias": "LoRA bias terms are not supported by this merge",
}


@dataclass
class LoraUpdate:
    """One adapted module: W (oriented out x in) gets scale * B @ A, then the DoRA rescale if any."""

    A: Any  # torch.Tensor (r, in)
    B: Any  # torch.Tensor (out, r)
    scale: float
    transposed: bool  # the stored weight is (in, out): embeddings and fan_in_fan_out layers
    magnitude: Any = None  # DoRA magnitude vector (out,)


@dataclass
class AdapterPlan:
    config: dict[str, Any]
    updates: dict[str, LoraUpdate] = field(default_factory=dict)  # base tensor name -> update
    replacements: dict[str, Any] = field(default_factory=dict)  # base tensor name -> whole tensor
    # Replacements saved as `*.base_layer.weight`: the layer's own base weight, which a tied lm_head shares.
    shared_replacements: set[str] = field(default_factory=set)

    def touched(self) -> set[str]:
        return set(self.updates) | set(self.replacements)


def _match_pattern(patterns: dict[str, Any], module: str) -> Any:
    """PEFT's rule: the first pattern that matches the end of the module name on a dot boundary."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return value
    return None


def _load_adapter_tensors(adapter_dir: Path) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    st = adapter_dir / "adapter_model.safetensors"
    if st.exists():
        return load_file(str(st))
    binary = adapter_dir / "adapter_model.bin"
    if binary.exists():
        return torch.load(str(binary), map_location="cpu", weights_only=True)
    raise ModelError(f"{adapter_dir} has adapter_config.json but no adapter_model.safetensors (or .bin) weights.")


def adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json of `adapter_dir`, with one clear error when there is no adapter there."""
    cfg_file = adapter_dir / "adapter_config.json"
    if not adapter_dir.is_dir():
        raise ModelError(f"adapter folder not found: {adapter_dir}. Train first, or pass --lora-model-dir.")
    if not cfg_file.exists():
        if (adapter_dir / "config.json").exists():
            raise ModelError(
                f"{adapter_dir} holds a full model (config.json, no adapter_config.json): it is already a "
                "standalone model and there is nothing to merge. For an adapter elsewhere, pass --lora-model-dir."
            )
        raise ModelError(
            f"{adapter_dir} has no adapter_config.json, so it holds no LoRA adapter. Pass the folder that "
            "training wrote the adapter to with --lora-model-dir."
        )
    return json.loads(cfg_file.read_text())


def read_adapter(adapter_dir: str | Path) -> AdapterPlan:
    """Read a PEFT LoRA adapter folder into per-tensor updates keyed by base checkpoint names."""
    adapter_dir = Path(adapter_dir)
    config = adapter_config(adapter_dir)
    cfg_file = adapter_dir / "adapter_config.json"
    if config.get("peft_type", "LORA") != "LORA":
        raise NotSupportedYet(f"{cfg_file}: peft_type {config['peft_type']} cannot be merged; only LORA adapters.")
    for key, why in _UNMERGEABLE_OPTIONS.items():
        if config.get(key):
            raise NotSupportedYet(f"{cfg_file}: `{key}` is set; {why}.")

    raw, replacements, shared = _classify(_load_adapter_tensors(adapter_dir))
    plan = AdapterPlan(config=config, replacements=replacements, shared_replacements=shared)
    alpha_default = float(config.get("lora_alpha", 8))
    rslora = bool(config.get("use_rslora"))
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    for module, parts in raw.items():
        if "A" not in parts or "B" not in parts:
            raise ModelError(f"adapter is incomplete: module {module} lacks its lora_A or lora_B tensor.")
        A, B = parts["A"], parts["B"]
        if A.dim() != 2 or B.dim() != 2:
            raise NotSupportedYet(f"adapter module {module} is not a linear or embedding layer (conv LoRA).")
        r = A.shape[0]
        alpha = _match_pattern(config.get("alpha_pattern") or {}, module)
        alpha = alpha_default if alpha is None else float(alpha)
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        embedding = parts.get("kind") == "embedding"
        plan.updates[f"{module}.weight"] = LoraUpdate(
            A=A, B=B, scale=scale, transposed=embedding or fan_in_fan_out, magnitude=parts.get("m")
        )
    return plan


def _classify(tensors: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any], set[str]]:
    """Sort saved tensors into LoRA parts per module, whole-tensor replacements, and shared base weights."""
    raw: dict[str, dict[str, Any]] = {}
    replacements: dict[str, Any] = {}
    shared: set[str] = set()
    for key, tensor in tensors.items():
        name = key[len(ADAPTER_PREFIX):] if key.startswith(ADAPTER_PREFIX) else key
        if ".original_module." in name:
            continue  # the untrained module inside a modules_to_save wrapper; its trained copy is saved too
        name = name.replace(".modules_to_save.", ".")
        part = _lora_part(name)
        if part is None:
            if "lora_" in name or "token_adapter" in name:
                raise NotSupportedYet(f"adapter tensor {key} is of a kind this merge does not handle.")
            # A whole tensor: modules_to_save, or a (possibly resized) embedding base layer.
            target = name.replace(".base_layer.", ".")
            replacements[target] = tensor
            if ".base_layer." in name:
                shared.add(target)
            continue
        module, role = part
        entry = raw.setdefault(module, {})
        entry[role] = tensor
        if "lora_embedding_" in name:
            entry["kind"] = "embedding"
    return raw, replacements, shared


def _lora_part(name: str) -> tuple[str, str] | None:
    """Split `module.lora_A.weight` style names into (module, role); None for whole tensors."""
    suffixes = {
        ".lora_A.weight": "A",
        ".lora_B.weight": "B",
        ".lora_embedding_A": "A",
        ".lora_embedding_B": "B",
        ".lora_magnitude_vector": "m",
        ".lora_magnitude_vector.weight": "m",
    }
    for suffix, role in suffixes.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], role
    return None


# ---------------------------------------------------------------- the math on one tensor
def apply_update(weight, update: LoraUpdate, name: str):
    """W' for one tensor, computed in float32 and returned in the weight's dtype."""
    import torch

    w = weight.to(torch.float32)
    oriented = w.T if update.transposed else w
    delta = update.scale * (update.B.to(torch.float32) @ update.A.to(torch.float32))
    if delta.shape != oriented.shape:
        want = tuple(delta.T.shape if update.transposed else delta.shape)
        raise ModelError(
            f"adapter does not fit the base model: {name} has shape {tuple(weight.shape)} in the base, but the "
            f"adapter's update for it has shape {want}. Is base_model the model this adapter was trained on?"
        )
    merged = oriented + delta
    if update.magnitude is not None:
        # DoRA: rescale each output feature to the learned magnitude; the norm is of the updated weight.
        norm = torch.linalg.norm(merged, dim=1)
        merged = merged * (update.magnitude.to(torch.float32) / norm).unsqueeze(1)
    merged = merged.T if update.transposed else merged
    return merged.to(weight.dtype).contiguous()
