"""One reply: the prompt rendered as training rendered it, generation that stops at the end-of-turn
token(s), and the text streamed as it is generated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tuneforge.chat_templates import stop_token_ids
from tuneforge.errors import TuneforgeError


def render(tokenizer, messages: list[dict[str, str]], chat_template_kwargs: dict | None = None) -> list[int]:
    """Prompt token ids: the chat template with a generation prompt, or the raw text when there is none."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **(chat_template_kwargs or {})
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    # No template: a completion model continues the text as given.
    text = "\n".join(m["content"] for m in messages)
    return tokenizer(text, add_special_tokens=True)["input_ids"]


class _TextStream:
    """A transformers streamer that hands decoded text to `on_text` as tokens arrive.

    The whole completion is decoded again at each step and only the new suffix is emitted, so tokens that
    merge with their neighbours (byte-level pieces, multi-byte characters) come out right.
    """

    def __init__(self, tokenizer, on_text: Callable[[str], None], stop_ids: list[int]):
        self.tokenizer, self.on_text, self.stop = tokenizer, on_text, set(stop_ids)
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        self.ids.extend(t for t in value.reshape(-1).tolist() if t not in self.stop)
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for its next byte
        if len(text) > self.sent:
            self.on_text(text[self.sent:])
            self.sent = len(text)


def generate(
    model,
    tokenizer,
    messages: list[dict[str, str]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_ids: list[int] | None = None,
    on_text: Callable[[str], None] | None = None,
    chat_template_kwargs: dict | None = None,
) -> str:
    """The assistant's reply to `messages` (greedy when temperature is 0), without the stop token."""
    import torch

    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or max_new_tokens < 1:
        raise TuneforgeError("sampling: need temperature >= 0, 0 < top_p <= 1, top_k >= 0, max_new_tokens >= 1.")
    stop = stop_ids or stop_token_ids(tokenizer)
    prompt = render(tokenizer, messages, chat_template_kwargs)
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt], device=device)
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": stop,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0],
        "do_sample": temperature > 0,
    }
    if temperature > 0:  # greedy decoding (do_sample=False) ignores these, and the model's own defaults
        options.update(temperature=temperature, top_p=top_p, top_k=top_k)
    streamer = _TextStream(tokenizer, on_text, stop) if on_text else None
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **options
        )
    new = out[0, len(prompt):].tolist()
    while new and new[-1] in stop:
        new.pop()
    return tokenizer.decode(new, skip_special_tokens=True)
