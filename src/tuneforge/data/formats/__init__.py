"""Dataset formats (`type:`): a registry from the type string to a row function.

A format is registered with `@register("name", version="1")`. Its builder receives a `FormatContext`
and returns a `RowFn`, which maps one source row to zero or more output rows (SFT formats produce
`input_ids` and `labels`, aligned and unshifted, -100 for untrained tokens). A malformed row raises
`RowError`; the pipeline adds the dataset and row number to the message.

The `version` string enters the prepared-data cache key: bump it whenever the format's output for the
same input changes.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tuneforge.config.data import DatasetEntry, UserDefinedFormat
from tuneforge.config.schema import Config
from tuneforge.errors import DataError

IGNORE_INDEX = -100

RowFn = Callable[[dict[str, Any]], list[dict[str, Any]]]


class RowError(DataError):
    """A single row is malformed; raised from a RowFn with a message describing the problem."""


@dataclass
class FormatContext:
    cfg: Config
    entry: DatasetEntry
    tokenizer: Any  # a transformers fast tokenizer
    style: str | None = None  # the part after ":" in `type: name:style`


FormatBuilder = Callable[[FormatContext], RowFn]


@dataclass(frozen=True)
class Format:
    name: str
    builder: FormatBuilder
    version: str


_REGISTRY: dict[str, Format] = {}
# Some `type:` values mean a different row shape for another family of methods: no type is pre-tokenized
# SFT rows, or prompt/chosen/rejected rows for DPO; `chatml.intel` is a pair for DPO and an unpaired
# completion for KTO. A format registered with `method=` replaces the plain one for that family.
_VARIANTS: dict[str, dict[str, Format]] = {}


def register(name: str, *, version: str, method: str | None = None) -> Callable[[FormatBuilder], FormatBuilder]:
    def deco(fn: FormatBuilder) -> FormatBuilder:
        if method is None:
            _REGISTRY[name] = Format(name, fn, version)
        else:
            _VARIANTS.setdefault(name, {})[method] = Format(name, fn, version)
        return fn

    return deco


def method_family(cfg: Config) -> str | None:
    """The family of row shapes the configured method trains on (None: the plain formats)."""
    if cfg.rl == "kto":
        return "kto"
    if cfg.rl in ("dpo", "ipo", "simpo", "orpo") or cfg.reward_model:
        return "preference"
    if cfg.process_reward_model:
        return "stepwise"
    return None


def _with_variants(fmt: Format) -> Format:
    """`fmt`, or a format that picks its method variant from the config when one is registered."""
    variants = _VARIANTS.get(fmt.name)
    if not variants:
        return fmt

    def builder(ctx: FormatContext) -> RowFn:
        return variants.get(method_family(ctx.cfg) or "", fmt).builder(ctx)

    version = ";".join([fmt.version, *(f"{k}={v.version}" for k, v in sorted(variants.items()))])
    return Format(fmt.name, builder, version)


def registered() -> dict[str, Format]:
    _import_builtin()
    return dict(_REGISTRY)


def _import_builtin() -> None:
    # Importing the modules registers their formats.
    from . import (  # noqa: F401
        alpaca,
        bradley_terry,
        chat_template,
        completion,
        input_output,
        kto,
        preference,
        pretokenized,
        stepwise,
        user_defined,
    )


def resolve(type_spec: str | UserDefinedFormat | None, where: str = "datasets") -> tuple[Format, str | None]:
    """Find the format for a `type:` value; returns it and the optional `:style` suffix."""
    _import_builtin()
    if type_spec is None:
        return _with_variants(_REGISTRY["pretokenized"]), None
    if isinstance(type_spec, UserDefinedFormat):
        return _with_variants(_REGISTRY["user_defined"]), None
    name, _, style = type_spec.partition(":")
    # Registered names (dotted ones such as `chatml.intel` included) win over the `module.function` fallback.
    if name in _REGISTRY:
        return _with_variants(_REGISTRY[name]), style or None
    if "." in name:
        return _user_module_format(name, where), style or None
    close = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.5)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    known = ", ".join(sorted(k for k in _REGISTRY if k not in ("pretokenized", "user_defined")))
    raise DataError(
        f"{where}: unknown dataset type `{type_spec}`.{hint} Known types: {known}; "
        "or a dict of field_* keys, or `module.function` for your own code."
    )


def _user_module_format(spec: str, where: str) -> Format:
    """`type: module.function`: the function takes (row, tokenizer, cfg) and returns rows, or is a builder."""
    module_name, _, fn_name = spec.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DataError(
            f"{where}: `type: {spec}` names module `{module_name}`, which cannot be imported ({exc}). "
            "Put the module next to where you run tuneforge or on PYTHONPATH."
        ) from None
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        raise DataError(f"{where}: module `{module_name}` has no function `{fn_name}` (from `type: {spec}`).")
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        source = spec
    version = "user-" + hashlib.sha256(source.encode()).hexdigest()[:16]
    return Format(spec, _wrap_user_function(fn), version)


def _wrap_user_function(fn: Callable) -> FormatBuilder:
    def builder(ctx: FormatContext) -> RowFn:
        def row_fn(row: dict[str, Any]) -> list[dict[str, Any]]:
            out = fn(row, ctx.tokenizer, ctx.cfg)
            rows = out if isinstance(out, list) else [out]
            for r in rows:
                if not isinstance(r, dict) or "input_ids" not in r:
                    raise RowError(f"user format must return a dict (or list of dicts) with input_ids; got {type(r).__name__}")
                r.setdefault("labels", list(r["input_ids"]))
            return rows

        return row_fn

    return builder
