"""Low-precision training keys: quantization-aware training (`qat:`), FP8 training (`fp8`), and the `quantization:`
block (the quantized export). The model transforms that read them are `tuneforge.models.qat`, `tuneforge.models.fp8`
and `tuneforge.models.ptq` (docs/quantization.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import Section
from .errors import ConfigIssue
from .methods import method_facts

QuantDtype = Literal["int4", "int8", "float8", "nvfp4", "mxfp4"]
_ALIASES = {"fp8": "float8", "float8_e4m3fn": "float8"}  # the other spellings Axolotl accepts for float8

# (weight_dtype, activation_dtype) pairs torchao can fake-quantize; None: weights only.
SUPPORTED_PAIRS = {("int4", None), ("int8", None), ("int4", "int8"), ("int8", "int8"), ("float8", "float8"),
                   ("int4", "float8"), ("nvfp4", "nvfp4"), ("mxfp4", "mxfp4")}
# Formats whose block size is fixed by the format itself.
FIXED_GROUP = {"nvfp4": 16, "mxfp4": 32}


def _pairs_text() -> str:
    return ", ".join(f"{w}/{a or 'none'}" for w, a in sorted(SUPPORTED_PAIRS, key=str))


class _QuantBlock(Section):
    weight_dtype: QuantDtype = Field(
        "int8", description="Weight format: int4, int8 (per group of group_size, symmetric), float8, nvfp4 or mxfp4.")
    activation_dtype: QuantDtype | None = Field(
        None, description="Activation format: int8 (per token, asymmetric), float8, nvfp4, mxfp4, or none "
        "(weights only).")
    group_size: int | None = Field(
        32, ge=1, description="Weights per quantization group (int4/int8); nvfp4 needs 16 and mxfp4 32.")
    quantize_embedding: bool | None = Field(
        False, description="Also quantize the output head (like the other linear layers) and the input embedding "
        "(its weights per group; int4/int8 only).")

    @field_validator("weight_dtype", "activation_dtype", mode="before")
    @classmethod
    def _alias(cls, value):
        return _ALIASES.get(value, value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _a_supported_pair(self):
        pair = (self.weight_dtype, self.activation_dtype)
        if pair not in SUPPORTED_PAIRS:
            raise ValueError(f"weight_dtype {pair[0]} with activation_dtype {pair[1] or 'none'} is not a scheme "
                             f"torchao can train or quantize; supported (weight/activation): {_pairs_text()}")
        fixed = FIXED_GROUP.get(self.weight_dtype)
        if fixed and self.group_size not in (None, fixed):
            raise ValueError(f"{self.weight_dtype} quantizes blocks of {fixed} weights; set group_size: {fixed}")
        return self


class QATBlock(_QuantBlock):
    fake_quant_after_n_steps: int | None = Field(
        None, ge=0, description="Train the first N optimizer steps without fake quantization, then switch it on "
        "(null: from the first step).")


class PTQBlock(_QuantBlock):
    pass


class QuantizationKeys(Section):
    qat: QATBlock | None = Field(
        None, description="Quantization-aware training: torchao fake-quantizes the linear layers but the output head "
        "(all of them and the embedding with quantize_embedding) while training; the saved model is the trained "
        "16-bit model (docs/quantization.md).")
    quantization: PTQBlock | None = Field(
        None, description="Quantized export: after training, output_dir/quantized holds the model with torchao "
        "int4/int8 weights (and int8 activations), loadable with from_pretrained (docs/quantization.md).")
    fp8: bool = Field(
        False, description="FP8 training (torchao float8 linear layers; CUDA compute capability 8.9 or newer). "
        "With an adapter, only the frozen base layers run in float8; the adapter trains in bf16.")
    fp8_frozen_weights: bool = Field(
        False, description="With fp8 and an adapter: keep the frozen base weights in float8 (half their memory; the "
        "same numbers as casting them at each call, which fp8 does otherwise, and no cast per call). 8B LoRA on an "
        "H100: 6.5 GiB less, 9% faster at equal memory (docs/quantization.md).")
    fp8_enable_fsdp_float8_all_gather: bool = Field(
        False, description="With fp8 and FSDP2: all-gather the sharded weights in float8 (half the traffic).")


def check(cfg) -> list[ConfigIssue]:
    """Cross-field rules of these keys (called from config/rules.py)."""
    issues = []
    qat = cfg.qat
    if qat is not None:
        if cfg.adapter:
            issues.append(ConfigIssue("qat", "quantization-aware training trains the full model's weights and cannot "
                                      "be combined with an adapter (as in Axolotl): remove `adapter` or `qat`."))
        if cfg.load_in_4bit or cfg.load_in_8bit:
            issues.append(ConfigIssue("qat", "needs the 16-bit weights: remove load_in_4bit / load_in_8bit."))
        if cfg.fp8:
            issues.append(ConfigIssue("fp8", "fp8 training and qat both replace the linear layers; keep one."))
        if qat.fake_quant_after_n_steps is not None and qat.weight_dtype in FIXED_GROUP:
            issues.append(ConfigIssue("qat.fake_quant_after_n_steps", f"torchao's {qat.weight_dtype} training "
                                      "layers cannot be switched off; remove it (fake quantization from step 1)."))
    for key, block in (("qat", qat), ("quantization", cfg.quantization)):
        if block is not None and block.quantize_embedding and block.weight_dtype not in ("int4", "int8"):
            issues.append(ConfigIssue(f"{key}.quantize_embedding", "embeddings are quantized per group in int4 or "
                                      f"int8 only; remove it or use weight_dtype int4/int8, not {block.weight_dtype}."))
    ptq = cfg.quantization
    if ptq is not None and (ptq.weight_dtype not in ("int4", "int8") or ptq.activation_dtype not in (None, "int8")):
        issues.append(ConfigIssue("quantization", f"the quantized export writes int4/int8 weights with int8 or no "
                                  f"activation quantization, not {ptq.weight_dtype}/{ptq.activation_dtype or 'none'}; "
                                  "other formats: quantize output_dir with torchao yourself (docs/quantization.md)."))
    if ptq is not None and cfg.adapter:
        issues.append(ConfigIssue("quantization", "the export quantizes a whole model, not an adapter: remove it, "
                                  "run `tuneforge merge-lora` and quantize output_dir/merged (docs/quantization.md)."))
    for key in ("qat", "fp8"):
        if getattr(cfg, key) and cfg.deepspeed:
            issues.append(ConfigIssue(key, "is not available with DeepSpeed, whose ZeRO-3 partitions the layers "
                                      "torchao replaces; shard with FSDP2 instead (fsdp_version: 2, docs/multi-gpu.md)."))
    if cfg.fp8 and (cfg.load_in_4bit or cfg.load_in_8bit or cfg.adapter == "qlora"):
        issues.append(ConfigIssue("fp8", "float8 matmuls run 16-bit base layers, and load_in_4bit / load_in_8bit "
                                  "already quantize them: keep one (LoRA with fp8: true, or QLoRA)."))
    fused = [k for k in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel") if getattr(cfg, k)]
    if cfg.fp8 and fused:
        issues.append(ConfigIssue("fp8", f"{', '.join(fused)} compute the base layers' 16-bit matmuls themselves, "
                                  "so float8 would not reach them: remove fp8 or the kernel keys."))
    if cfg.fp8_frozen_weights:
        issues += _frozen_weight_issues(cfg)
    if cfg.fp8_enable_fsdp_float8_all_gather and not (cfg.fp8 and cfg.fsdp_enabled):
        issues.append(ConfigIssue("fp8_enable_fsdp_float8_all_gather", "applies to fp8: true with FSDP2 "
                                  "(fsdp_version: 2); remove it or set both."))
    return issues


def _frozen_weight_issues(cfg) -> list[ConfigIssue]:
    """fp8_frozen_weights replaces the base layers' 16-bit weights: refused where something else reads or writes
    them in 16 bits."""
    key = "fp8_frozen_weights"
    if not (cfg.fp8 and cfg.adapter):
        return [ConfigIssue(key, "applies to fp8: true with an adapter (the frozen base layers); set both or remove "
                            "it.")]
    readers = {
        "fsdp_version: 2": cfg.fsdp_enabled and "FSDP2 shards 16-bit parameters",
        f"rl: {cfg.rl}": method_facts(cfg).online and "the generation engine reads the 16-bit base weights",
        "relora": cfg.relora_every() and "ReLoRA merges every adapter into the 16-bit base weights",
        "peft_use_dora": cfg.peft_use_dora and "DoRA takes the norm of the 16-bit base weights",
    }
    return [ConfigIssue(key, f"is not available with {name}: {why}; remove {key} (fp8: true alone casts the "
                        "weights at each call).") for name, why in readers.items() if why]
