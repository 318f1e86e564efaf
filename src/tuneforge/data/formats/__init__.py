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
        ebft_strided,
        input_output,
        kto,
        preference,
        pretokenized,
        stepwise,
        user_defined,
    )


def resolve(type_spec: str | UserDefinedFormat | None, where: str = "datasets",
            search: list[str] | None = None) -> tuple[Format, str | None]:
    """Find the format for a `type:` value; returns it and the optional `:style` suffix. `search`: folders
    (the config's) where a `module.function` type's module may be."""
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
        from .user_module import user_module_format

        return user_module_format(name, where, search), style or None
    close = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.5)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    known = ", ".join(sorted(k for k in _REGISTRY if k not in ("pretokenized", "user_defined")))
    raise DataError(
        f"{where}: unknown dataset type `{type_spec}`.{hint} Known types: {known}; "
        "or a dict of field_* keys, or `module.function` for your own code."
    )
