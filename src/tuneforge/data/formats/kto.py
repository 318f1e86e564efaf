"""KTO formats: unpaired completions, each labelled desirable (true) or undesirable (false).

Output rows: `input_ids`, `labels` (-100 on the prompt, the completion's ids after it), `label` (bool)
and `prompt_len` (tokens before the completion). The KTO objective pairs each prompt with another row's
completion to estimate its reference point; `prompt_len` is where it cuts.

Types (Axolotl's names), all with a boolean `label`:
  chatml.argilla       {system?, instruction, completion}
  chatml.argilla_chat  {completion: [user, assistant]}
  chatml.intel         {system?, question, completion}
  chatml.prompt_pairs / chatml.ultra   {system?, prompt, completion}
  llama3.*             the same with the Llama 3 template
  a dict type          field_prompt, field_system, field_completion, field_label, prompt_format ("{prompt}",
                       may use {system}), completion_format ("{completion}")
  no type              rows already {prompt, completion, label}: strings (tokenized as TRL does) or
                       conversations (the configured chat template)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tuneforge.config.data import UserDefinedFormat

from .alpaca import present_keys, text_field
from .preference import (
    FIXED_TEMPLATES,
    VERSION,
    ChatCompletions,
    Messages,
    PlainCompletions,
    Sequence,
    answer_text,
    configured_template,
    conversation,
    fixed_template,
    formatted,
    require_family,
    user_prompt,
    user_prompt_text,
    with_system,
)
from .registry import IGNORE_INDEX, FormatContext, RowError, RowFn, register

# row -> (prompt messages, completion text)
ChatOneFn = Callable[[dict[str, Any]], tuple[Messages, str]]


def desirable(row: dict[str, Any], key: str = "label") -> bool:
    value = row.get(key)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if value is None:
        raise RowError(f"missing field `{key}`: KTO rows need a boolean label (the row has: {present_keys(row)})")
    raise RowError(f"field `{key}` must be true or false, got {value!r}")


def kto_row(seq: Sequence, label: bool) -> dict[str, Any]:
    ids, labels = seq
    prompt_len = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
    return {"input_ids": ids, "labels": labels, "label": label, "prompt_len": prompt_len}


def _completion(row: dict[str, Any]) -> str:
    if row.get("completion") is None:
        raise RowError(f"missing field `completion` (the row has: {present_keys(row)})")
    return answer_text(row["completion"], "completion")


def _keyed(prompt_key: str) -> ChatOneFn:
    return lambda row: (user_prompt(row, prompt_key), _completion(row))


def _argilla_chat(row):
    messages = conversation(row.get("completion"), "completion")
    history = [{"role": m.get("role"), "content": m.get("content")} for m in messages[:-1]]
    if not history:
        raise RowError("`completion` holds only the answer; argilla_chat rows hold [user message, answer]")
    return with_system(row, history), answer_text(messages, "completion")


KTO_TYPES: dict[str, ChatOneFn] = {
    "argilla": _keyed("instruction"),
    "argilla_chat": _argilla_chat,
    "intel": _keyed("question"),
    "prompt_pairs": _keyed("prompt"),
    "ultra": _keyed("prompt"),
}


def _fixed_builder(template: str, kind: str) -> Callable[[FormatContext], RowFn]:
    extract = KTO_TYPES[kind]

    def build(ctx: FormatContext) -> RowFn:
        encode = fixed_template(ctx, template)

        def row_fn(row: dict[str, Any]) -> list[dict[str, Any]]:
            prompt, completion = extract(row)
            return [kto_row(encode(prompt, completion), desirable(row))]

        return row_fn

    return build


for _template in FIXED_TEMPLATES:
    for _kind in KTO_TYPES:
        register(f"{_template}.{_kind}", version=VERSION, method="kto")(_fixed_builder(_template, _kind))


@register("pretokenized", version=VERSION, method="kto")
def build_prompt_completion(ctx: FormatContext) -> RowFn:
    require_family(ctx, "prompt/completion/label rows", "kto")
    plain = PlainCompletions(ctx.tokenizer, f"dataset {ctx.entry.path}")
    chat: list[ChatCompletions] = []

    def row_fn(row: dict[str, Any]) -> list[dict[str, Any]]:
        prompt, completion = row.get("prompt"), _completion(row)
        label = desirable(row)
        if isinstance(prompt, str) and isinstance(row["completion"], str):
            (seq,) = plain.encode(prompt, [completion])
            return [kto_row(seq, label)]
        if prompt is None:
            history, completion = _argilla_chat(row)
        else:
            history = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else conversation(prompt, "prompt")
        if not chat:
            chat.append(configured_template(ctx))
        return [kto_row(chat[0](history, completion), label)]

    return row_fn


@register("user_defined", version=VERSION, method="kto")
def build_user_defined(ctx: FormatContext) -> RowFn:
    spec = ctx.entry.type
    assert isinstance(spec, UserDefinedFormat)
    where = f"dataset {ctx.entry.path}"
    plain = PlainCompletions(ctx.tokenizer, where)
    f_completion, f_label = spec.field_completion or "completion", spec.field_label or "label"

    def row_fn(row: dict[str, Any]) -> list[dict[str, Any]]:
        prompt = user_prompt_text(spec, row, where)
        completion = formatted(spec.completion_format, "completion", text_field(row, f_completion), where,
                               "completion_format")
        (seq,) = plain.encode(prompt, [completion])
        return [kto_row(seq, desirable(row, f_label))]

    return row_fn
