"""`validate`'s checks that need no model: dataset `type:` names, chat template names, local data files
and the fields of their first rows.

Nothing here imports user code: a `type: module.function` is checked by finding the module's file (next to
the config, in the working directory, or importable), not by running it. Rows are read from JSON Lines /
JSON files only (the first few lines), so the check is quick on any size of file; other file kinds are
checked for existence. Problems come back as one `ConfigError`, each with its key path and YAML line.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from tuneforge import chat_templates
from tuneforge.config import Config, ConfigError, ConfigIssue
from tuneforge.config.data import DatasetEntry
from tuneforge.config.methods import method_facts
from tuneforge.errors import TuneforgeError

from . import formats
from .sources import _looks_local

ROWS_CHECKED = 5  # first rows of each local JSON Lines file whose fields are checked


def check_without_model(cfg: Config) -> None:
    """Raise ConfigError listing every dataset / template problem found without loading the model."""
    issues: list[ConfigIssue] = []
    issues += _template_issues("chat_template", cfg.chat_template)
    for key in ("datasets", "test_datasets"):
        for i, entry in enumerate(getattr(cfg, key) or []):
            where = f"{key}.{i}"
            issues += _template_issues(f"{where}.chat_template", entry.chat_template)
            issues += _entry_issues(cfg, entry, where)
    for i, entry in enumerate(cfg.pretraining_dataset or []):
        issues += _stream_issues(cfg, entry, f"pretraining_dataset.{i}")
    if issues:
        raise ConfigError([_with_line(cfg, issue) for issue in issues])


def _stream_issues(cfg: Config, entry, where: str) -> list[ConfigIssue]:
    """A streamed entry's files exist and have one known format (nothing is read; a hub id is not looked up)."""
    from .stream_sources import EntryFiles

    try:
        EntryFiles(entry, cfg, where)
    except TuneforgeError as exc:
        return [ConfigIssue(f"{where}.path", str(exc))]
    return []


def _template_issues(path: str, name: str | None) -> list[ConfigIssue]:
    if not name or name in ("tokenizer_default", "jinja"):
        return []
    base = name.removeprefix(chat_templates.FALLBACK_PREFIX)
    try:
        chat_templates.canonical(base)
    except TuneforgeError as exc:
        return [ConfigIssue(path, str(exc).removeprefix("chat_template: "))]
    return []


def _entry_issues(cfg: Config, entry: DatasetEntry, where: str) -> list[ConfigIssue]:
    issues = _type_issues(cfg, entry, where)
    if issues or not entry.path:
        return issues
    resolved = Path(cfg.resolve_path(entry.path) or entry.path).expanduser()
    if not resolved.exists():
        if _looks_local(entry.path):
            return [ConfigIssue(f"{where}.path", f"dataset file not found: {entry.path} (looked next to the config "
                                f"and in the working directory); check the path, or give a hub id (owner/name)")]
        return []  # a hub dataset: checked when it is downloaded
    if resolved.is_file() and resolved.suffix.lower() in (".jsonl", ".json"):
        return _row_issues(entry, resolved, where)
    return []


def _type_issues(cfg: Config, entry: DatasetEntry, where: str) -> list[ConfigIssue]:
    spec = entry.type
    if not isinstance(spec, str):
        return []
    name = spec.partition(":")[0]
    if name in formats.registered():
        return []
    if method_facts(cfg).online:  # an online method's entry type is a prompt transform, not an SFT format
        from .formats.grpo import _BUILTINS

        if name in _BUILTINS:
            return []
    if "." in name:
        return _module_issues(cfg, spec, name, where)
    if method_facts(cfg).online:
        from .formats.grpo import _BUILTINS

        return [ConfigIssue(f"{where}.type", f"unknown prompt transform `{spec}`; use `module.function` or one of "
                            f"{', '.join(sorted(_BUILTINS))}")]
    try:
        formats.resolve(spec, where)
    except TuneforgeError as exc:
        return [ConfigIssue(f"{where}.type", str(exc).removeprefix(f"{where}: "))]
    return []


def _module_issues(cfg: Config, spec: str, name: str, where: str) -> list[ConfigIssue]:
    """`type: module.function`: the module must be findable where the data step will import it from."""
    top = name.partition(".")[0]
    if importlib.util.find_spec(top) is not None:
        return []
    grpo = method_facts(cfg).online  # prompt transforms are also looked up next to the config and in the cwd
    if grpo and any((d / f"{top}.py").exists() or (d / top).is_dir() for d in (cfg.source_dir, Path.cwd())):
        return []
    where_looked = "next to the config, in the working directory or " if grpo else ""
    return [ConfigIssue(f"{where}.type", f"`type: {spec}` names module `{name.rpartition('.')[0]}`, which is not "
                        f"{where_looked}on the import path; put {top}.py on PYTHONPATH (e.g. PYTHONPATH=. "
                        "when it is in the working directory)")]


def _needed_fields(entry: DatasetEntry) -> tuple[list[str], str | None]:
    """(top-level fields every row needs, the list field whose messages need role/content) for the type."""
    spec = entry.type if isinstance(entry.type, str) else None
    name = (spec or "").partition(":")[0]
    if name == "chat_template":
        return [], entry.field_messages or "messages"
    if name == "alpaca":
        return ["instruction", "output"], None
    if name == "completion":
        return [entry.field or "text"], None
    if name == "input_output":
        return ["segments"], None
    return [], None


def _row_issues(entry: DatasetEntry, path: Path, where: str) -> list[ConfigIssue]:
    fields, messages = _needed_fields(entry)
    if not fields and not messages:
        return []
    issues: list[ConfigIssue] = []
    for n, row in enumerate(_first_rows(path)):
        if isinstance(row, str):
            return [ConfigIssue(f"{where}.path", f"{path.name} row {n} is not valid JSON ({row})")]
        if not isinstance(row, dict):
            return [ConfigIssue(f"{where}.path", f"{path.name} row {n} is not a JSON object")]
        have = ", ".join(sorted(row)) or "nothing"
        for field in fields:
            if row.get(field) is None:
                issues.append(ConfigIssue(f"{where}.type", f"{path.name} row {n} has no `{field}` field, which "
                                          f"`type: {entry.type}` needs (the row has: {have})"))
        if messages:
            issues += _message_issues(entry, row, messages, path, n, where, have)
        if issues:
            return issues  # the first bad row says enough
    return issues


def _message_issues(entry: DatasetEntry, row: dict[str, Any], key: str, path: Path, n: int, where: str,
                    have: str) -> list[ConfigIssue]:
    if entry.field_messages is None and key not in row and "conversations" in row:
        key = "conversations"  # the chat format's own fallback
    value = row.get(key)
    if not isinstance(value, list):
        return [ConfigIssue(f"{where}.field_messages", f"{path.name} row {n} has no list of messages in `{key}` "
                            f"(the row has: {have}); set field_messages to the key that holds them")]
    mapping = entry.message_property_mappings or {}
    needed = [mapping.get("role", "role"), mapping.get("content", "content")]
    for m, message in enumerate(value):
        missing = [k for k in needed if not isinstance(message, dict) or k not in message]
        if missing:
            keys = ", ".join(sorted(message)) if isinstance(message, dict) else type(message).__name__
            return [ConfigIssue(f"{where}.message_property_mappings", f"{path.name} row {n}, message {m} has no "
                                f"`{missing[0]}` (it has: {keys}); map the message's keys with "
                                "message_property_mappings (role: ..., content: ...)")]
    return []


def _first_rows(path: Path) -> list[Any]:
    """The first rows of a JSON Lines file (or of a JSON list); a line that is not JSON comes back as text."""
    rows: list[Any] = []
    with path.open(encoding="utf-8", errors="replace") as f:
        head = f.read(1)
        f.seek(0)
        if head == "[" and path.suffix.lower() == ".json":
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                return [f"{exc.msg} (line {exc.lineno})"]
            return data[:ROWS_CHECKED] if isinstance(data, list) else [data]
        for line in f:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                rows.append(exc.msg)
            if len(rows) == ROWS_CHECKED:
                break
    return rows


def _with_line(cfg: Config, issue: ConfigIssue) -> ConfigIssue:
    """Attach the YAML line of the issue's key (or of the nearest key above it) when the config has one."""
    lines = getattr(cfg, "_lines", None) or {}
    parts = tuple(int(p) if p.isdigit() else p for p in issue.path.split("."))
    for n in range(len(parts), 0, -1):
        if parts[:n] in lines:
            return ConfigIssue(issue.path, issue.message, lines[parts[:n]], str(cfg.source_file))
    return ConfigIssue(issue.path, issue.message, None, str(cfg.source_file) if cfg.source_file else None)
