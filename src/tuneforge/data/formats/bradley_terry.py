"""`bradley_terry.chat_template`: pairs for an outcome reward model (`reward_model: true`).

Rows `{system?, input, chosen, rejected, margin?}`. Each answer is rendered as a single-turn chat
(system, user `input`, assistant answer) with the configured chat template; the model scores the last
token of each rendered conversation. Output columns: `chosen_input_ids`, `chosen_labels`,
`rejected_input_ids`, `rejected_labels` (labels mark the answer, for `preprocess --debug`) and `margin`
(0 when the row has none: the Bradley-Terry loss is -log sigmoid(r_chosen - r_rejected - margin)).
Every other preference type works for reward models too.
"""

from __future__ import annotations

from typing import Any

from tuneforge import chat_templates

from ..masking import ChatMasker
from .alpaca import text_field
from .chat_template import dataset_template
from .preference import VERSION, require_family
from .registry import FormatContext, RowError, RowFn, register


@register("bradley_terry.chat_template", version=VERSION)
def build(ctx: FormatContext) -> RowFn:
    require_family(ctx, "bradley_terry.chat_template")
    cfg, tokenizer = ctx.cfg, ctx.tokenizer
    template, name = dataset_template(cfg, ctx.entry, tokenizer)
    eot = cfg.eot_tokens if cfg.eot_tokens is not None else chat_templates.eot_tokens_for(name or template, tokenizer)
    masker = ChatMasker(tokenizer, template, eot_tokens=eot, train_on_eos="turn",
                        template_kwargs=cfg.chat_template_kwargs)

    def encode(row: dict[str, Any], answer_key: str) -> tuple[list[int], list[int]]:
        messages = [{"role": "user", "content": text_field(row, "input")},
                    {"role": "assistant", "content": text_field(row, answer_key)}]
        if row.get("system"):
            messages.insert(0, {"role": "system", "content": text_field(row, "system")})
        encoded = masker.encode(messages, [False] * (len(messages) - 1) + [True])
        return encoded.input_ids, encoded.labels

    def row_fn(row: dict[str, Any]) -> list[dict[str, Any]]:
        margin = row.get("margin")
        if margin is not None and not isinstance(margin, int | float):
            raise RowError(f"field `margin` must be a number, got {margin!r}")
        (ci, cl), (ri, rl) = encode(row, "chosen"), encode(row, "rejected")
        return [{"chosen_input_ids": ci, "chosen_labels": cl, "rejected_input_ids": ri, "rejected_labels": rl,
                 "margin": float(margin or 0.0)}]

    return row_fn
