"""Format `chat_template`: conversations rendered with a chat template, trained per turn.

Rows hold a list of messages (`field_messages`, default `messages`, else `conversations`). Message keys are
renamed by `message_property_mappings`, role names by `roles`; turns whose role is in `roles_to_train`
(default: assistant; every role with `train_on_inputs`) are trained, unless `message_field_training`
overrides a turn. End-of-turn tokens follow `train_on_eos` / `train_on_eot`. Rendering and masking are
done by `tuneforge.data.masking.ChatMasker`.
"""

from __future__ import annotations

import difflib
import json
from typing import Any

from tuneforge import chat_templates
from tuneforge.config.data import DatasetEntry
from tuneforge.config.schema import Config
from tuneforge.errors import DataError, TuneforgeError

from ..masking import ChatMasker
from .registry import FormatContext, RowError, RowFn, register

# Canonical role -> role names seen in the wild; `roles:` in the config adds to (and overrides) these.
DEFAULT_ROLES: dict[str, list[str]] = {
    "system": ["system"],
    "user": ["user", "human"],
    "assistant": ["assistant", "gpt", "model"],
    "tool": ["tool", "function", "ipython"],
}


def dataset_template(cfg: Config, entry: DatasetEntry, tokenizer) -> tuple[str, str | None]:
    """The template text for this dataset and the name it was selected by (for its eot tokens)."""
    try:
        if entry.chat_template is not None or entry.chat_template_jinja is not None:
            text = chat_templates.resolve(entry.chat_template, entry.chat_template_jinja, tokenizer, cfg.source_dir,
                                          key=f"datasets ({entry.path}): chat_template")
            name = entry.chat_template
        else:
            text = chat_templates.resolve(cfg.chat_template, cfg.chat_template_jinja, tokenizer, cfg.source_dir)
            name = cfg.chat_template
    except TuneforgeError as exc:
        raise DataError(str(exc)) from None
    if text is None:  # nothing configured: the tokenizer's current template
        text = chat_templates.as_text(tokenizer.chat_template)
    if not text:
        raise DataError(
            f"datasets ({entry.path}): type chat_template needs a chat template, but the tokenizer has none. "
            f"Set chat_template to one of {', '.join(chat_templates.NAMES)}, or give chat_template_jinja."
        )
    if name is not None and name.startswith(chat_templates.FALLBACK_PREFIX):
        name = None  # whichever template won, read its eot tokens from its text
    if name in ("tokenizer_default", "jinja"):
        name = None
    return text, name


class MessageReader:
    """Read one row into (messages with canonical keys and roles, per-turn train flags, tools)."""

    def __init__(self, cfg: Config, entry: DatasetEntry):
        self.field = entry.field_messages
        mapping = dict(entry.message_property_mappings or {})
        self.explicit_keys = bool(mapping)
        self.role_key = mapping.pop("role", "role")
        self.content_key = mapping.pop("content", "content")
        self.extra_keys = mapping  # other canonical key -> key in the data
        self.role_of = self._role_table(entry.roles)
        if cfg.train_on_inputs:
            self.roles_to_train = None  # every role
        else:
            names = entry.roles_to_train if entry.roles_to_train is not None else ["assistant"]
            known = set(self.role_of) | set(self.role_of.values())
            for name in names:
                if name not in known:
                    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
                    hint = f" Did you mean `{close[0]}`?" if close else ""
                    raise DataError(
                        f"datasets ({entry.path}): roles_to_train names `{name}`, which is not a role.{hint} "
                        f"Known roles: {', '.join(sorted(known))} (add new ones under `roles:`)."
                    )
            self.roles_to_train = {self.role_of[r] for r in names}
        self.train_key = entry.message_field_training
        self.drop_system = entry.drop_system_message
        self.default_system = cfg.default_system_message
        self.tools_field = entry.field_tools or "tools"

    @staticmethod
    def _role_table(roles: dict[str, list[str]] | None) -> dict[str, str]:
        table = {name: canon for canon, names in DEFAULT_ROLES.items() for name in names}
        for canon, names in (roles or {}).items():
            table[canon] = canon
            for name in [names] if isinstance(names, str) else names:
                table[str(name)] = canon
        return table

    def __call__(self, row: dict[str, Any]) -> tuple[list[dict], list[bool], list | None]:
        raw = self._messages_of(row)
        messages: list[dict] = []
        flags: list[bool] = []
        for j, item in enumerate(raw):
            message, flag = self._message(j, item)
            if self.drop_system and message["role"] == "system":
                continue
            messages.append(message)
            flags.append(flag)
        if self.default_system is not None and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": self.default_system})
            flags.insert(0, self._trains("system"))
        if not messages:
            raise RowError("the conversation has no messages left after dropping system messages.")
        return messages, flags, self._tools(row)

    def _messages_of(self, row: dict[str, Any]) -> list:
        key = self.field or ("conversations" if "messages" not in row and "conversations" in row else "messages")
        if key not in row or row[key] is None:
            raise RowError(
                f"no `{key}` field; the row has keys {sorted(row)}. Set field_messages to the key that holds "
                "the list of messages."
            )
        raw = row[key]
        if not isinstance(raw, list | tuple):
            raise RowError(f"`{key}` must be a list of messages, got {type(raw).__name__}.")
        if not raw:
            raise RowError(f"`{key}` is an empty conversation.")
        return list(raw)

    def _message(self, j: int, item: Any) -> tuple[dict, bool]:
        if not isinstance(item, dict):
            raise RowError(f"message {j} is a {type(item).__name__}, not a dict with a role and a content.")
        role_key, content_key = self.role_key, self.content_key
        if not self.explicit_keys and role_key not in item and "from" in item:
            role_key, content_key = "from", "value"  # ShareGPT rows without a configured mapping
        if item.get(role_key) is None:
            raise RowError(
                f"message {j} has no `{role_key}` (its keys: {sorted(item)}). Name the role key with "
                f"message_property_mappings: {{role: <key>}}."
            )
        role = self.role_of.get(str(item[role_key]))
        if role is None:
            raise RowError(
                f"message {j} has role `{item[role_key]}`, which is not a known role "
                f"(known: {', '.join(sorted(self.role_of))}). Map it under `roles:`, e.g. "
                f"roles: {{assistant: [{item[role_key]}]}}."
            )
        if content_key not in item and not (role == "assistant" and item.get("tool_calls")):
            raise RowError(
                f"message {j} has no `{content_key}` (its keys: {sorted(item)}). Name the content key with "
                f"message_property_mappings: {{content: <key>}}."
            )
        content = _text(item.get(content_key), j, content_key, role, item)
        used = {role_key, content_key, self.train_key, *self.extra_keys.values()}
        message = {k: v for k, v in item.items() if k not in used}
        for canon, key in self.extra_keys.items():
            if key in item:
                message[canon] = item[key]
        message["role"] = role
        message["content"] = content
        return message, self._flag(j, item, role)

    def _trains(self, role: str) -> bool:
        return self.roles_to_train is None or role in self.roles_to_train

    def _flag(self, j: int, item: dict, role: str) -> bool:
        if self.train_key is None or item.get(self.train_key) is None:
            return self._trains(role)
        value = item[self.train_key]
        if not isinstance(value, bool):
            raise RowError(f"message {j}: `{self.train_key}` (message_field_training) must be true or false, got {value!r}.")
        return value

    def _tools(self, row: dict[str, Any]) -> list | None:
        tools = row.get(self.tools_field)
        if tools is None:
            return None
        if isinstance(tools, str):  # tools are often stored as a JSON string to keep the Arrow schema simple
            try:
                tools = json.loads(tools)
            except json.JSONDecodeError as exc:
                raise RowError(f"`{self.tools_field}` is a string but not valid JSON ({exc}).") from None
        if not isinstance(tools, list | tuple):
            raise RowError(f"`{self.tools_field}` must be a list of tool definitions, got {type(tools).__name__}.")
        return list(tools) or None


def _text(value: Any, j: int, key: str, role: str, item: dict) -> str | None:
    """A message's content as a string (text parts are joined; None only for assistant tool calls)."""
    if isinstance(value, str):
        return value
    if value is None and role == "assistant" and item.get("tool_calls"):
        return None
    if isinstance(value, list | tuple) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text") or "") for p in value)
    raise RowError(
        f"message {j} ({role}): `{key}` must be a string (or a list of {{type: text, text: ...}} parts), "
        f"got {type(value).__name__}."
    )


@register("chat_template", version="1")
def build(ctx: FormatContext) -> RowFn:
    cfg, entry, tokenizer = ctx.cfg, ctx.entry, ctx.tokenizer
    template, name = dataset_template(cfg, entry, tokenizer)
    eot = cfg.eot_tokens if cfg.eot_tokens is not None else chat_templates.eot_tokens_for(name or template, tokenizer)
    for tok in eot:
        ids = tokenizer(tok, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise DataError(
                f"eot_tokens: `{tok}` is not a single token of the tokenizer (it encodes to {len(ids)} tokens). "
                "Add it with special_tokens.additional_special_tokens, or fix eot_tokens."
            )
    masker = ChatMasker(
        tokenizer, template, eot_tokens=eot,
        train_on_eos=entry.train_on_eos or "turn", train_on_eot=entry.train_on_eot,
        template_kwargs=cfg.chat_template_kwargs,
    )
    return ChatTemplateRows(MessageReader(cfg, entry), masker)


class ChatTemplateRows:
    """The row function (a class rather than a closure, so it pickles into dataset worker processes)."""

    def __init__(self, reader: MessageReader, masker: ChatMasker):
        self.reader = reader
        self.masker = masker

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        messages, flags, tools = self.reader(row)
        encoded = self.masker.encode(messages, flags, tools)
        return [{"input_ids": encoded.input_ids, "labels": encoded.labels}]
