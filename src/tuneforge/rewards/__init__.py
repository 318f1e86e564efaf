"""Ready reward functions for `trl.reward_funcs` (e.g. `tuneforge.rewards.numeric_answer`).

Each follows the calling convention of `tuneforge.methods.rewards`: keyword arguments `completions`
(strings, or `[{"role": "assistant", "content": ...}]` for chat prompts), `completion_ids`, and the
dataset's extra columns (`answer`, ...); one float per completion.

- `exact_match`: 1 if the extracted answer equals the `answer` column (whitespace and case ignored).
- `numeric_answer`: 1 if the last number in the answer part equals `answer` numerically (GSM8K style;
  `1,000`, `$5`, `3.50` and `7/2` are understood); 0 otherwise.
- `think_format`: 1 if the completion is `<think>...</think>` followed by a non-empty answer.
- `regex_match`: 1 if the completion matches the row's `pattern` column (a regular expression).
- `length_penalty`: DAPO's soft overlong punishment: 0 up to `max_completion_length - cache` tokens,
  then falling linearly to -1 at `max_completion_length` (both from the row or defaults 256 / 64).

The "answer part" is what follows `</think>` when present, else the text inside `\\boxed{...}` or after
`####` or `answer:` when present, else the whole completion.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def completion_text(c: Any) -> str:
    """The text of a completion: a string, or the content of the last message of a chat completion."""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c and isinstance(c[-1], dict):
        return str(c[-1].get("content", ""))
    return str(c)


def answer_part(text: str) -> str:
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        return boxed[-1]
    for marker in ("####", "answer:", "Answer:"):
        if marker in text:
            return text.rsplit(marker, 1)[1]
    return text


def parse_number(text: str) -> Fraction | None:
    """The last number in `text` as an exact fraction (None if there is none)."""
    found = _NUMBER.findall(text.replace("$", ""))
    if not found:
        return None
    s = found[-1].replace(",", "")
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _normalize(s: str) -> str:
    return " ".join(str(s).strip().lower().split()).rstrip(".")


def exact_match(completions, answer, **kwargs) -> list[float]:
    return [float(_normalize(answer_part(completion_text(c))) == _normalize(a))
            for c, a in zip(completions, answer, strict=True)]


def numeric_answer(completions, answer, **kwargs) -> list[float]:
    out = []
    for c, a in zip(completions, answer, strict=True):
        got, want = parse_number(answer_part(completion_text(c))), parse_number(str(a))
        out.append(float(got is not None and want is not None and got == want))
    return out


_THINK = re.compile(r"^\s*<think>.+?</think>\s*\S", re.S)


def think_format(completions, **kwargs) -> list[float]:
    return [float(bool(_THINK.match(completion_text(c)))) for c in completions]


def regex_match(completions, pattern, **kwargs) -> list[float]:
    return [float(re.search(p, completion_text(c), re.S) is not None)
            for c, p in zip(completions, pattern, strict=True)]


def length_penalty(completion_ids, max_completion_length=None, overlong_cache=None, **kwargs) -> list[float]:
    n = len(completion_ids)
    limits = max_completion_length if isinstance(max_completion_length, list) else [max_completion_length or 256] * n
    caches = overlong_cache if isinstance(overlong_cache, list) else [overlong_cache or 64] * n
    out = []
    for ids, limit, cache in zip(completion_ids, limits, caches, strict=True):
        start = limit - cache
        out.append(0.0 if len(ids) <= start else max(-1.0, (start - len(ids)) / cache))
    return out


__all__ = ["exact_match", "length_penalty", "numeric_answer", "regex_match", "think_format"]
