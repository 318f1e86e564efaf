"""The format registry itself: what a format is, `register`, and the method variants of a `type:`.

Format modules import from here (never from the package `__init__`, which imports them to register them),
so that no format module and the package need each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tuneforge.config.data import DatasetEntry
from tuneforge.config.methods import method_facts
from tuneforge.config.schema import Config

from ..rows import IGNORE_INDEX, RowError

__all__ = ["IGNORE_INDEX", "Format", "FormatBuilder", "FormatContext", "RowError", "RowFn", "method_family",
           "register", "with_variants"]

RowFn = Callable[[dict[str, Any]], list[dict[str, Any]]]


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
    rows = method_facts(cfg).rows  # config/methods.py: what each method's data is
    return None if rows in ("sft", "prompts") else rows


def with_variants(fmt: Format) -> Format:
    """`fmt`, or a format that picks its method variant from the config when one is registered."""
    variants = _VARIANTS.get(fmt.name)
    if not variants:
        return fmt

    def builder(ctx: FormatContext) -> RowFn:
        return variants.get(method_family(ctx.cfg) or "", fmt).builder(ctx)

    version = ";".join([fmt.version, *(f"{k}={v.version}" for k, v in sorted(variants.items()))])
    return Format(fmt.name, builder, version)
