"""Preference-pair formats (DPO, IPO, SimPO, ORPO, and outcome reward models).

Every format turns a row into two token sequences that share one prompt:

    chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels

aligned and unshifted like SFT rows: labels are -100 on the prompt and the completion's own token ids
after it. A completion's sequence log-prob is the sum over its labelled tokens. Tokens after a
completion's last labelled token (the newline some templates write after `<|im_end|>`) are dropped:
no labelled log-prob depends on them, so they would only cost compute.

Types, with Axolotl's names (`chatml` means `chatml.default`; `chatml.argilla`, a documented name that
Axolotl renamed to `default`, is accepted as an alias):

  chatml[.default]     {system?, prompt|input|question|instruction, chosen|chosen_response, rejected|rejected_response}
  chatml.intel         {system?, question, chosen, rejected}
  chatml.icr           {system?, input, chosen, rejected}
  chatml.prompt_pairs  {system?, prompt, chosen, rejected}
  chatml.ultra         {system?, prompt, chosen: [user, assistant], rejected: [...]} (the last message counts)
  chatml.argilla_chat  {chosen: [user, assistant], rejected: [user, assistant]}
  llama3.*             the same types with the Llama 3 template
  chat_template[.default]  {messages, chosen, rejected} with the configured chat template; chosen/rejected
                       are a string, a message or a list of messages (the last one counts); `field_messages`,
                       `field_chosen`, `field_rejected`, `message_property_mappings` and `roles` rename fields
  chat_template.argilla / .argilla_chat  {system?, prompt?, chosen: [msgs], rejected: [msgs]} (ORPO's type):
                       the conversations share their history, the last messages are the two answers
  a dict type          field_prompt, field_system, field_chosen, field_rejected, prompt_format ("{prompt}",
                       may use {system}), chosen_format ("{chosen}"), rejected_format ("{rejected}")
  no type              rows already {prompt, chosen, rejected}: strings are tokenized as TRL does (prompt,
                       then prompt + completion + EOS; the completion starts where the two tokenizations
                       part), conversations (lists of messages) use the configured chat template; rows
                       with chosen_input_ids/chosen_labels/rejected_input_ids/rejected_labels are kept as is.

The chatml/llama3 types render with our named templates, which write exactly the strings Axolotl
hard-codes; the completion is trained up to and including its end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tuneforge import chat_templates
from tuneforge.config.data import UserDefinedFormat
from tuneforge.errors import DataError

from ..masking import ChatMasker
from .alpaca import present_keys, text_field
from .chat_template import MessageReader, dataset_template
from .registry import IGNORE_INDEX, FormatContext, RowError, RowFn, method_family, register

Messages = list[dict[str, Any]]
Sequence = tuple[list[int], list[int]]  # (input_ids, labels)
# row -> (prompt messages, chosen text, rejected text)
ChatPairFn = Callable[[dict[str, Any]], tuple[Messages, str, str]]

VERSION = "1"
FIXED_TEMPLATES = ("chatml", "llama3")


# ---------------------------------------------------------------- shared encoders (also used by kto.py)
def trim_untrained_tail(ids: list[int], labels: list[int]) -> Sequence:
    """Drop the tokens after the last labelled one: nothing that is trained depends on them."""
    end = len(labels)
    while end and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    return ids[:end], labels[:end]


class ChatCompletions:
    """Prompt messages + one assistant answer -> (ids, labels), rendered and masked with one chat template."""

    def __init__(self, ctx: FormatContext, template: str, template_name: str | None):
        cfg, tokenizer = ctx.cfg, ctx.tokenizer
        eot = cfg.eot_tokens if cfg.eot_tokens is not None else chat_templates.eot_tokens_for(
            template_name or template, tokenizer)
        self.masker = ChatMasker(tokenizer, template, eot_tokens=eot, train_on_eos=ctx.entry.train_on_eos or "turn",
                                 train_on_eot=ctx.entry.train_on_eot, template_kwargs=cfg.chat_template_kwargs)

    def __call__(self, prompt: Messages, answer: str, tools: list | None = None) -> Sequence:
        if not isinstance(answer, str):
            raise RowError(f"an answer must be text, got {type(answer).__name__}")
        encoded = self.masker.encode_completion(prompt, {"role": "assistant", "content": answer}, tools)
        ids, labels = trim_untrained_tail(encoded.input_ids, encoded.labels)
        if not ids:
            raise RowError("the answer renders to no trained token with this chat template")
        return ids, labels


def fixed_template(ctx: FormatContext, name: str) -> ChatCompletions:
    return ChatCompletions(ctx, chat_templates.template(name), name)


def configured_template(ctx: FormatContext) -> ChatCompletions:
    template, name = dataset_template(ctx.cfg, ctx.entry, ctx.tokenizer)
    return ChatCompletions(ctx, template, name)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PlainCompletions:
    """Prompt and answers as plain strings, tokenized as TRL does.

    The prompt is tokenized alone and together with each answer (EOS appended unless the answer ends
    with it). The answer starts where the two tokenizations part, so a token that merges across the
    boundary is never split; with a pair, the shorter shared prefix is the prompt of both sequences.
    """

    def __init__(self, tokenizer, where: str):
        if tokenizer.eos_token is None:
            raise DataError(f"{where}: the tokenizer has no eos_token; set `special_tokens: {{eos_token: ...}}`.")
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, verbose=False)["input_ids"]

    def encode(self, prompt: str, answers: list[str]) -> list[Sequence]:
        prompt_ids = self._ids(prompt)
        fulls = [self._ids(prompt + (a if a.endswith(self.eos) else a + self.eos)) for a in answers]
        k = min(common_prefix(prompt_ids, f) for f in fulls)
        out = []
        for full in fulls:
            if len(full) <= k:
                raise RowError("an answer adds no token to the prompt")
            out.append((full, [IGNORE_INDEX] * k + full[k:]))
        return out


def pair_row(chosen: Sequence, rejected: Sequence) -> dict[str, Any]:
    return {"chosen_input_ids": chosen[0], "chosen_labels": chosen[1],
            "rejected_input_ids": rejected[0], "rejected_labels": rejected[1]}


# ---------------------------------------------------------------- reading fields
def first_key(row: dict[str, Any], keys: tuple[str, ...]) -> str:
    for key in keys:
        if row.get(key) is not None:
            return key
    raise RowError(f"none of the fields {', '.join(keys)} is present (the row has: {present_keys(row)})")


def answer_text(value: Any, key: str) -> str:
    """An answer given as text, as a message, or as a conversation whose last message is the answer."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    if isinstance(value, list | tuple) and value and isinstance(value[-1], dict) \
            and isinstance(value[-1].get("content"), str):
        return value[-1]["content"]
    raise RowError(f"field `{key}` must be text, a message or a list of messages; got {type(value).__name__}")


def conversation(value: Any, key: str) -> list[dict[str, Any]]:
    if not isinstance(value, list | tuple) or not value or not all(isinstance(m, dict) for m in value):
        raise RowError(f"field `{key}` must be a non-empty list of messages, got {type(value).__name__}")
    return list(value)


def with_system(row: dict[str, Any], messages: Messages, key: str = "system") -> Messages:
    system = row.get(key)
    if system and not (messages and messages[0].get("role") == "system"):
        if not isinstance(system, str):
            raise RowError(f"field `{key}` must be text, got {type(system).__name__}")
        return [{"role": "system", "content": system}, *messages]
    return messages


def user_prompt(row: dict[str, Any], key: str) -> Messages:
    return with_system(row, [{"role": "user", "content": text_field(row, key)}])


def require_family(ctx: FormatContext, name: str, family: str = "preference") -> None:
    if method_family(ctx.cfg) != family:
        method = {"preference": "rl: dpo, ipo, simpo or orpo (or reward_model: true)", "kto": "rl: kto",
                  "stepwise": "process_reward_model: true"}[family]
        raise DataError(
            f"dataset {ctx.entry.path}: type `{name}` is a {family} format; it is used with {method}. "
            "Pick a dataset type of the method you train, or set the method."
        )


# ---------------------------------------------------------------- chatml.* / llama3.*
def _answers(row: dict[str, Any], chosen_keys=("chosen", "chosen_response"),
             rejected_keys=("rejected", "rejected_response")) -> tuple[str, str]:
    c, r = first_key(row, chosen_keys), first_key(row, rejected_keys)
    return answer_text(row[c], c), answer_text(row[r], r)


def _default(row):
    return (user_prompt(row, first_key(row, ("prompt", "input", "question", "instruction"))), *_answers(row))


def _keyed(prompt_key: str) -> ChatPairFn:
    return lambda row: (user_prompt(row, prompt_key), *_answers(row, ("chosen",), ("rejected",)))


def _argilla_chat(row):
    chosen, rejected = conversation(row.get("chosen"), "chosen"), conversation(row.get("rejected"), "rejected")
    history = [{"role": m.get("role"), "content": m.get("content")} for m in chosen[:-1]]
    if not history:
        raise RowError("`chosen` holds only the answer; argilla_chat rows hold [user message, answer]")
    return with_system(row, history), answer_text(chosen, "chosen"), answer_text(rejected, "rejected")


FIXED_TYPES: dict[str, ChatPairFn] = {
    "default": _default,
    "argilla": _default,  # documented name, renamed to `default` upstream
    "intel": _keyed("question"),
    "icr": _keyed("input"),
    "prompt_pairs": _keyed("prompt"),
    "ultra": _keyed("prompt"),  # chosen/rejected are [user, assistant] conversations: the last message counts
    "argilla_chat": _argilla_chat,
}


def _fixed_builder(template: str, kind: str) -> Callable[[FormatContext], RowFn]:
    extract = FIXED_TYPES[kind]

    def build(ctx: FormatContext) -> RowFn:
        require_family(ctx, f"{template}.{kind}")
        encode = fixed_template(ctx, template)

        def row_fn(row: dict[str, Any]) -> list[dict[str, Any]]:
            prompt, chosen, rejected = extract(row)
            return [pair_row(encode(prompt, chosen), encode(prompt, rejected))]

        return row_fn

    return build


for _template in FIXED_TEMPLATES:
    register(_template, version=VERSION)(_fixed_builder(_template, "default"))
    for _kind in FIXED_TYPES:
        register(f"{_template}.{_kind}", version=VERSION)(_fixed_builder(_template, _kind))


# ---------------------------------------------------------------- chat_template.*
class _MessageMapper:
    """Map messages of the row (renamed keys and roles) to canonical {role, content} messages."""

    def __init__(self, ctx: FormatContext):
        self.reader = MessageReader(ctx.cfg, ctx.entry)

    def messages(self, row: dict[str, Any]) -> tuple[Messages, list | None]:
        reader = self.reader
        key = reader.field or "messages"
        value = row.get(key)
        if isinstance(value, str):  # a bare prompt string is one user message
            row = {**row, key: [{reader.role_key: "user", reader.content_key: value}]}
        messages, _, tools = reader(row)
        return messages, tools

    def answer(self, value: Any, key: str) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, list | tuple) and value:
            value = value[-1]
        if not isinstance(value, dict):
            raise RowError(f"field `{key}` must be text, a message or a list of messages; got {type(value).__name__}")
        message, _ = self.reader._message(0, value)  # noqa: SLF001 - same package: one mapping for every format
        if message["role"] != "assistant":
            raise RowError(f"field `{key}`: the answer must be an assistant message, got role `{message['role']}`")
        return message["content"] or ""

    def history(self, value: Any, key: str) -> Messages:
        return [self.reader._message(j, m)[0] for j, m in enumerate(conversation(value, key)[:-1])]  # noqa: SLF001


@register("chat_template.default", version=VERSION)
def build_chat_template_default(ctx: FormatContext) -> RowFn:
    require_family(ctx, "chat_template.default")
    encode = configured_template(ctx)
    mapper = _MessageMapper(ctx)
    f_chosen, f_rejected = ctx.entry.field_chosen or "chosen", ctx.entry.field_rejected or "rejected"

    def row_fn(row: dict[str, Any]) -> list[dict[str, Any]]:
        prompt, tools = mapper.messages(row)
        for key in (f_chosen, f_rejected):
            if row.get(key) is None:
                raise RowError(f"missing field `{key}` (the row has: {present_keys(row)})")
        chosen = mapper.answer(row[f_chosen], f_chosen)
        rejected = mapper.answer(row[f_rejected], f_rejected)
        return [pair_row(encode(prompt, chosen, tools), encode(prompt, rejected, tools))]

    return row_fn


register("chat_template", version=VERSION, method="preference")(build_chat_template_default)


def build_chat_template_argilla(ctx: FormatContext) -> RowFn:
    require_family(ctx, "chat_template.argilla")
    encode = configured_template(ctx)
    mapper = _MessageMapper(ctx)
    f_chosen, f_rejected = ctx.entry.field_chosen or "chosen", ctx.entry.field_rejected or "rejected"

    def row_fn(row: dict[str, Any]) -> list[dict[str, Any]]:
        history = mapper.history(row.get(f_chosen), f_chosen)
        other = mapper.history(row.get(f_rejected), f_rejected)
        if other and [(m["role"], m["content"]) for m in other] != [(m["role"], m["content"]) for m in history]:
            raise RowError(f"`{f_chosen}` and `{f_rejected}` must share the same conversation before their last message")
        if not any(m["role"] == "user" for m in history):
            if row.get("prompt") is None:
                raise RowError(f"no user message: `{f_chosen}` holds only the answer and the row has no `prompt`")
            history = [*history, {"role": "user", "content": text_field(row, "prompt")}]
        history = with_system(row, history)
        chosen = mapper.answer(row[f_chosen], f_chosen)
        rejected = mapper.answer(row[f_rejected], f_rejected)
        return [pair_row(encode(history, chosen), encode(history, rejected))]

    return row_fn


register("chat_template.argilla", version=VERSION)(build_chat_template_argilla)
register("chat_template.argilla_chat", version=VERSION)(build_chat_template_argilla)


# ---------------------------------------------------------------- rows already in prompt/chosen/rejected form
@register("pretokenized", version=VERSION, method="preference")
def build_prompt_chosen_rejected(ctx: FormatContext) -> RowFn:
    where = f"dataset {ctx.entry.path}"
    plain = PlainCompletions(ctx.tokenizer, where)
    chat: list[ChatCompletions] = []  # built on first use: plain-text data needs no chat template

    def chat_encoder() -> ChatCompletions:
        if not chat:
            chat.append(configured_template(ctx))
        return chat[0]

    def row_fn(row: dict[str, Any]) -> list[dict[str, Any]]:
        if "chosen_input_ids" in row:
            return [pretokenized_pair(row)]
        for key in ("chosen", "rejected"):
            if row.get(key) is None:
                raise RowError(
                    f"missing field `{key}` (the row has: {present_keys(row)}). Preference rows without a `type:` "
                    "hold prompt/chosen/rejected; otherwise set a type such as chatml.intel or chat_template.default."
                )
        prompt = row.get("prompt")
        if isinstance(prompt, str) and isinstance(row["chosen"], str) and isinstance(row["rejected"], str):
            chosen, rejected = plain.encode(prompt, [row["chosen"], row["rejected"]])
            return [pair_row(chosen, rejected)]
        if prompt is None:  # implicit prompt: both conversations share their history
            history, chosen, rejected = _argilla_chat(row)
        else:
            history = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else conversation(prompt, "prompt")
            chosen, rejected = answer_text(row["chosen"], "chosen"), answer_text(row["rejected"], "rejected")
        encode = chat_encoder()
        return [pair_row(encode(history, chosen), encode(history, rejected))]

    return row_fn


def pretokenized_pair(row: dict[str, Any]) -> dict[str, Any]:
    """A pair given as token ids: chosen/rejected_input_ids with their labels (-100 on the prompt), kept verbatim."""
    out = {}
    for side in ("chosen", "rejected"):
        ids, labels = row.get(f"{side}_input_ids"), row.get(f"{side}_labels")
        for key, value in ((f"{side}_input_ids", ids), (f"{side}_labels", labels)):
            if not isinstance(value, list | tuple) or not all(isinstance(t, int) for t in value):
                raise RowError(f"pre-tokenized pairs need `{key}` as a list of token ids"
                               + (" (-100 on the prompt)" if "labels" in key else ""))
        if len(ids) != len(labels):
            raise RowError(f"`{side}_input_ids` has {len(ids)} tokens but `{side}_labels` has {len(labels)}")
        out[f"{side}_input_ids"], out[f"{side}_labels"] = list(ids), list(labels)
    return out


# ---------------------------------------------------------------- dict type
def user_prompt_text(spec: UserDefinedFormat, row: dict[str, Any], where: str) -> str:
    """The prompt of a dict type: prompt_format filled with the prompt (and system) fields."""
    f_prompt, f_system = spec.field_prompt or "prompt", spec.field_system or "system"
    fmt = spec.prompt_format or "{prompt}"
    values = {"prompt": text_field(row, f_prompt), "system": text_field(row, f_system, required=False)}
    try:
        return fmt.format(**values)
    except (KeyError, IndexError, ValueError) as exc:
        raise DataError(f"{where}: `type.prompt_format` {fmt!r} is not a valid format string with {{prompt}} and "
                        f"{{system}} ({type(exc).__name__}: {exc}).") from None


def formatted(fmt: str | None, key: str, value: str, where: str, option: str) -> str:
    if not fmt:
        return value
    try:
        return fmt.format(**{key: value})
    except (KeyError, IndexError, ValueError) as exc:
        raise DataError(f"{where}: `type.{option}` {fmt!r} is not a valid format string with {{{key}}} "
                        f"({type(exc).__name__}: {exc}).") from None


@register("user_defined", version=VERSION, method="preference")
def build_user_defined(ctx: FormatContext) -> RowFn:
    spec = ctx.entry.type
    assert isinstance(spec, UserDefinedFormat)
    where = f"dataset {ctx.entry.path}"
    plain = PlainCompletions(ctx.tokenizer, where)
    f_chosen, f_rejected = spec.field_chosen or "chosen", spec.field_rejected or "rejected"

    def row_fn(row: dict[str, Any]) -> list[dict[str, Any]]:
        prompt = user_prompt_text(spec, row, where)
        chosen = formatted(spec.chosen_format, "chosen", text_field(row, f_chosen), where, "chosen_format")
        rejected = formatted(spec.rejected_format, "rejected", text_field(row, f_rejected), where, "rejected_format")
        c, r = plain.encode(prompt, [chosen, rejected])
        return [pair_row(c, r)]

    return row_fn
