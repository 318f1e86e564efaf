"""Turn-level label masking for chat conversations, shared by every chat format.

A conversation is rendered once with its chat template. Each message is then located in the rendered text:
an assistant turn starts after the assistant header (the text the template appends for
`add_generation_prompt`, a per-template constant) and runs up to its end-of-turn token, so it covers
everything the assistant produces (answer, reasoning, rendered tool calls); any other turn is its content,
found by search from a moving cursor. The text after a turn and before the next one holds its terminators
(eot/eos tokens). The text is cut at those boundaries and tokenized piece by piece in one batched call, so
the prompt ends on the same token boundary that the model sees when it generates, and the labels are exact
per piece: trained turns' text and the terminators chosen by `train_on_eos` / `train_on_eot`, never a role
header, a BOS token or an untrained turn. Cutting does not depend on which turns are trained, so
`input_ids` are the same for every masking choice.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tuneforge import chat_templates

from .rows import IGNORE_INDEX, RowError

log = logging.getLogger("tuneforge")

TrainOn = Literal["turn", "all", "last", "none"]
_LEAD = "lead"  # a trained piece that starts with separator spaces (see _Span.lead_space)
_MODES = ("turn", "all", "last", "none")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_len: int | None = None  # tokens before the completion (encode_completion only)


@dataclass
class _Span:
    """Character offsets of one message in the rendered text."""

    anchor: int  # where the message's own text starts (its header, or its content)
    body_start: int  # first character that the turn trains
    content_end: int
    body_end: int = -1
    terms: list[tuple[int, int, str]] = field(default_factory=list)  # terminator tokens after the turn
    found: bool = True  # False: the message's text is not in the rendered text (empty, or dropped by the template)
    lead_space: bool = False  # body starts with separator spaces: tokens of those spaces alone are not trained
    detached: bool = False  # located out of turn order (a system prompt inside a later turn): owns no terminators
    trim_end: bool = False  # spaces between the reply's content and its terminator are the template's, not trained


def _spaces_before(text: str, pos: int, floor: int) -> int:
    """`pos` moved back over the spaces right before it, not past `floor`."""
    while pos > floor and text[pos - 1] == " ":
        pos -= 1
    return pos


def _find(text: str, content: str, start: int, end: int | None = None) -> tuple[int, int] | None:
    """Offsets of `content` in text[start:end]; templates that trim content are matched by the trimmed text."""
    pos = text.find(content, start, end)
    if pos >= 0:
        return pos, pos + len(content)
    stripped = content.strip()
    if stripped and stripped != content:
        pos = text.find(stripped, start, end)
        if pos >= 0:
            return pos, pos + len(stripped)
    return None


class ChatMasker:
    """Render conversations with one template and produce `input_ids` and exact `labels`.

    `train_on_eos` applies to the tokenizer's eos token, `train_on_eot` (default: `train_on_eos`) to
    `eot_tokens` (default: the template's own end-of-turn tokens); a token in both follows `train_on_eot`.
    Modes: turn (after each trained turn), all (after every turn), last (after the last trained turn), none.
    """

    def __init__(self, tokenizer, template: str, *, eot_tokens: Sequence[str] | None = None,
                 train_on_eos: TrainOn = "turn", train_on_eot: TrainOn | None = None,
                 template_kwargs: dict[str, Any] | None = None):
        for key, mode in (("train_on_eos", train_on_eos), ("train_on_eot", train_on_eot)):
            if mode is not None and mode not in _MODES:
                raise ValueError(f"{key}: `{mode}` is not one of {', '.join(_MODES)}.")
        self.tokenizer = tokenizer
        self.template = template
        if eot_tokens is None:
            eot_tokens = chat_templates.eot_tokens_for(template, tokenizer)
        self.eot_tokens = tuple(eot_tokens)
        self._rule: dict[str, str] = {}
        if tokenizer.eos_token:
            self._rule[tokenizer.eos_token] = train_on_eos
        for tok in self.eot_tokens:
            self._rule[tok] = train_on_eot or train_on_eos
        alternatives = sorted(self._rule, key=len, reverse=True)  # longest first: a token beats its prefixes
        self._terms = re.compile("|".join(map(re.escape, alternatives)) or "(?!)")
        # Special tokens are template variables, as in `apply_chat_template`; configured kwargs win.
        self._kwargs = {**tokenizer.special_tokens_map, **(template_kwargs or {})}
        self.header, self._header_short = self._assistant_header()
        self._direct = _backend_is_plain(tokenizer)
        self._added_ids = frozenset(getattr(tokenizer, "added_tokens_decoder", {}))
        self._nl_after_text, self._nl_after_special = self._piece_modes()
        self._warned_no_terminator = False

    # ------------------------------------------------------------------ public
    def render(self, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template(
                [messages], tools=tools, chat_template=self.template,
                add_generation_prompt=add_generation_prompt, **self._kwargs,
            )
        except Exception as exc:  # a template error is about this conversation's shape, not our code
            raise RowError(f"the chat template failed on this conversation: {type(exc).__name__}: {exc}") from None
        return rendered[0]

    def encode(self, messages: list[dict], train: Sequence[bool], tools: list | None = None) -> Encoded:
        """Tokenize a conversation; `train[i]` says whether message i's own text is trained."""
        if len(train) != len(messages):
            raise ValueError("train flags must match the messages one to one")
        # As `apply_chat_template` does: a key whose value is None is treated as absent.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        text = self.render(messages, tools)
        spans = self._locate(messages, text, tools)
        segments = self._segments(text, spans, train, messages)
        ids, labels, _ = self._tokenize(text, segments)
        return Encoded(ids, labels)

    def encode_completion(self, prompt: list[dict], completion: dict, tools: list | None = None) -> Encoded:
        """Prompt messages plus one assistant completion: only the completion (and its terminator) is trained.

        `prompt_len` counts the tokens before the completion's first token, so input_ids[:prompt_len] is the
        prompt exactly as the model sees it at generation time (header included).
        """
        messages = [{k: v for k, v in m.items() if v is not None} for m in [*prompt, completion]]
        train = [False] * len(prompt) + [True]
        text = self.render(messages, tools)
        spans = self._locate(messages, text, tools)
        segments = self._segments(text, spans, train, messages)
        ids, labels, starts = self._tokenize(text, segments)
        last = spans[-1]
        cut = last.body_start if last is not None else len(text)
        prompt_len = next((tok for (s, _e, _t), tok in zip(segments, starts, strict=True) if s >= cut), len(ids))
        return Encoded(ids, labels, prompt_len)

    # ------------------------------------------------------------------ template constants
    def _assistant_header(self) -> tuple[str, str]:
        """The assistant header: what `add_generation_prompt` appends, and its first line.

        The first line alone locates assistant turns whose header is shorter than the generation prompt
        (e.g. qwen3 with enable_thinking=false pre-fills an empty think block that older turns lack).
        """
        probe = [{"role": "user", "content": "Hi"}]
        try:
            plain = self.render(probe)
            prompted = self.render(probe, add_generation_prompt=True)
        except RowError:
            return "", ""
        if not prompted.startswith(plain):
            return "", ""
        full = prompted[len(plain):]
        lead = len(full) - len(full.lstrip())
        newline = full.find("\n", lead)
        return full, (full[: newline + 1] if newline >= 0 else full)

    # ------------------------------------------------------------------ locating turns
    def _locate(self, messages: list[dict], text: str, tools: list | None) -> list[_Span | None]:
        spans: list[_Span | None] = [None] * len(messages)
        cursor = 0
        for i, message in enumerate(messages):
            content = message.get("content") or ""
            if not isinstance(content, str):
                raise RowError(f"message {i}: content must be a string, got {type(content).__name__}")
            if message.get("role") == "assistant":
                span = self._locate_assistant(messages, tools, i, text, content, cursor)
            elif message.get("role") == "system" and content and self._placed_later(messages, i, text, content, cursor):
                # Mistral v3 / Pixtral write the system prompt into the last user turn: it is located on its own
                # and takes no part in the order of the other turns (nor in their terminators).
                found = _find(text, content, 0)
                if found:
                    spans[i] = _Span(found[0], found[0], found[1], body_end=found[1], detached=True)
                continue
            elif content:
                found = _find(text, content, cursor)
                span = None
                if found:
                    # Spaces before the content (`[INST] ` + content) join its piece, so that it is tokenized
                    # as in the whole text (`▁What`, `ĠWhat`); a token of those spaces alone is not trained.
                    start = _spaces_before(text, found[0], cursor)
                    span = _Span(start, start, found[1], lead_space=start < found[0])
            else:
                span = None  # empty text: placed by its terminator below
            if span is not None:
                spans[i] = span
                cursor = span.content_end
        self._assign_terminators(spans, text)
        for i, span in enumerate(spans):
            if span is not None and span.body_end < 0:
                is_turn = messages[i].get("role") == "assistant"
                span.body_end = span.terms[0][0] if (is_turn and span.terms) else span.content_end
                if span.trim_end:  # `content + ' ' + eos` (Llama 2): the space is the template's, not the reply's
                    while span.body_end > max(span.body_start, span.content_end) and text[span.body_end - 1] == " ":
                        span.body_end -= 1
        return spans

    @staticmethod
    def _placed_later(messages: list[dict], i: int, text: str, content: str, cursor: int) -> bool:
        """True when the next message with text comes before this (system) message's content in the text."""
        found = _find(text, content, cursor)
        later = next((m.get("content") for m in messages[i + 1:] if isinstance(m.get("content"), str)
                      and m.get("content").strip()), None)
        if later is None:
            return False
        nxt = _find(text, later, cursor)
        return nxt is not None and (found is None or nxt[0] < found[0])

    def _locate_assistant(self, messages, tools, i: int, text: str, content: str, cursor: int) -> _Span:
        if self._header_short:
            at = text.find(self._header_short, cursor)
            if at < 0:
                raise RowError(
                    f"message {i} (assistant): the template's assistant header {self._header_short!r} is not "
                    "in the rendered conversation; this template cannot be masked per turn."
                )
            body = at + len(self._header_short)
            if self.header != self._header_short and text.startswith(self.header, at):
                body = at + len(self.header)
            # Look for the content only inside this turn, i.e. before its first terminator.
            stop = self._terms.search(text, body)
            found = _find(text, content, body, stop.start() if stop else None) if content else None
            return _Span(at, body, found[1] if found else body)
        # No header ([INST]-style: the reply follows [/INST] directly). The reply starts where the prompt for
        # this turn ends, so a separator (`[/INST] ` + content) is tokenized with the content as at generation
        # time; as in Axolotl, only tokens holding the content are trained, not a token of the separator alone.
        try:
            prompt = self.render(messages[:i], tools, add_generation_prompt=True)
        except RowError:
            prompt = None
        found = _find(text, content, cursor) if content else None
        start = len(prompt) if prompt is not None and text.startswith(prompt) and len(prompt) >= cursor else None
        if start is not None and (found is None or (found[0] >= start and not text[start:found[0]].strip())):
            # lead_space also when the text has no space: SentencePiece tokenizers may insert one after [/INST].
            return _Span(start, start, found[1] if found else start, lead_space=True, trim_end=True)
        if found:
            start = _spaces_before(text, found[0], cursor)
            return _Span(start, start, found[1], lead_space=True, trim_end=True)
        raise RowError(f"message {i} (assistant): cannot find where this turn starts in the rendered conversation.")

    def _assign_terminators(self, spans: list[_Span | None], text: str) -> None:
        """Give each turn the terminator tokens that follow it, before the next located turn starts.

        A message with empty (or unrendered) text has no position of its own; the terminator runs in the
        gap after the previous turn are handed out in order: the first to that turn, the next ones to the
        empty messages. Runs left over (e.g. an eos after the final <|im_end|>) join the last recipient.
        """
        owner: int | None = None
        floating: list[int] = []
        for i in [*range(len(spans)), None]:
            if i is not None and spans[i] is not None and spans[i].detached:
                continue
            if i is not None and spans[i] is None:
                floating.append(i)
                continue
            gap_start = spans[owner].content_end if owner is not None else 0
            gap_end = spans[i].anchor if i is not None else len(text)
            runs = self._runs(text, gap_start, gap_end)
            recipients: list[_Span] = [spans[owner]] if owner is not None else []
            for j in floating:
                if len(recipients) < len(runs):
                    at = runs[len(recipients)][0][0]
                    spans[j] = _Span(at, at, at, found=False)
                    recipients.append(spans[j])
            for k, run in enumerate(runs):
                if recipients:
                    recipients[min(k, len(recipients) - 1)].terms.extend(run)
            owner, floating = i, []

    def _runs(self, text: str, start: int, end: int) -> list[list[tuple[int, int, str]]]:
        """Terminator tokens in text[start:end], grouped into runs of adjacent tokens."""
        runs: list[list[tuple[int, int, str]]] = []
        for m in self._terms.finditer(text, start, end):
            if runs and runs[-1][-1][1] == m.start():
                runs[-1].append((m.start(), m.end(), m.group()))
            else:
                runs.append([(m.start(), m.end(), m.group())])
        return runs

    # ------------------------------------------------------------------ labels
    def _segments(self, text: str, spans: list[_Span | None], train: Sequence[bool],
                  messages: list[dict]) -> list[tuple[int, int, bool]]:
        """Cut the text into (start, end, trained) pieces at every turn and terminator boundary."""
        last_trained = max((i for i, t in enumerate(train) if t and spans[i] is not None), default=-1)
        cuts: list[tuple[int, int, bool]] = []
        for i, span in enumerate(spans):
            if train[i] and messages[i].get("content") and (span is None or not span.found):
                raise RowError(
                    f"message {i} ({messages[i].get('role')}) is to be trained, but its content does not appear in "
                    "the rendered conversation (the chat template drops or rewrites it)."
                )
            if span is None:
                continue
            trained = bool(train[i])
            cuts.append((span.body_start, span.body_end, _LEAD if trained and span.lead_space else trained))
            for start, end, tok in span.terms:
                cuts.append((start, end, self._terminator_trained(tok, i, train, last_trained)))
            if train[i] and not span.terms and not self._warned_no_terminator:
                self._warned_no_terminator = True
                log.warning(
                    "a trained chat turn has no end-of-turn token after it (looked for %s); the model may not "
                    "learn to stop. Set eot_tokens to the token(s) your template closes turns with.",
                    ", ".join(self._rule) or "nothing",
                )
        segments: list[tuple[int, int, bool]] = []
        pos = 0
        for start, end, trained in sorted(cuts, key=lambda c: c[0]):
            if start < pos:
                raise RowError("the chat template renders turns out of order; cannot mask this conversation.")
            if start > pos:
                segments.append((pos, start, False))
            if end > start:
                segments.append((start, end, trained))
            pos = max(pos, end)
        if pos < len(text):
            segments.append((pos, len(text), False))
        return segments

    def _terminator_trained(self, tok: str, i: int, train: Sequence[bool], last_trained: int) -> bool:
        mode = self._rule[tok]
        if mode == "all":
            return True
        if mode == "turn":
            return bool(train[i])
        if mode == "last":
            return i == last_trained
        return False

    # ------------------------------------------------------------------ tokenization
    def _tokenize(self, text: str, segments: list[tuple[int, int, bool]]) -> tuple[list[int], list[int], list[int]]:
        pieces = [text[s:e] for s, e, _ in segments]
        encoded = self._encode_pieces(pieces)
        ids: list[int] = []
        labels: list[int] = []
        starts: list[int] = []
        for (_s, _e, trained), piece_ids in zip(segments, encoded, strict=True):
            starts.append(len(ids))
            ids.extend(piece_ids)
            piece_labels = list(piece_ids) if trained else [IGNORE_INDEX] * len(piece_ids)
            if trained == _LEAD:  # tokens of the separator spaces alone stay untrained
                for k, tid in enumerate(piece_ids):
                    if self.tokenizer.decode([tid]).strip():
                        break
                    piece_labels[k] = IGNORE_INDEX
            labels.extend(piece_labels)
        return ids, labels, starts

    def _encode_pieces(self, pieces: list[str]) -> list[list[int]]:
        out = self._encode(pieces)
        if self._nl_after_text is None and self._nl_after_special is None:
            return out
        # SentencePiece-style tokenizers may add a prefix space at the start of each string they encode,
        # which a piece from the middle of a chat must not get (or must, right after a special token, for
        # prepend_scheme "always"). Such pieces are encoded after a newline, which is then dropped.
        redo = []
        for k in range(1, len(pieces)):
            prev = out[k - 1]
            # (an unknown character's <unk> is text, not a special token written by the template)
            after_special = prev and prev[-1] in self._added_ids and prev[-1] != self.tokenizer.unk_token_id
            nl = self._nl_after_special if after_special else self._nl_after_text
            if nl is not None:
                redo.append((k, nl))
        if redo:
            again = self._encode(["\n" + pieces[k] for k, _ in redo])
            for (k, nl), ids in zip(redo, again, strict=True):
                if ids[: len(nl)] == nl:
                    out[k] = ids[len(nl):]
        return out

    def _encode(self, texts: list[str]) -> list[list[int]]:
        backend = self.tokenizer.backend_tokenizer if self._direct else None
        # The Rust tokenizer directly is about twice as fast; only when it is in the state that
        # `tokenizer(...)` would put it in (no padding/truncation left over, same special-token splitting).
        if backend is not None and backend.padding is None and backend.truncation is None and (
            backend.encode_special_tokens == bool(getattr(self.tokenizer, "split_special_tokens", False))
        ):
            # encode_batch_fast skips computing character offsets, which we do not need.
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _piece_modes(self) -> tuple[list[int] | None, list[int] | None]:
        """How to encode a piece that follows ordinary text, and one that follows a special token.

        None: encode it as it is; else the newline ids to drop after encoding "\\n" + piece. Decided by
        probing: the choice whose pieces join into the same ids as the whole text wins.
        """
        nl = self._encode(["\n"])[0]

        def mode(a: str, b: str) -> list[int] | None:
            joint = self._encode([a + b])[0]
            plain_a, plain_b = self._encode([a, b])
            if plain_a + plain_b == joint:
                return None
            tricked = self._encode(["\n" + b])[0]
            if nl and tricked[: len(nl)] == nl and plain_a + tricked[len(nl):] == joint:
                return nl
            log.debug("no piece encoding reproduces whole-text tokenization after %r; encoding pieces as they are", a)
            return None

        special = self.tokenizer.eos_token or next(iter(self.tokenizer.all_special_tokens), None)
        return mode("Hi\n", "there"), (mode(special, "Hi") if special else None)


def _backend_is_plain(tokenizer) -> bool:
    """True when `tokenizer(...)` is just the Rust tokenizer's encode_batch (no Python-side changes)."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # pragma: no cover - older transformers layout
        return False
    return (
        getattr(tokenizer, "backend_tokenizer", None) is not None
        and isinstance(tokenizer, TokenizersBackend)
        and type(tokenizer)._encode_plus is TokenizersBackend._encode_plus
    )
