"""Rows that are already tokenized: `input_ids` (and optional `labels`) are kept verbatim."""

from __future__ import annotations

from typing import Any

from .registry import IGNORE_INDEX, FormatContext, RowError, RowFn, register


@register("pretokenized", version="1")
def build(ctx: FormatContext) -> RowFn:
    vocab = len(ctx.tokenizer)

    def row_fn(row: dict[str, Any]) -> list[dict[str, Any]]:
        ids = row.get("input_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
            raise RowError("pre-tokenized rows (no `type:`) need `input_ids`: a non-empty list of integers")
        bad = [t for t in ids if t < 0 or t >= vocab]
        if bad:
            raise RowError(f"input_ids holds {bad[0]}, outside the tokenizer's vocabulary (0..{vocab - 1})")
        labels = row.get("labels")
        if labels is None:
            labels = list(ids)
        elif not isinstance(labels, list) or len(labels) != len(ids):
            raise RowError(f"`labels` must be a list as long as input_ids ({len(ids)})")
        elif any(not isinstance(t, int) or (t != IGNORE_INDEX and t < 0) for t in labels):
            raise RowError("`labels` must hold token ids or -100")
        return [{"input_ids": list(ids), "labels": list(labels)}]

    return row_fn
