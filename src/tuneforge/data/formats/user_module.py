"""`type: module.function`: the user's own format. The function takes (row, tokenizer, cfg) and returns a
row dict with input_ids (and labels), or a list of them.

The module is imported from the working directory, the config's folder or sys.path (the `tuneforge`
command finds modules next to the config without PYTHONPATH). Its cache version hashes the module and
the local code next to it (its package, or the .py files of its folder): editing a helper it imports
prepares the data again. A call that exits or raises names the row (the pipeline adds dataset and row).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tuneforge.errors import DataError
from tuneforge.user_code import contained, describe, import_user_module, local_sources_digest

from .registry import Format, FormatBuilder, FormatContext, RowError, RowFn


def user_module_format(spec: str, where: str, search: list[str] | None = None) -> Format:
    module_name, _, fn_name = spec.rpartition(".")
    try:
        module = import_user_module(module_name, search)
    except ImportError as exc:
        raise DataError(
            f"{where}: `type: {spec}` names module `{module_name}`, which cannot be imported ({exc}). "
            "Put the module next to the config file or where you run tuneforge, or on PYTHONPATH."
        ) from None
    except Exception as exc:  # noqa: BLE001 - the module's top-level code may raise anything
        raise DataError(f"{where}: importing module `{module_name}` for `type: {spec}` {describe(exc)}") from None
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        raise DataError(f"{where}: module `{module_name}` has no function `{fn_name}` (from `type: {spec}`).")
    version = "user-" + (local_sources_digest(module) or spec)
    return Format(spec, _wrap_user_function(spec, fn), version)


def _wrap_user_function(spec: str, fn: Callable) -> FormatBuilder:
    def builder(ctx: FormatContext) -> RowFn:
        def row_fn(row: dict[str, Any]) -> list[dict[str, Any]]:
            try:
                with contained():
                    out = fn(row, ctx.tokenizer, ctx.cfg)
            except (DataError, RecursionError, MemoryError):
                raise
            except Exception as exc:  # noqa: BLE001 - the user's code may raise anything
                raise RowError(f"format function `{spec}` {describe(exc)}") from None
            rows = out if isinstance(out, list) else [out]
            for r in rows:
                if not isinstance(r, dict) or "input_ids" not in r:
                    raise RowError(f"user format must return a dict (or list of dicts) with input_ids; got {type(r).__name__}")
                r.setdefault("labels", list(r["input_ids"]))
            return rows

        return row_fn

    return builder
