"""The model and tokenizer `tuneforge inference` generates with: the trained run's, found in output_dir.

This loads a finished model for generation (eval mode, on CUDA when available); `tuneforge.models.load`
builds the model to train, with the training-only settings (attention kernels, config overrides,
gradient checkpointing, frozen parameters) that generation does not need.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.errors import ModelError

log = logging.getLogger("tuneforge")

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


# ---------------------------------------------------------------- what to load
@dataclass
class Sources:
    model: str  # folder or hub id passed to from_pretrained
    adapter: Path | None  # PEFT adapter folder, if any
    tokenizer: Path | None  # folder with the run's saved tokenizer, if any


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists()


def find_sources(cfg, lora_model_dir: str | None = None, base_model: str | None = None) -> Sources:
    from tuneforge.models.tokenizer import model_source

    out = cfg.output_path()
    base = model_source(cfg, base_model)
    if not base_model and cfg.reinit_weights and (out / "base_model").is_dir():
        base = str(out / "base_model")  # an adapter trained on a randomly initialised base saved there
    if lora_model_dir:
        adapter = Path(cfg.resolve_path(lora_model_dir))
        if not (adapter / "adapter_config.json").exists():
            raise ModelError(f"--lora-model-dir {adapter} holds no adapter_config.json; pass the adapter folder.")
    elif (out / "adapter_config.json").exists():
        adapter = out
    elif not base_model and (out / "config.json").exists() and any((out / f).exists() for f in WEIGHT_FILES):
        return Sources(model=str(out), adapter=None, tokenizer=out if _has_tokenizer(out) else None)
    elif cfg.lora_model_dir:
        adapter = Path(cfg.resolve_path(cfg.lora_model_dir))
    else:
        log.warning("no trained model in %s; generating with the base model %s", out, base)
        adapter = None
    tokenizer = next((d for d in (adapter, out) if d is not None and _has_tokenizer(d)), None)
    return Sources(model=base, adapter=adapter, tokenizer=tokenizer)


# ---------------------------------------------------------------- loading
def _generation_dtype(cfg):
    import torch

    if cfg.torch_dtype and cfg.torch_dtype != "auto":
        return getattr(torch, cfg.torch_dtype)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _adapter_vocab(adapter: Path) -> int | None:
    """Rows of the embedding the adapter saved (training resized the vocabulary), else None."""
    file = adapter / "adapter_model.safetensors"
    if not file.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
            if key.endswith(("embed_tokens.weight", "embed_tokens.base_layer.weight", "lm_head.weight")):
                return f.get_slice(key).get_shape()[0]
    return None


def load_tokenizer_for(cfg, sources: Sources):
    if sources.tokenizer is not None:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(sources.tokenizer), trust_remote_code=cfg.trust_remote_code)
        except Exception as exc:
            raise ModelError(f"could not load the tokenizer saved in {sources.tokenizer}: {exc}") from None
    from tuneforge.models.tokenizer import load_tokenizer

    return load_tokenizer(cfg)


def load_for_generation(cfg, lora_model_dir: str | None = None, base_model: str | None = None):
    """(model, tokenizer) ready to generate, on CUDA when available."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    sources = find_sources(cfg, lora_model_dir, base_model)
    tokenizer = load_tokenizer_for(cfg, sources)
    kwargs: dict[str, Any] = {"dtype": _generation_dtype(cfg), "trust_remote_code": cfg.trust_remote_code}
    quantized = cfg.load_in_4bit or cfg.load_in_8bit
    if quantized:
        kwargs["quantization_config"] = _quantization(cfg)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(sources.model, **kwargs)
    except Exception as exc:
        raise ModelError(f"could not load the model from {sources.model}: {type(exc).__name__}: {exc}") from None
    if cfg.quantize_moe_experts and sources.adapter is not None:  # the experts as training saw them
        from tuneforge.models.moe_quant import quantize_for_config

        quantize_for_config(cfg, model)
    if sources.adapter is not None:
        from peft import PeftModel

        rows = _adapter_vocab(sources.adapter)
        if rows and rows != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(rows)
        try:
            model = PeftModel.from_pretrained(model, str(sources.adapter))
        except Exception as exc:
            raise ModelError(
                f"could not load the adapter in {sources.adapter} onto {sources.model}: {exc}. Is base_model the "
                "model this adapter was trained on?"
            ) from None
    if not quantized and torch.cuda.is_available():
        model = model.to("cuda")
    log.info("loaded %s%s", sources.model, f" + adapter {sources.adapter}" if sources.adapter else "")
    return model.eval(), tokenizer


def _quantization(cfg):
    """The training run's bitsandbytes settings (CUDA only), with a clear error elsewhere."""
    import importlib.util

    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(
            "this run trained on a 4/8-bit base (load_in_4bit/load_in_8bit), which needs a CUDA GPU and the "
            "bitsandbytes package. Elsewhere, load the base unquantized: add `--adapter lora --load-in-4bit false` "
            "(or `--load-in-8bit false`), or run `tuneforge merge-lora --dequant` and generate from the merged folder."
        )
    from tuneforge.models.load import quantization_config

    return quantization_config(cfg)
