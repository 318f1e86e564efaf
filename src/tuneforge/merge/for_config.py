"""`tuneforge merge-lora` (and `merge_lora: true` after training): what to merge for a config, and where.

The adapter is `--lora-model-dir`, else output_dir when it holds one, else the config's `lora_model_dir`;
the base is the config's base model as a local folder (or output_dir/base_model for an adapter trained on a
randomly initialised base); the destination is `--output`, else output_dir/merged.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from tuneforge.errors import ModelError
from tuneforge.publish import check_destination

from .adapter import adapter_config
from .write import merge_adapter, tokenizer_files

log = logging.getLogger("tuneforge")


def find_adapter_dir(cfg, lora_model_dir: str | None) -> Path:
    """--lora-model-dir, else output_dir when it holds an adapter, else the config's lora_model_dir."""
    if lora_model_dir:
        return Path(cfg.resolve_path(lora_model_dir))
    out = cfg.output_path()
    if (out / "adapter_config.json").exists() or not cfg.lora_model_dir:
        return out
    log.info("output_dir %s holds no adapter; using lora_model_dir %s", out, cfg.lora_model_dir)
    return Path(cfg.resolve_path(cfg.lora_model_dir))


def base_model_dir(cfg, base_model: str | None = None) -> Path:
    """The base model as a local folder: a path, or a hub id already in the local cache (or downloadable)."""
    from tuneforge.models.tokenizer import model_source

    src = model_source(cfg, base_model)
    if Path(src).expanduser().is_dir():
        return Path(src).expanduser()
    if src.startswith((".", "/", "~")) or src.count("/") > 1:
        raise ModelError(f"base model folder not found: {src}. Check base_model.")
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            src,
            revision=cfg.model_revision,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken", "*.py"],
        )
    except Exception as exc:
        raise ModelError(
            f"could not get base model `{src}`: not a local folder, and the hub download failed "
            f"({type(exc).__name__}). Download it once and point base_model to the folder."
        ) from None
    return Path(path)


def merge_for_config(cfg, lora_model_dir: str | None = None, output: str | None = None, dequant: bool = False,
                     overwrite: bool = False) -> Path:
    """Merge the config's adapter into its base model; returns the destination folder. `tuneforge merge-lora`
    passes its options; training with `merge_lora: true` merges output_dir's adapter into output_dir/merged."""
    quantized = cfg.adapter == "qlora" or cfg.load_in_4bit or cfg.load_in_8bit
    if quantized and not dequant:
        raise ModelError(
            "this run trained a QLoRA/8-bit adapter on a quantized base. Merging writes the base in its stored "
            "16/32-bit precision plus the adapter delta (a 4-bit model cannot hold the delta exactly). The "
            "adapter learned against the quantized weights, so the merged model differs from the QLoRA model "
            "by about the quantization error. Re-run with --dequant to accept this."
        )
    adapter_dir = find_adapter_dir(cfg, lora_model_dir)
    recorded = adapter_config(adapter_dir).get("base_model_name_or_path")
    dest = Path(output).expanduser() if output else cfg.output_path() / "merged"
    check_destination(dest, overwrite=overwrite)
    saved_base = cfg.output_path() / "base_model"  # an adapter trained on a randomly initialised base
    base_dir = saved_base if cfg.reinit_weights and saved_base.is_dir() else base_model_dir(cfg)
    if quantized:
        log.warning(
            "--dequant: merging into the unquantized base weights from %s; outputs will differ slightly from "
            "the 4-bit training model (quantization error).",
            base_dir,
        )
    if recorded and Path(recorded).name != base_dir.name and recorded != cfg.base_model:
        log.warning("the adapter was trained on %s, but base_model is %s", recorded, cfg.base_model)
    tokenizer_dir = adapter_dir if tokenizer_files(adapter_dir) else cfg.output_path()
    gen_dir = adapter_dir if (adapter_dir / "generation_config.json").exists() else base_dir
    log.info("merging %s into %s -> %s", adapter_dir, base_dir, dest)
    report = merge_adapter(base_dir, adapter_dir, dest, tokenizer_dir=tokenizer_dir, generation_config_dir=gen_dir,
                           overwrite=overwrite, prepare_base=_quantized_experts(cfg))
    _set_stop_tokens(cfg, dest)
    log.info(
        "merged %d LoRA modules and %d saved tensors over %d shard(s) (%.1f MB) into %s%s",
        report.merged_tensors,
        report.replaced_tensors,
        report.shards,
        report.total_bytes / 1e6,
        dest,
        f"; vocab_size -> {report.vocab_size}" if report.vocab_size else "",
    )
    return dest


def _quantized_experts(cfg):
    """quantize_moe_experts: the adapter learned against the NF4 (int8) experts, so the merged model gets those
    values (in the base's dtype), and reproduces the training model's experts exactly."""
    if not cfg.quantize_moe_experts:
        return None
    from tuneforge.models.moe_quant import round_trip_experts

    return functools.partial(round_trip_experts, bits=8 if cfg.load_in_8bit else 4)


def _set_stop_tokens(cfg, dest: Path) -> None:
    """generation_config.json stops at the chat template's end-of-turn token(s), as training used them."""
    import json

    path = dest / "generation_config.json"
    if not path.exists():
        return
    from transformers import AutoTokenizer

    from tuneforge.chat_templates import stop_token_ids

    ids = stop_token_ids(AutoTokenizer.from_pretrained(str(dest)), cfg.eot_tokens)
    if ids:
        data = json.loads(path.read_text())
        data["eos_token_id"] = ids[0] if len(ids) == 1 else ids
        path.write_text(json.dumps(data, indent=2) + "\n")
