"""Load a YAML config: aliases, unknown keys with did-you-mean, overrides, validation, rules.

All problems are collected and raised together as one `ConfigError`, each with its key path and,
when it came from the file, its YAML line.
"""

from __future__ import annotations

import copy
import difflib
import logging
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from . import apply_compat, axolotl_keys, compat, ranges, rules, variant_rules  # noqa: F401 - they register rules
from .errors import ConfigError, ConfigIssue
from .schema import Config

log = logging.getLogger("tuneforge")

Path_ = tuple[str | int, ...]


# ---------------------------------------------------------------- YAML with line numbers
# A config is a few hundred nodes; aliases can make a 9-line file expand to billions (an "alias bomb"), which
# every later walk (line map, validation) would expand. The expanded size is counted on the composed graph
# (each distinct node once) and refused beyond this bound.
MAX_YAML_NODES = 100_000


def _expanded_size(root: yaml.Node) -> int:
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # iterative post-order: a deeply nested file cannot exhaust the recursion limit
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if done:
            sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in children), MAX_YAML_NODES + 1)
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _line_map(root: yaml.Node | None, duplicates: list[tuple[Path_, int, int]] | None = None) -> dict[Path_, int]:
    """Map each key path to its 1-based line in the YAML text; a key given twice goes to `duplicates`."""
    lines: dict[Path_, int] = {}
    duplicates = [] if duplicates is None else duplicates

    def walk(node: yaml.Node, path: Path_) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                p = (*path, key_node.value)
                if p in lines:
                    duplicates.append((p, lines[p], key_node.start_mark.line + 1))
                lines[p] = key_node.start_mark.line + 1
                walk(value_node, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                p = (*path, i)
                lines[p] = item.start_mark.line + 1
                walk(item, p)

    if root is not None:
        walk(root, ())
    return lines


def _compose_and_construct(text: str, path: Path) -> tuple[Any, yaml.Node | None]:
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is not None and _expanded_size(root) > MAX_YAML_NODES:
            raise ConfigError([ConfigIssue("", f"the YAML expands to more than {MAX_YAML_NODES:,} values (aliases "
                                           "repeating aliases?); a config needs far fewer: write the values out",
                                           None, str(path))])
        return (loader.construct_document(root) if root is not None else None), root
    finally:
        loader.dispose()


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError([ConfigIssue("", f"the file is not UTF-8 text (byte {raw[exc.start]:#04x} at offset "
                                       f"{exc.start}); save it as UTF-8", line, str(path))]) from None


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[Path_, int]]:
    if not path.exists():
        raise ConfigError([ConfigIssue("", f"config file not found: {path}")])
    if not path.is_file():
        raise ConfigError([ConfigIssue("", f"the config {path} is not a file")])
    text = _decode(path.read_bytes(), path)
    duplicates: list[tuple[Path_, int, int]] = []
    try:
        data, root = _compose_and_construct(text, path)
        data = data or {}
        lines = _line_map(root, duplicates)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise ConfigError([ConfigIssue("", f"invalid YAML: {getattr(exc, 'problem', exc)}", line, str(path))]) from None
    except RecursionError:
        raise ConfigError([ConfigIssue("", "the YAML is nested too deeply for a config", None, str(path))]) from None
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue("", "the config must be a mapping of keys to values", 1, str(path))])
    if duplicates:
        # YAML keeps the last value silently; a key written twice is almost always a mistake.
        raise ConfigError([
            ConfigIssue(_dotted(p), f"is given twice, on lines {first} and {second}; keep one", second, str(path))
            for p, first, second in duplicates
        ])
    return data, lines


# ---------------------------------------------------------------- command-line overrides
def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn `--learning-rate 3e-4 --trl.beta=0.1 --sample-packing` into a nested dict.

    Values are parsed as YAML scalars/lists, so `3e-4`, `true`, `[q_proj, v_proj]` work. A flag with no
    value means `true`.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError([ConfigIssue(arg, "unexpected argument; overrides look like `--key value`", source="command line")])
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
                i += 1
            else:
                value = "true"
        i += 1
        parsed = _scalar(value)
        parts = [p.replace("-", "_") for p in key.split(".")]
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = parsed
    return out


def _scalar(text: str) -> Any:
    """Parse an override value: numbers first (YAML 1.1 reads `3e-4` as a string), then YAML."""
    if text == "":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def _merge(base: dict[str, Any], over: dict[str, Any], prefix: Path_, touched: set[Path_]) -> None:
    for key, value in over.items():
        path = (*prefix, key)
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, path, touched)
        else:
            base[key] = value
            touched.add(path)


# A command-line value that switches a feature off wins over the file's settings of that feature
# (`train cfg.yml --save-strategy no` on a file with save_steps: the user asked for no checkpoints).
_SUPERSEDES: dict[tuple[str, Any], tuple[str, ...]] = {
    ("save_strategy", "no"): ("save_steps", "saves_per_epoch"),
    ("save_strategy", "best"): ("save_steps", "saves_per_epoch"),  # best saves at better evaluations only
    ("eval_strategy", "no"): ("eval_steps", "evals_per_epoch"),
}


def _drop_superseded(raw: dict[str, Any], touched: set[Path_]) -> list[str]:
    notes = []
    for (key, value), companions in _SUPERSEDES.items():
        # YAML reads an unquoted `no` as false; the schema takes both spellings
        if (key,) not in touched or raw.get(key) not in (value, False if value == "no" else value):
            continue
        for other in companions:
            if other in raw and (other,) not in touched:
                notes.append(f"{other}: {raw.pop(other)!r} from the file is not used: --{key.replace('_', '-')} "
                             f"{value} on the command line takes precedence")
    return notes


# ---------------------------------------------------------------- unknown keys
def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    found: list[type[BaseModel]] = []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, dict, typing.Annotated) or origin is not None:
        for arg in typing.get_args(annotation):
            found.extend(_nested_models(arg))
    return found


def _allowed_keys(model: type[BaseModel]) -> dict[str, Any]:
    return {(f.alias or name): f for name, f in model.model_fields.items()}


def _check_keys(raw: dict, model: type[BaseModel], path: Path_, issues: list[ConfigIssue], where) -> None:
    allowed = _allowed_keys(model)
    for key in list(raw):
        if key not in allowed:
            if compat.is_noop(raw[key]) and _axolotl_key(str(key), model):
                del raw[key]  # an Axolotl key left empty (`hub_model_id:`), as its examples write: nothing to do
                continue
            issues.append(ConfigIssue(_dotted((*path, key)), _unknown_message(str(key), allowed, model), *where((*path, key))))
            del raw[key]
            continue
        value = raw[key]
        if value is None and not _accepts_none(allowed[key].annotation):
            del raw[key]  # an empty key (`lora_fan_in_fan_out:`), as Axolotl's examples write: the default
            continue
        nested = _nested_models(allowed[key].annotation)
        if not nested:
            continue
        sub = nested[0]
        if isinstance(value, dict):
            _check_keys(value, sub, (*path, key), issues, where)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    _check_keys(item, sub, (*path, key, i), issues, where)


def _accepts_none(annotation: Any) -> bool:
    """Whether a field of this type can hold None (`X | None`, Optional[X], Any)."""
    if annotation is Any or annotation is type(None):
        return True
    return type(None) in typing.get_args(annotation)


def _axolotl_key(key: str, model: type[BaseModel]) -> bool:
    """An Axolotl key at the top level or in a `datasets:` entry (other nested blocks: typos only)."""
    if model is Config:
        return axolotl_keys.is_axolotl_key(key)
    return model.__name__ == "DatasetEntry" and axolotl_keys.is_axolotl_key(key, nested=True)


def _unknown_message(key: str, allowed: dict[str, Any], model: type[BaseModel]) -> str:
    if model is Config and key in compat.NOT_SUPPORTED_YET:
        return f"not supported yet ({compat.NOT_SUPPORTED_YET[key]})"
    if _axolotl_key(key, model):
        # A real Axolotl key: a did-you-mean to a different tuneforge key would mislead.
        return f"Axolotl key, not supported yet by tuneforge: `{key}`; {axolotl_keys.advice(key)}"
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    if not close and model is Config:  # a misspelt Axolotl key tuneforge lacks: name it and what to do
        axolotl = difflib.get_close_matches(key, sorted(axolotl_keys.TOP_LEVEL), n=1, cutoff=0.85)
        if axolotl:
            return f"unknown key `{key}`; did you mean Axolotl's `{axolotl[0]}`? (not supported here: " \
                   f"{_unsupported_reason(axolotl[0])})"
    hint = f"; did you mean `{close[0]}`?" if close else ""
    return f"unknown key `{key}`{hint}"


def _unsupported_reason(key: str) -> str:
    return compat.NOT_SUPPORTED_YET.get(key) or axolotl_keys.advice(key)


def _dotted(path: Path_) -> str:
    return ".".join(str(p) for p in path)


# ---------------------------------------------------------------- pydantic errors
def _issues_from_validation(exc: ValidationError, raw: dict, where) -> list[ConfigIssue]:
    issues = []
    seen: set[tuple[str, str]] = set()
    for err in exc.errors():
        path = _real_path(err["loc"], raw)
        msg = err["msg"].removeprefix("Value error, ")  # our validators' own words
        if err["type"] == "missing":
            msg = "required key is missing"
        elif path == ("optimizer",) and err["type"] == "literal_error":
            supported = list(typing.get_args(Config.model_fields["optimizer"].annotation))
            msg = axolotl_keys.optimizer_message(err.get("input"), supported)
        elif "input" in err and not isinstance(err["input"], dict | list):
            msg = f"{msg} (got {err['input']!r})"
        key = (_dotted(path), msg)
        if key in seen:
            continue
        seen.add(key)
        issues.append(ConfigIssue(_dotted(path), msg, *where(path)))
    return issues


def _real_path(loc: tuple, raw: Any) -> Path_:
    """Drop the union-branch names pydantic inserts into error locations."""
    path: list[str | int] = []
    node = raw
    for part in loc:
        if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int) and part < len(node):
            path.append(part)
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and part not in node and not path:
            path.append(part)  # a missing top-level key
            node = None
        elif isinstance(node, dict) and isinstance(part, str) and part[:1].islower() and "[" not in part:
            path.append(part)  # a missing nested key
            node = None
    return tuple(path)


# ---------------------------------------------------------------- entry point
def load(
    path: str | Path | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    *,
    data: dict[str, Any] | None = None,
) -> Config:
    """Load and validate a config from a YAML file (or a dict), applying command-line overrides."""
    source = str(path) if path is not None else "<dict>"
    if path is not None:
        raw, lines = _read_yaml(Path(path))
    else:
        raw, lines = copy.deepcopy(data or {}), {}
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    touched: set[Path_] = set()
    _merge(raw, overrides or {}, (), touched)
    dropped = _drop_superseded(raw, touched)

    def where(p: Path_) -> tuple[int | None, str | None]:
        for n in range(len(p), 0, -1):
            if p[:n] in touched:
                return None, "command line"
            if p[:n] in lines:
                return lines[p[:n]], source
        return None, None

    issues: list[ConfigIssue] = []
    notes = dropped + apply_compat.apply(raw, issues, where)
    _check_keys(raw, Config, (), issues, where)
    cfg = None
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        bad = _issues_from_validation(exc, raw, where)
        issues.extend(bad)
        cfg = _validate_without(raw, {i.path.split(".")[0] for i in bad})
    if cfg is not None:
        issues.extend(_locate(i, where) for i in rules.check(cfg))
    for note in notes:  # before any error too: `validate` shows what was accepted with a note
        log.warning(note)
    if issues:
        raise ConfigError(issues)
    assert cfg is not None
    cfg._notes = list(notes)
    cfg._lines = dict(lines)
    if path is not None:
        cfg._source_dir = Path(path).resolve().parent
        cfg._source_file = Path(path).resolve()
    return cfg


def _validate_without(raw: dict, bad_keys: set[str]) -> Config | None:
    """Best effort: validate with the broken keys left out, so cross-field rules still get checked."""
    try:
        return Config.model_validate({k: v for k, v in raw.items() if k not in bad_keys})
    except ValidationError:
        return None


def _locate(issue: ConfigIssue, where) -> ConfigIssue:
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in issue.path.split(".")] if issue.path else []
    line, src = where(tuple(parts))
    return ConfigIssue(issue.path, issue.message, line, src)


def dump(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain data, with Axolotl key names, omitting unset optional keys."""
    return cfg.model_dump(mode="json", by_alias=True, exclude_none=True)
