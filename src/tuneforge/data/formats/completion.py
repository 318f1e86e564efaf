"""Format `completion`: raw text, every token trained (continued pretraining on a corpus).

The text comes from the column `text`, or the one named by the entry's `field`. The row is the
tokenizer's BOS (when it adds one) + the text's tokens + EOS, all trained.

A text longer than `sequence_len` tokens is not dropped: its full token sequence (BOS ... EOS) is cut
into consecutive, non-overlapping chunks of `sequence_len` tokens (the last one shorter), and each
chunk becomes its own row. Only the first chunk starts with BOS and only the last ends with EOS, so
the chunks put back together are exactly the tokens of the whole text. A last chunk of a single token
has nothing to predict and is dropped later by the pipeline's "no trained tokens" rule.
"""

from __future__ import annotations

from typing import Any

from .alpaca import bos_ids, encode, eos_ids, text_field
from .registry import FormatContext, RowFn, register


@register("completion", version="1")
def build(ctx: FormatContext) -> RowFn:
    tokenizer = ctx.tokenizer
    field = ctx.entry.field or "text"
    prefix, suffix = bos_ids(tokenizer), eos_ids(tokenizer, f"dataset {ctx.entry.path}")
    chunk = ctx.cfg.sequence_len

    def row_fn(row: dict[str, Any]) -> list[dict[str, Any]]:
        ids = prefix + encode(tokenizer, text_field(row, field, allow_empty=False)) + suffix
        return [{"input_ids": ids[i : i + chunk], "labels": ids[i : i + chunk]} for i in range(0, len(ids), chunk)]

    return row_fn
