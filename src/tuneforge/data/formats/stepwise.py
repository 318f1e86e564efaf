"""`stepwise_supervised`: step-labelled reasoning for a process reward model (`process_reward_model: true`).

Rows `{prompt: str, completions: [step, ...], labels: [bool, ...]}`. As TRL's PRM trainer does: the
prompt is tokenized (BOS first when the tokenizer has one), each step is tokenized and followed by the
`step_separator` tokens (default "\\n"), and the step's label (0/1) sits on its last token - the end of
its separator; every other token is -100. With `train_on_last_step_only` only the final step is labelled.
The completion is cut to `max_completion_length` (dataset key, or `trl.max_completion_length`).

Labels here are token classes at the token itself (not next-token targets): the process reward model is
a token classifier (`AutoModelForTokenClassification`, `num_labels: 2`).
"""

from __future__ import annotations

from typing import Any

from tuneforge.errors import DataError

from .alpaca import present_keys, text_field
from .preference import VERSION, require_family
from .registry import IGNORE_INDEX, FormatContext, RowError, RowFn, register


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


@register("stepwise_supervised", version=VERSION)
def build(ctx: FormatContext) -> RowFn:
    require_family(ctx, "stepwise_supervised", "stepwise")
    entry, tokenizer = ctx.entry, ctx.tokenizer
    separator = entry.step_separator if entry.step_separator is not None else "\n"
    sep_ids = _ids(tokenizer, separator)
    if not sep_ids:
        raise DataError(f"dataset {entry.path}: step_separator {separator!r} encodes to no token; use e.g. \"\\n\".")
    trl = ctx.cfg.trl
    max_completion = entry.max_completion_length or (trl.max_completion_length if trl else None)
    last_only = bool(entry.train_on_last_step_only)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    def row_fn(row: dict[str, Any]) -> list[dict[str, Any]]:
        prompt = bos + _ids(tokenizer, text_field(row, "prompt"))
        steps, flags = row.get("completions"), row.get("labels")
        if not isinstance(steps, list | tuple) or not steps or not all(isinstance(s, str) for s in steps):
            raise RowError(f"`completions` must be a non-empty list of step texts (the row has: {present_keys(row)})")
        if not isinstance(flags, list | tuple) or len(flags) != len(steps):
            raise RowError(f"`labels` must be a list with one boolean per step ({len(steps)} steps)")
        if not all(isinstance(f, bool | int) and int(f) in (0, 1) for f in flags):
            raise RowError(f"`labels` must hold booleans, got {list(flags)!r}")
        ids: list[int] = []
        labels: list[int] = []
        for k, (step, flag) in enumerate(zip(steps, flags, strict=True)):
            step_ids = _ids(tokenizer, step) + sep_ids
            labelled = not last_only or k == len(steps) - 1
            ids += step_ids
            labels += [IGNORE_INDEX] * (len(step_ids) - 1) + [int(flag) if labelled else IGNORE_INDEX]
        if max_completion is not None:
            ids, labels = ids[:max_completion], labels[:max_completion]
        return [{"input_ids": prompt + ids, "labels": [IGNORE_INDEX] * len(prompt) + labels}]

    return row_fn
