"""EBFT structured-mode prompt transforms (`rl: ebft`), under Axolotl's names: rows -> `prompt` + `ground_truth`.

These are prompt transforms (like GRPO's `type:` values, data/formats/grpo.py), not token formats: each
maps one source row to a dict with `prompt` (chat messages) and `ground_truth` (the reference answer
text whose features the samples are matched against), plus `remaining_turns` for multi-turn rows.

- `ebft_opencode.transform`: `{input, output}` (or `instruction`/`prompt` and `response`/`solution`) ->
  the input as one user message, the output as the ground truth.
- `ebft_reasoning.transform`: `{question|problem|prompt, answer|solution|response}`, with an optional
  `reasoning`/`thinking` trace that becomes `<think>\\n...\\n</think>\\n\\n` before the answer.
- `ebft_chat_multiturn.transform`: `messages` -> the turns before the first assistant turn as the
  prompt, that assistant turn as the ground truth, every later message as `remaining_turns`.
- `ebft_chat_multiturn.transform_last_turn`: the turns before the last assistant turn as the prompt,
  the last assistant turn as the ground truth (no remaining turns).
- `ebft_chat_multiturn.transform_all_turns`: one prompt per assistant turn, each with the conversation
  before that turn as the prompt and the turn as the ground truth (a list of rows from one row).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tuneforge.errors import DataError

Mapper = Callable[[dict[str, Any]], dict[str, Any] | list[dict[str, Any]]]


def _pick(row: dict[str, Any], keys: tuple[str, ...], what: str) -> Any:
    for key in keys:
        if row.get(key) is not None:
            return row[key]
    have = ", ".join(sorted(k for k, v in row.items() if v is not None)) or "nothing"
    raise DataError(f"no {what} field (looked for {', '.join(keys)}; the row has: {have})")


def _user(text: Any, system: Any = None) -> list[dict[str, str]]:
    head = [{"role": "system", "content": str(system)}] if system else []
    return head + [{"role": "user", "content": str(text)}]


def opencode(cfg, style: str | None) -> Mapper:
    def mapper(row: dict[str, Any]) -> dict[str, Any]:
        prompt = _pick(row, ("input", "instruction", "prompt"), "input")
        return {"prompt": _user(prompt, row.get("system")),
                "ground_truth": str(_pick(row, ("output", "response", "solution"), "output"))}

    return mapper


def reasoning(cfg, style: str | None) -> Mapper:
    def mapper(row: dict[str, Any]) -> dict[str, Any]:
        question = _pick(row, ("question", "problem", "prompt"), "question")
        answer = str(_pick(row, ("answer", "solution", "response"), "answer"))
        trace = row.get("reasoning") or row.get("thinking")
        truth = f"<think>\n{trace}\n</think>\n\n{answer}" if trace else answer
        return {"prompt": _user(question, row.get("system")), "ground_truth": truth}

    return mapper


def _messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    messages = _pick(row, ("messages", "conversations"), "messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise DataError("`messages` must be a list of {role, content} messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _assistant_turns(messages: list[dict[str, Any]]) -> list[int]:
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns or turns[0] == 0:
        raise DataError("the conversation needs an assistant turn after at least one other message")
    return turns


def multiturn(cfg, style: str | None) -> Mapper:
    def mapper(row: dict[str, Any]) -> dict[str, Any]:
        messages = _messages(row)
        first = _assistant_turns(messages)[0]
        return {"prompt": messages[:first], "ground_truth": str(messages[first]["content"]),
                "remaining_turns": messages[first + 1:]}

    return mapper


def multiturn_last(cfg, style: str | None) -> Mapper:
    def mapper(row: dict[str, Any]) -> dict[str, Any]:
        messages = _messages(row)
        last = _assistant_turns(messages)[-1]
        return {"prompt": messages[:last], "ground_truth": str(messages[last]["content"])}

    return mapper


def multiturn_all(cfg, style: str | None) -> Mapper:
    def mapper(row: dict[str, Any]) -> list[dict[str, Any]]:
        messages = _messages(row)
        return [{"prompt": messages[:turn], "ground_truth": str(messages[turn]["content"])}
                for turn in _assistant_turns(messages)]

    return mapper


# `type:` name -> factory(cfg, style) -> row mapper; GRPO's prompt pipeline looks them up by name.
PROMPT_TRANSFORMS: dict[str, Callable[[Any, str | None], Mapper]] = {
    "ebft_opencode.transform": opencode,
    "ebft_reasoning.transform": reasoning,
    "ebft_chat_multiturn.transform": multiturn,
    "ebft_chat_multiturn.transform_last_turn": multiturn_last,
    "ebft_chat_multiturn.transform_all_turns": multiturn_all,
}
