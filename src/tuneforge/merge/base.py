"""The base model's safetensors checkpoint, and the checks that an adapter fits it, before anything is written.

Tied input/output embeddings (no `lm_head.weight` stored) are found here; the adapter's target names are
matched to the base's tensor names (with or without the `model.` prefix), and every update and whole-tensor
replacement is checked against the base shapes (a resized vocabulary is the one shape change allowed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.errors import ModelError

from .adapter import AdapterPlan

LM_HEAD = "lm_head.weight"
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


@dataclass
class BaseCheckpoint:
    folder: Path
    shards: list[str]  # file names, in order
    shapes: dict[str, tuple[int, ...]]  # tensor name -> shape
    where: dict[str, str]  # tensor name -> shard file name
    config: dict[str, Any]


def open_base(folder: Path) -> BaseCheckpoint:
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").exists():
        shards = ["model.safetensors"]
    elif any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ModelError(
            f"{folder} holds PyTorch .bin weights only; merge-lora streams safetensors shards. Convert the base "
            "once (load it with transformers and save_pretrained), then point base_model to the new folder."
        )
    else:
        raise ModelError(f"no model weights (model.safetensors or its index) found in {folder}.")
    config_file = folder / "config.json"
    if not config_file.exists():
        raise ModelError(f"{folder} has no config.json; is base_model a model folder?")
    config = json.loads(config_file.read_text())
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        raise ModelError(
            f"the base checkpoint in {folder} is stored pre-quantized ({method}); merging needs its original "
            "16/32-bit weights. Set base_model to the unquantized model the quantized one was made from."
        )
    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, str] = {}
    for shard in shards:
        if not (folder / shard).exists():
            raise ModelError(f"{folder}: the index lists {shard}, which is missing (incomplete download?).")
        with safe_open(str(folder / shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                shapes[key] = tuple(f.get_slice(key).get_shape())
                where[key] = shard
    return BaseCheckpoint(folder, shards, shapes, where, config)


def tied_embedding(base: BaseCheckpoint) -> str | None:
    """Name of the input embedding when lm_head shares it (no lm_head tensor stored), else None."""
    tie = base.config.get("tie_word_embeddings")
    if tie is None:
        tie = (base.config.get("text_config") or {}).get("tie_word_embeddings", False)
    if not tie or LM_HEAD in base.shapes:
        return None
    candidates = [k for k in base.shapes if k.endswith(EMBED_SUFFIXES)]
    return candidates[0] if len(candidates) == 1 else None


def resolve_names(plan: AdapterPlan, base: BaseCheckpoint, embed_key: str | None) -> None:
    """Rename adapter targets to the base's tensor names; fail on any target the base does not have."""
    known = set(base.shapes) | ({LM_HEAD} if embed_key else set())

    def resolve(name: str) -> str:
        if name in known:
            return name
        for alt in (name.removeprefix("model."), f"model.{name}"):
            if alt in known:
                return alt
        sample = ", ".join(sorted(base.shapes)[:3])
        raise ModelError(
            f"adapter targets {name}, which the base checkpoint in {base.folder} does not have (its tensors look "
            f"like: {sample}, ...). Is base_model the model this adapter was trained on?"
        )

    plan.updates = {resolve(k): v for k, v in plan.updates.items()}
    plan.replacements = {resolve(k): v for k, v in plan.replacements.items()}
    plan.shared_replacements = {resolve(k) for k in plan.shared_replacements}


def check_shapes(plan: AdapterPlan, base: BaseCheckpoint, embed_key: str | None) -> int | None:
    """Validate every update against the base before writing anything; return the new vocab size if resized."""
    vocab = base.config.get("vocab_size") or (base.config.get("text_config") or {}).get("vocab_size")
    new_vocab = None
    def base_shape_of(name: str) -> tuple[int, ...]:
        return base.shapes[name] if name in base.shapes else base.shapes[embed_key]  # lm_head of a tied model

    for name, tensor in plan.replacements.items():
        base_shape = base_shape_of(name)
        shape = tuple(tensor.shape)
        if shape == base_shape:
            continue
        resized = len(shape) == 2 and shape[1:] == base_shape[1:] and base_shape[0] == vocab
        if not resized:
            raise ModelError(
                f"adapter does not fit the base model: {name} has shape {base_shape} in the base but {shape} in the "
                "adapter. Is base_model the model this adapter was trained on?"
            )
        if new_vocab not in (None, shape[0]):
            raise ModelError(f"adapter holds embeddings of two different vocabulary sizes ({new_vocab}, {shape[0]}).")
        new_vocab = shape[0]
    for name, upd in plan.updates.items():
        shape = tuple(plan.replacements[name].shape) if name in plan.replacements else base_shape_of(name)
        out_in = (upd.B.shape[0], upd.A.shape[1])
        expect = out_in[::-1] if upd.transposed else out_in
        if tuple(expect) != tuple(shape):
            raise ModelError(
                f"adapter does not fit the base model: {name} has shape {shape} in the base, but the adapter's "
                f"update for it has shape {tuple(expect)}. Is base_model the model this adapter was trained on?"
            )
        if upd.magnitude is not None and upd.magnitude.numel() != out_in[0]:
            raise ModelError(f"adapter's DoRA magnitude for {name} has {upd.magnitude.numel()} values, expected {out_in[0]}.")
    if embed_key and embed_key in plan.replacements and embed_key not in plan.shared_replacements:
        head = plan.replacements.get(LM_HEAD)
        head_rows = head.shape[0] if head is not None else base.shapes[embed_key][0]
        if head_rows != plan.replacements[embed_key].shape[0]:
            raise ModelError(
                f"the base ties lm_head to {embed_key}, but the adapter resizes {embed_key} only "
                f"({head_rows} vs {plan.replacements[embed_key].shape[0]} rows); save lm_head with the adapter too."
            )
    return new_vocab
