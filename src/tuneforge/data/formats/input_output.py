"""Format `input_output` (template-free): `{"segments": [{"text": ..., "label": true|false}, ...]}`.

Each segment is tokenized on its own with add_special_tokens=False and the ids are concatenated as-is:
no BOS, EOS, space or template is added, so the row holds exactly the tokens the user wrote (special
tokens written in the text, like `</s>`, are recognized). Segments with `label: false` get -100 unless
`train_on_inputs` is true.
"""

from __future__ import annotations

from typing import Any

from .alpaca import encode, present_keys
from .registry import IGNORE_INDEX, FormatContext, RowError, RowFn, register


def _segments(row: dict[str, Any]) -> list[tuple[str, bool]]:
    segments = row.get("segments")
    if segments is None:
        raise RowError(f"missing field `segments` (the row has: {present_keys(row)})")
    if not isinstance(segments, list) or not segments:
        raise RowError(f"`segments` must be a non-empty list of {{text, label}} objects, got {segments!r:.60}")
    out = []
    for i, seg in enumerate(segments):
        if not isinstance(seg, dict):
            raise RowError(f"segments[{i}] must be an object with `text` and `label`, got {type(seg).__name__}")
        text, label = seg.get("text"), seg.get("label")
        if not isinstance(text, str):
            raise RowError(f"segments[{i}].text must be text, got {type(text).__name__}")
        if not isinstance(label, bool):
            raise RowError(f"segments[{i}].label must be true or false, got {label!r}")
        out.append((text, label))
    return out


@register("input_output", version="1")
def build(ctx: FormatContext) -> RowFn:
    tokenizer = ctx.tokenizer
    train_all = ctx.cfg.train_on_inputs

    def row_fn(row: dict[str, Any]) -> list[dict[str, Any]]:
        input_ids: list[int] = []
        labels: list[int] = []
        for text, label in _segments(row):
            ids = encode(tokenizer, text)
            input_ids += ids
            labels += ids if (label or train_all) else [IGNORE_INDEX] * len(ids)
        if not input_ids:
            raise RowError("all segments are empty text")
        return [{"input_ids": input_ids, "labels": labels}]

    return row_fn
