"""Smaller Axolotl settings rewritten into tuneforge's before validation, each with a note.

SwanLab's plugin and its keys tuneforge does not use, `vllm.serve_module`, and `pretraining_dataset`
entries written with the SFT dataset keys (`type: completion`, `field:`). apply_compat.py calls `apply`.
"""

from __future__ import annotations

from typing import Any

from .plugins import plugin_name

# swanlab_* keys the SwanLab tracker does not use (engine/swanlab_tracker.py): why, for the note.
SWANLAB_UNUSED = {
    "swanlab_web_host": "the login goes to swanlab_api_host",
    "swanlab_log_model": "checkpoints are not uploaded to SwanLab; they stay in output_dir",
    "swanlab_lark_webhook_url": "no Lark notifications are sent",
    "swanlab_lark_secret": "no Lark notifications are sent",
}
# Axolotl's vLLM server scripts (`vllm.serve_module`) and what serves instead.
_SERVER = ("`tuneforge vllm-serve cfg.yaml` is the generation server here (docs/vllm-serving.md)")
_SERVE_MODULES = {
    "axolotl.scripts.vllm_serve_lora": "Axolotl's LoRA-aware vLLM server; " + _SERVER + ": with an adapter and "
                                       "trl.vllm_lora_sync: true it loads the adapter natively, otherwise it "
                                       "receives the merged weights",
}


def apply(raw: dict[str, Any], problem, notes: list[str]) -> None:
    """Rewrite in place; `problem(key, message)` records a refusal."""
    _swanlab(raw, notes)
    _serve_module(raw, notes)
    for i, entry in enumerate(raw.get("pretraining_dataset") or []):
        if isinstance(entry, dict):
            _pretraining_entry(entry, f"pretraining_dataset.{i}", problem, notes)


def _swanlab(raw: dict, notes: list[str]) -> None:
    plugins = raw.get("plugins")
    listed = any(plugin_name(p) == "SwanLabPlugin" for p in (plugins if isinstance(plugins, list) else [plugins]))
    if listed and raw.get("use_swanlab") is None:
        raw["use_swanlab"] = True  # Axolotl's plugin turns SwanLab on unless the config says otherwise
    for key, why in SWANLAB_UNUSED.items():
        if raw.get(key):
            notes.append(f"`{key}` is not used: {why}")
    if not raw.get("use_swanlab"):
        keys = [k for k, v in raw.items() if isinstance(k, str) and k.startswith("swanlab_") and v is not None]
        if keys:
            notes.append(f"{', '.join(f'`{k}`' for k in keys)} set but SwanLab is off: add use_swanlab: true")


def _serve_module(raw: dict, notes: list[str]) -> None:
    block = raw.get("vllm")
    if not isinstance(block, dict) or "serve_module" not in block:
        return
    module = block.pop("serve_module")
    if module:
        what = _SERVE_MODULES.get(str(module), "a vLLM server script of Axolotl's; " + _SERVER)
        notes.append(f"vllm.serve_module: {module} is not used: it names {what}")


def _pretraining_entry(entry: dict, where: str, problem, notes: list[str]) -> None:
    """Axolotl streams a `type: completion` entry like a `pretrain` one: every token of the text trained."""
    if entry.get("type") == "completion":
        entry["type"] = "pretrain"
        notes.append(f"{where}: `type: completion` streams as `type: pretrain` (every token of the text trained)")
    if "field" not in entry:
        return
    field = entry.pop("field")
    if entry.get("text_column") not in (None, field):
        problem(f"{where}.field", f"names the text column `{field}` but text_column is `{entry['text_column']}`; "
                "keep one of them")
    elif field is not None:
        entry["text_column"] = field
        notes.append(f"{where}.field is the SFT datasets' key; using text_column: {field}")
