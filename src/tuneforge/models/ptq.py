"""The quantized export (`quantization:`): after training, `output_dir/quantized` holds the trained model with
torchao-quantized weights, written by transformers' torchao integration (it loads back with `from_pretrained`
where torchao is installed).

The int formats are those `qat:` simulates: int4/int8 weights symmetric per group, activations int8 per token
(asymmetric, computed at run time) or not quantized. The output head and the input embedding are quantized only
with quantize_embedding (the embedding weights only). With the same settings as `qat:`, the exported model computes
exactly what the fake-quantized model computed while training.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tuneforge.config.quantization import PTQBlock
from tuneforge.config.schema import Config
from tuneforge.errors import ModelError, NotSupportedYet

log = logging.getLogger("tuneforge")

EXPORTABLE = {"int4", "int8"}  # weight formats the export writes (activations: int8 or none)
_INT = {"int4": torch.int4, "int8": torch.int8}


def torchao_configs(block: PTQBlock) -> tuple[object, object]:
    """(torchao config of the linear layers, weights-only config of the embedding) for the block."""
    try:
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup
    except ImportError:
        raise NotSupportedYet("quantization: needs torchao, which is not installed: "
                              "pip install 'tuneforge[torchao]'") from None
    dtype, group = _INT[block.weight_dtype], PerGroup(block.group_size or 32)
    weights_only = IntxWeightOnlyConfig(weight_dtype=dtype, granularity=group)
    if block.activation_dtype == "int8":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=group), weights_only
    return weights_only, weights_only


def export(block: PTQBlock, model_class, folder: Path, tokenizer=None, dest: Path | None = None) -> Path:
    """Quantize the saved model in `folder` into `dest` (default `folder/quantized`); returns that folder."""
    from torchao.quantization import quantize_
    from transformers import TorchAoConfig

    linear, embedding = torchao_configs(block)
    ao = TorchAoConfig(quant_type=linear, include_input_output_embeddings=bool(block.quantize_embedding))
    model = model_class.from_pretrained(str(folder), quantization_config=ao)
    if block.quantize_embedding:  # transformers quantizes the output head; the embedding is a lookup: weights only
        table = model.get_input_embeddings()
        quantize_(model, embedding, filter_fn=lambda module, _: module is table)
    dest = dest or folder / "quantized"
    model.save_pretrained(str(dest))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(dest))
    log.info("quantization: %s weights%s written to %s", block.weight_dtype,
             f", {block.activation_dtype} activations" if block.activation_dtype else "", dest)
    return dest


def for_config(cfg: Config, model_dir: str | None = None) -> Path:
    """`tuneforge quantize`: the model in `model_dir` (default output_dir) quantized as the config's
    `quantization:` block says (or its `qat:` block, the scheme it was trained for) into output_dir/quantized."""
    from transformers import AutoTokenizer

    from tuneforge.models.load import auto_class

    block = cfg.quantization
    if block is None and cfg.qat is not None:
        block = PTQBlock(**cfg.qat.model_dump(exclude={"fake_quant_after_n_steps"}))
    if block is None:
        raise NotSupportedYet("quantize: the config has no `quantization:` block (nor `qat:`); add one, e.g. "
                              "quantization: {weight_dtype: int4, activation_dtype: int8, group_size: 32}")
    if block.weight_dtype not in EXPORTABLE or block.activation_dtype not in (None, "int8"):
        raise NotSupportedYet(f"quantize: writes int4/int8 weights with int8 or no activations, not "
                              f"{block.weight_dtype}/{block.activation_dtype or 'none'}; quantize with torchao "
                              "yourself for those formats (docs/quantization.md)")
    folder = Path(model_dir) if model_dir else cfg.output_path()
    if (folder / "adapter_config.json").exists():
        raise ModelError(f"quantize: {folder} holds a LoRA adapter; merge it first (tuneforge merge-lora) and pass "
                         f"--model {cfg.output_path() / 'merged'}")
    if not (folder / "config.json").exists():
        raise ModelError(f"quantize: no model in {folder} (no config.json); train first, or pass --model DIR")
    tokenizer = AutoTokenizer.from_pretrained(str(folder)) if (folder / "tokenizer_config.json").exists() else None
    return export(block, auto_class(cfg), folder, tokenizer, dest=cfg.output_path() / "quantized")
