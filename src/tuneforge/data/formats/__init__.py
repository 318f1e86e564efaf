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
from typing import Any

from tuneforge.config.data import UserDefinedFormat
from tuneforge.errors import DataError

# Re-exported: the package's API (the formats themselves import them from .registry).
from .registry import (  # noqa: F401
    _REGISTRY,
    IGNORE_INDEX,
    Format,
    FormatBuilder,
    FormatContext,
    RowError,
    RowFn,
    method_family,
    register,
    with_variants,
)


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
        return with_variants(_REGISTRY["pretokenized"]), None
    if isinstance(type_spec, UserDefinedFormat):
        return with_variants(_REGISTRY["user_defined"]), None
    name, _, style = type_spec.partition(":")
    # Registered names (dotted ones such as `chatml.intel` included) win over the `module.function` fallback.
    if name in _REGISTRY:
        return with_variants(_REGISTRY[name]), style or None
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
