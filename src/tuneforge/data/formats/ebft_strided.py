"""EBFT strided-mode data (`rl: ebft`, `ebft.mode: strided`) from prompt/completion rows, under Axolotl's names.

`ebft_strided_structured.transform`: rows `{prompt, completion}` (also `input`/`question`/`instruction` for
the prompt and `output`/`answer`/`response`/`ground_truth` for the completion). BOS (when the tokenizer
adds one) + prompt + completion + EOS, tokenized apart so the boundary is exact; a prompt given as chat
messages is rendered with the chat template and its generation prompt. `ebft_strided_chat.transform`:
conversations exactly as `type: chat_template` renders and masks them (same keys).

Both add `prompt_length`, the tokens before the first trained one: strided blocks start after it
(`ebft.min_completion_prefix` tokens later), and the cross-entropy of `ebft.ce_coef` covers the trained
(completion) tokens. Raw text needs no transform: `type: completion` rows are documents.
"""

from __future__ import annotations

from typing import Any

from .alpaca import bos_ids, encode, eos_ids, present_keys
from .chat_template import build as chat_rows
from .registry import IGNORE_INDEX, FormatContext, RowError, RowFn, register

PROMPT_KEYS = ("prompt", "input", "question", "instruction")
COMPLETION_KEYS = ("completion", "output", "answer", "response", "ground_truth")


def first_field(row: dict[str, Any], keys: tuple[str, ...], what: str) -> Any:
    for key in keys:
        if row.get(key) is not None:
            return row[key]
    raise RowError(f"no {what} field (looked for {', '.join(keys)}; the row has: {present_keys(row)})")


def with_prompt_length(row: dict[str, Any]) -> dict[str, Any]:
    labels = row["labels"]
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
    if first is None:
        raise RowError("no completion token: every token is prompt")
    return {**row, "prompt_length": first}


@register("ebft_strided_structured.transform", version="1")
def build_structured(ctx: FormatContext) -> RowFn:
    tokenizer = ctx.tokenizer
    prefix, suffix = bos_ids(tokenizer), eos_ids(tokenizer, f"dataset {ctx.entry.path}")

    def prompt_ids(prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            return encode(tokenizer, prompt)
        if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
            if tokenizer.chat_template is None:
                raise RowError("the prompt is a list of chat messages but the tokenizer has no chat template; set "
                               "`chat_template:` (e.g. chatml) or give a plain-text prompt")
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            return encode(tokenizer, text)
        raise RowError(f"the prompt must be text or a list of {{role, content}} messages, not {type(prompt).__name__}")

    def row_fn(row: dict[str, Any]) -> list[dict[str, Any]]:
        prompt = prefix + prompt_ids(first_field(row, PROMPT_KEYS, "prompt"))
        completion = first_field(row, COMPLETION_KEYS, "completion")
        if not isinstance(completion, str) or not completion.strip():
            raise RowError("the completion must be non-empty text")
        answer = encode(tokenizer, completion) + suffix
        return [{"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer,
                 "prompt_length": len(prompt)}]

    return row_fn


@register("ebft_strided_chat.transform", version="1")
def build_chat(ctx: FormatContext) -> RowFn:
    rows = chat_rows(ctx)

    def row_fn(row: dict[str, Any]) -> list[dict[str, Any]]:
        return [with_prompt_length(r) for r in rows(row)]

    return row_fn
