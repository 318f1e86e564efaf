"""Rewrite an Axolotl config's raw mapping into tuneforge's keys, before validation.

Each accepted Axolotl-only key leaves one note (printed as a warning, and by `validate`); each refused one
leaves an issue that names the key, why, and what to do instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import axolotl_rewrites, axolotl_values, compat, distributed, plugins
from .errors import ConfigIssue

Where = Callable[[tuple], tuple]


def apply(raw: dict[str, Any], issues: list[ConfigIssue], where: Where) -> list[str]:
    notes: list[str] = []
    _attention_flags(raw, issues, where, notes)
    _renamed(raw, issues, where, notes)
    problem = axolotl_values.refuse(issues, where)
    axolotl_values.apply(raw, problem, notes)
    axolotl_rewrites.apply(raw, problem, notes)  # before _plugins: SwanLab's plugin turns use_swanlab on
    distributed.normalize(raw, notes, problem)
    _legacy_values(raw, notes)
    _plugins(raw, issues, where, notes)
    notes += plugins.apply_fusion_switches(raw)
    for key in list(raw):
        if key in compat.IGNORED:
            raw.pop(key)
        elif key in compat.BUILT_IN:
            if raw.pop(key):
                notes.append(f"`{key}` is not needed: {compat.BUILT_IN[key]}")
        elif key in compat.NOT_SUPPORTED_YET:
            value = raw.pop(key)
            if not compat.is_noop(value):
                issues.append(ConfigIssue(key, refusal(key, compat.NOT_SUPPORTED_YET[key]), *where((key,))))
    _evaluation_without_data(raw, notes)
    for key in ("datasets", "test_datasets"):
        entries = raw.get(key)
        for i, entry in enumerate(entries if isinstance(entries, list) else []):  # else: a type error, reported
            _dataset_compat(entry, (key, i), notes)
    return notes


def refusal(key: str, why: str) -> str:
    return f"Axolotl key, not supported yet by tuneforge: {why}; remove it"


def _attention_flags(raw: dict, issues: list[ConfigIssue], where: Where, notes: list[str]) -> None:
    for old, new in compat.ATTENTION_FLAGS.items():
        if old in raw:
            value = raw.pop(old)
            if value:
                if raw.get("attn_implementation") not in (None, new):
                    issues.append(ConfigIssue(old, f"conflicts with attn_implementation: {raw['attn_implementation']}",
                                              *where((old,))))
                raw["attn_implementation"] = new
                notes.append(f"`{old}: true` is deprecated; using `attn_implementation: {new}`")


def _renamed(raw: dict, issues: list[ConfigIssue], where: Where, notes: list[str]) -> None:
    for old, new in compat.RENAMED.items():
        if old in raw:
            if new in raw:
                issues.append(ConfigIssue(old, f"is the old name of `{new}`, which is also set; keep `{new}`",
                                          *where((old,))))
            else:
                raw[new] = raw.pop(old)
                notes.append(f"`{old}` is deprecated; using `{new}`")


def _legacy_values(raw: dict, notes: list[str]) -> None:
    """Older Axolotl keys whose meaning maps onto a tuneforge key."""
    for old, dtype in compat.DTYPE_SWITCHES.items():
        if old in raw and raw.pop(old) is True:
            if raw.get("torch_dtype") in (None, dtype):
                raw["torch_dtype"] = dtype
                notes.append(f"`{old}: true` is Axolotl's older switch; using `torch_dtype: {dtype}`")
            else:
                notes.append(f"`{old}: true` ignored: torch_dtype: {raw['torch_dtype']} is set")
    if "max_packed_sequence_len" in raw:
        length = raw.pop("max_packed_sequence_len")
        if length:
            raw.setdefault("sample_packing", True)
            raw.setdefault("sequence_len", length)
            notes.append(f"`max_packed_sequence_len: {length}` is Axolotl's older packing key; using "
                         f"`sample_packing: true` with sequence_len {raw['sequence_len']}")
    if raw.pop("lr_quadratic_warmup", None):
        notes.append("`lr_quadratic_warmup: true`: warmup is linear here (a quadratic ramp is not implemented); "
                     "the rest of the schedule is the same")
    mode = raw.get("torch_compile_mode")
    if isinstance(mode, str) and mode in compat.COMPILE_MODES:  # another type: reported by validation
        raw["torch_compile_mode"] = compat.COMPILE_MODES[mode]
        notes.append(f"`torch_compile_mode: {mode}` captures CUDA graphs, which per-block compilation cannot; "
                     f"using {compat.COMPILE_MODES[mode]}")
    if "rope_scaling" in raw:
        value = raw.pop("rope_scaling")
        if value:
            model_config = raw.setdefault("model_config", {})
            if isinstance(model_config, dict):
                model_config.setdefault("rope_scaling", value)
                notes.append("`rope_scaling` at the top level is Axolotl's older form; using model_config.rope_scaling")


def _plugins(raw: dict, issues: list[ConfigIssue], where: Where, notes: list[str]) -> None:
    if "plugins" not in raw:
        return
    value = raw.pop("plugins")
    if compat.is_noop(value):
        return
    accepted, refused = plugins.check_plugins(value)
    notes += accepted
    issues.extend(ConfigIssue("plugins", msg, *where(("plugins",))) for msg in refused)


def _evaluation_without_data(raw: dict, notes: list[str]) -> None:
    """Axolotl ignores an evaluation schedule when there is nothing to evaluate (and 0 means none)."""
    has_eval = bool(raw.get("val_set_size")) or bool(raw.get("test_datasets"))
    for key in ("evals_per_epoch", "eval_steps"):
        if key not in raw or raw[key] is None:
            continue
        if raw[key] == 0:
            raw.pop(key)
            notes.append(f"`{key}: 0` means no scheduled evaluation; ignored")
        elif not has_eval and raw.get("eval_strategy") != "no":
            raw.pop(key)
            notes.append(f"`{key}` ignored: there is nothing to evaluate (set val_set_size or test_datasets to "
                         "evaluate)")


def _dataset_compat(entry: Any, path: tuple, notes: list[str]) -> None:
    if not isinstance(entry, dict):
        return
    mapping = entry.get("message_property_mappings") or {}
    if not isinstance(mapping, dict):
        return  # reported by validation
    for old, prop in (("message_field_role", "role"), ("message_field_content", "content")):
        if old in entry:
            mapping.setdefault(prop, entry.pop(old))
            notes.append(f"{'.'.join(map(str, path))}.{old} is deprecated; using message_property_mappings.{prop}")
    if mapping:
        entry["message_property_mappings"] = mapping
    axolotl_values.dataset_thinking(entry, ".".join(map(str, path)), notes)
    if isinstance(entry.get("type"), str) and entry["type"] in compat.DATASET_TYPES:
        old = entry["type"]
        entry["type"] = compat.DATASET_TYPES[old]
        notes.append(f"{'.'.join(map(str, path))}: `type: {old}` is Axolotl's name; using `type: {entry['type']}` "
                     "(the same rows)")
    if entry.get("type") == "sharegpt":
        notes.append(f"{'.'.join(map(str, path))}: `type: sharegpt` is deprecated; using chat_template with from/value")
        entry["type"] = "chat_template"
        entry.setdefault("field_messages", "conversations")
        entry.setdefault("message_property_mappings", {"role": "from", "content": "value"})
