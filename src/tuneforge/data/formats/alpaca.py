"""Instruction formats: `alpaca` (with prompt styles) and the simple types `oasst`, `gpteacher`, `jeopardy`.

A row becomes a prompt text (system line + instruction + optional input) and a response text. The two
are tokenized separately, without special tokens, and concatenated: the prompt/response boundary in
the labels is then exact, and the prompt tokens are the ones the model sees at inference, when the
prompt is tokenized alone and the answer is generated after it. The tokenizer's BOS (if it adds one)
goes first; the response is closed by the style's end marker (the tokenizer's EOS for the plain
styles). Prompt tokens get -100 unless the top-level `train_on_inputs` is true.

`type: alpaca:<style>` picks the prompt style (see STYLES). The helpers below (`text_field`,
`bos_ids`, `end_ids`, `encode_pair`) are shared with the user-defined and completion formats.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tuneforge.errors import DataError

from .registry import IGNORE_INDEX, FormatContext, RowError, RowFn, register

log = logging.getLogger("tuneforge")

# The Stanford Alpaca prompt: models trained on it expect these exact words.
SYSTEM_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
SYSTEM_NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


@dataclass(frozen=True)
class PromptStyle:
    system: str  # wraps the system line; `{system}` is replaced
    turn: str  # the prompt when the row has an input: `{instruction}`, `{input}`
    turn_no_input: str  # the prompt when it has none: `{instruction}`
    end: str | None  # text closing the response; None means the tokenizer's EOS token


STYLES: dict[str, PromptStyle] = {
    "instruct": PromptStyle(
        "{system}\n\n",
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "### Instruction:\n{instruction}\n\n### Response:\n",
        None,
    ),
    "chat": PromptStyle("SYSTEM: {system}\n", "USER: {instruction}\n{input}\nASSISTANT:", "USER: {instruction}\nASSISTANT:", None),
    "chatml": PromptStyle(
        "<|im_start|>system\n{system}<|im_end|>\n",
        "<|im_start|>user\n{instruction}\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
        "<|im_end|>",
    ),
    "llama3": PromptStyle(
        "<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        "<|start_header_id|>user<|end_header_id|>\n\n{instruction}\n\n{input}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|start_header_id|>user<|end_header_id|>\n\n{instruction}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>",
    ),
    "phi": PromptStyle(
        "<|system|>\n{system}<|end|>\n",
        "<|user|>\n{instruction}\n{input}<|end|>\n<|assistant|>\n",
        "<|user|>\n{instruction}<|end|>\n<|assistant|>\n",
        "<|end|>",
    ),
}


def style_for(ctx: FormatContext) -> PromptStyle:
    name = ctx.style or "instruct"
    if name not in STYLES:
        raise DataError(
            f"dataset {ctx.entry.path}: unknown prompt style `{ctx.style}` in `type: {ctx.entry.type}`. "
            f"Known styles: {', '.join(STYLES)}."
        )
    return STYLES[name]


# ---------------------------------------------------------------- shared row and token helpers
def present_keys(row: dict[str, Any]) -> str:
    # Columns of other rows appear as None in this row; they are not "there" for the user.
    return ", ".join(sorted(k for k, v in row.items() if v is not None)) or "nothing"


def text_field(row: dict[str, Any], key: str, *, required: bool = True, allow_empty: bool = True) -> str:
    """The string in `row[key]`, with a RowError naming the field when it is missing, not text, or empty."""
    value = row.get(key)
    if value is None:
        if required:
            raise RowError(f"missing field `{key}` (the row has: {present_keys(row)})")
        return ""
    if not isinstance(value, str):
        raise RowError(f"field `{key}` must be text, got {type(value).__name__}: {str(value)[:60]!r}")
    if not allow_empty and not value.strip():
        raise RowError(f"field `{key}` is empty")
    return value


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` alone: no BOS/EOS (added special tokens written in the text are still recognized)."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def bos_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text on its own: its BOS when it adds one, else nothing."""
    plain = encode(tokenizer, "a")
    full = tokenizer("a", verbose=False)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def eos_ids(tokenizer, where: str) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise DataError(f"{where}: the tokenizer has no eos_token; set `special_tokens: {{eos_token: ...}}`.")
    return [tokenizer.eos_token_id]


def end_ids(tokenizer, style: PromptStyle, where: str) -> list[int]:
    """The ids that close a response: the style's end marker, or the tokenizer's EOS."""
    if style.end is None:
        return eos_ids(tokenizer, where)
    ids = encode(tokenizer, style.end)
    if len(ids) != 1:
        log.warning("%s: %s is not a single token for this tokenizer (%d tokens); generation may not stop on it. "
                    "Add it with `special_tokens` or `tokens`.", where, style.end, len(ids))
    return ids


def encode_pair(prefix: list[int], prompt: str, response: str, suffix: list[int], tokenizer,
                train_on_inputs: bool) -> dict[str, list[int]]:
    """prefix + prompt (masked unless train_on_inputs) + response + suffix (trained), tokenized apart."""
    prompt_ids = prefix + encode(tokenizer, prompt)
    response_ids = encode(tokenizer, response) + suffix
    prompt_labels = list(prompt_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)
    return {"input_ids": prompt_ids + response_ids, "labels": prompt_labels + response_ids}


# ---------------------------------------------------------------- the instruction formats
# Each type maps its row to (instruction, input, output); input may be "".
Fields = Callable[[dict[str, Any]], tuple[str, str, str]]


def build_instruction(ctx: FormatContext, fields: Fields, system_with_input: str, system_no_input: str) -> RowFn:
    style = style_for(ctx)
    tokenizer = ctx.tokenizer
    prefix = bos_ids(tokenizer)
    suffix = end_ids(tokenizer, style, f"dataset {ctx.entry.path}")
    train_on_inputs = ctx.cfg.train_on_inputs

    def row_fn(row: dict[str, Any]) -> list[dict[str, Any]]:
        instruction, inp, output = fields(row)
        if inp.strip():
            prompt = style.system.format(system=system_with_input) + style.turn.format(instruction=instruction, input=inp)
        else:
            prompt = style.system.format(system=system_no_input) + style.turn_no_input.format(instruction=instruction)
        return [encode_pair(prefix, prompt, output, suffix, tokenizer, train_on_inputs)]

    return row_fn


@register("alpaca", version="1")
def build_alpaca(ctx: FormatContext) -> RowFn:
    def fields(row):
        return (text_field(row, "instruction"), text_field(row, "input", required=False),
                text_field(row, "output", allow_empty=False))

    return build_instruction(ctx, fields, SYSTEM_WITH_INPUT, SYSTEM_NO_INPUT)


@register("gpteacher", version="1")
def build_gpteacher(ctx: FormatContext) -> RowFn:
    def fields(row):
        return (text_field(row, "instruction"), text_field(row, "input", required=False),
                text_field(row, "response", allow_empty=False))

    return build_instruction(ctx, fields, SYSTEM_WITH_INPUT, SYSTEM_NO_INPUT)


@register("oasst", version="1")
def build_oasst(ctx: FormatContext) -> RowFn:
    def fields(row):
        return text_field(row, "INSTRUCTION"), "", text_field(row, "RESPONSE", allow_empty=False)

    return build_instruction(ctx, fields, SYSTEM_WITH_INPUT, SYSTEM_NO_INPUT)


JEOPARDY_SYSTEM = (
    "Below is a Jeopardy clue, with its category given as input. Answer the clue briefly, in the form of a question."
)


@register("jeopardy", version="1")
def build_jeopardy(ctx: FormatContext) -> RowFn:
    # Jeopardy answers are phrased as questions; the raw data holds only the bare answer.
    def fields(row):
        answer = text_field(row, "answer", allow_empty=False)
        return text_field(row, "question", allow_empty=False), text_field(row, "category"), f"what is {answer}"

    return build_instruction(ctx, fields, JEOPARDY_SYSTEM, JEOPARDY_SYSTEM)
