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
from tuneforge.errors import NotSupportedYet

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


def export(block: PTQBlock, model_class, folder: Path, tokenizer=None) -> Path:
    """Quantize the saved model in `folder` into `folder/quantized`; returns that folder."""
    from torchao.quantization import quantize_
    from transformers import TorchAoConfig

    linear, embedding = torchao_configs(block)
    ao = TorchAoConfig(quant_type=linear, include_input_output_embeddings=bool(block.quantize_embedding))
    model = model_class.from_pretrained(str(folder), quantization_config=ao)
    if block.quantize_embedding:  # transformers quantizes the output head; the embedding is a lookup: weights only
        table = model.get_input_embeddings()
        quantize_(model, embedding, filter_fn=lambda module, _: module is table)
    dest = folder / "quantized"
    model.save_pretrained(str(dest))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(dest))
    log.info("quantization: %s weights%s written to %s", block.weight_dtype,
             f", {block.activation_dtype} activations" if block.activation_dtype else "", dest)
    return dest
