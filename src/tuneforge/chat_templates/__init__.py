"""Named chat templates and the resolution of the `chat_template` / `chat_template_jinja` keys.

The templates (`<name>.jinja` next to this file) are tuneforge's own, written to each model family's
documented format, under Axolotl's `chat_template` names (plus `mistral`, `phi_4` and the alias `phi`).
Each supports a system prompt, multi-turn chats and `add_generation_prompt`; those in `TOOL_NAMES` also
render tool definitions, calls and results in the family's style. The files carry `{% generation %}` markers around what an
assistant turn produces (its text, tool calls, reasoning and end-of-turn token); `template(name)` strips
them, because a template saved with a model must render the same in every inference stack, and
`template(name, generation_markers=True)` keeps them for transformers' `return_assistant_tokens_mask`.
"""

from __future__ import annotations

import difflib
import re
from functools import cache
from importlib import resources
from pathlib import Path

from tuneforge.errors import ModelError, TuneforgeError

NAMES = (
    "chatml", "llama3", "mistral", "gemma", "qwen3", "phi_3",
    "alpaca", "mistral_v1", "mistral_v2v3", "mistral_v3_tekken", "mistral_v7_tekken", "pixtral",
    "llama3_2_vision", "llama4", "qwen_25", "qwen3_5", "qwen2_vl", "gemma3", "gemma3n", "gemma4",
    "phi_35", "phi_4", "deepseek_v2", "deepseek_v3", "cohere", "aya", "command_a", "command_a_tool_use",
    "command_a_rag", "falcon_h1", "nemotron_h", "jamba", "exaone", "exaone4", "metharme", "llava",
)
# Templates that write tool definitions, calls and results (the others have no tool format of their own).
TOOL_NAMES = (
    "chatml", "llama3", "mistral", "gemma", "qwen3", "phi_3", "mistral_v2v3", "mistral_v3_tekken",
    "mistral_v7_tekken", "llama3_2_vision", "llama4", "qwen_25", "qwen3_5", "gemma3", "gemma3n", "phi_35",
    "phi_4", "deepseek_v3", "cohere", "aya", "command_a_tool_use", "falcon_h1", "jamba", "exaone4",
)
# Other names of the same format: Axolotl's gemma4_unified template renders exactly as its gemma4 one.
ALIASES = {"phi": "phi_3", "gemma4_unified": "gemma4"}
FALLBACK_PREFIX = "tokenizer_default_fallback_"

# The token each template writes to close a turn; "eos" stands for the tokenizer's eos_token.
_EOT = {
    "chatml": ["<|im_end|>"],
    "qwen3": ["<|im_end|>"],
    "llama3": ["<|eot_id|>"],
    "gemma": ["<end_of_turn>"],
    "mistral": ["eos"],
    "phi_3": ["<|end|>"],
    **dict.fromkeys(("alpaca", "mistral_v1", "mistral_v2v3", "mistral_v3_tekken", "mistral_v7_tekken", "pixtral",
                     "deepseek_v2", "deepseek_v3", "metharme", "llava"), ["eos"]),
    **dict.fromkeys(("qwen_25", "qwen3_5", "qwen2_vl", "phi_4", "falcon_h1", "nemotron_h"), ["<|im_end|>"]),
    **dict.fromkeys(("cohere", "aya", "command_a", "command_a_tool_use", "command_a_rag"), ["<|END_OF_TURN_TOKEN|>"]),
    **dict.fromkeys(("exaone", "exaone4"), ["[|endofturn|]"]),
    "gemma3": ["<end_of_turn>"], "gemma3n": ["<end_of_turn>"], "gemma4": ["<turn|>"],
    "llama3_2_vision": ["<|eot_id|>"], "llama4": ["<|eot|>"], "phi_35": ["<|end|>"], "jamba": ["<|eom|>"],
}
# Turn terminators looked for in templates we did not write (tokenizer_default, jinja).
_KNOWN_EOT = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|eom_id|>", "<|endoftext|>", "<|eot|>",
              "<|END_OF_TURN_TOKEN|>", "[|endofturn|]", "<|eom|>", "<turn|>")

_MARKER = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


def canonical(name: str) -> str:
    """The canonical name of a named template (`phi` -> `phi_3`); errors with a did-you-mean if unknown."""
    name = ALIASES.get(name, name)
    if name in NAMES:
        return name
    choices = [*NAMES, *ALIASES, "tokenizer_default", f"{FALLBACK_PREFIX}<name>", "jinja"]
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    raise TuneforgeError(
        f"chat_template: unknown template `{name}`.{hint} Known: {', '.join([*NAMES, *ALIASES])}, tokenizer_default, "
        f"{FALLBACK_PREFIX}<name>, or jinja with chat_template_jinja."
    )


@cache
def _source(name: str) -> str:
    return resources.files(__package__).joinpath(f"{name}.jinja").read_text(encoding="utf-8")


def template(name: str, generation_markers: bool = False) -> str:
    """The Jinja source of a named template, with or without `{% generation %}` markers."""
    text = _source(canonical(name))
    return text if generation_markers else strip_generation_markers(text)


def strip_generation_markers(text: str) -> str:
    # Our templates start every line with a whitespace-trimming tag, so removing a marker leaves the
    # rendered text unchanged (tests check this on every template).
    return _MARKER.sub("", text)


@cache
def _named_by_source() -> dict[str, str]:
    out = {}
    for name in NAMES:
        out[_source(name)] = name
        out[strip_generation_markers(_source(name))] = name
    return out


def name_of(text: str | None) -> str | None:
    """The name of one of our templates given its source (with or without markers), else None."""
    return _named_by_source().get(text) if text else None


def as_text(value) -> str | None:
    """A tokenizer's chat_template value as one template text (the `default` one of several named ones)."""
    if isinstance(value, dict):
        value = value.get("default")
    if isinstance(value, list):  # [{"name": ..., "template": ...}] as stored by some tokenizers
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    return value or None


def tokenizer_own_template(tokenizer) -> str | None:
    """The template the tokenizer was saved with, even after `load_tokenizer` replaced it."""
    saved = getattr(tokenizer, "init_kwargs", {}).get("chat_template")
    return as_text(saved) or as_text(tokenizer.chat_template)


def _read_jinja(jinja: str, base_dir: str | Path | None, key: str) -> str:
    """Inline Jinja, or the contents of a .jinja file (relative to the config file, then the working dir)."""
    if "{{" in jinja or "{%" in jinja:
        return jinja
    candidates = [Path(jinja).expanduser()]
    if base_dir is not None and not candidates[0].is_absolute():
        candidates.insert(0, Path(base_dir) / jinja)
    for path in candidates:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    raise TuneforgeError(
        f"{key}: `{jinja}` is neither an inline Jinja template (no `{{{{` or `{{%`) nor an existing file "
        f"(looked for {' and '.join(str(p) for p in candidates)}). Give the template text or a path to a .jinja file."
    )


def resolve(name: str | None, jinja: str | None, tokenizer, base_dir: str | Path | None = None,
            key: str = "chat_template") -> str | None:
    """The chat template text selected by `chat_template` (name) and `chat_template_jinja`.

    Returns None when nothing is configured, meaning: keep the tokenizer's own template.
    """
    if jinja is not None and name not in (None, "jinja"):
        raise TuneforgeError(
            f"{key}: `{name}` and {key}_jinja are both set; remove one of them (a custom template needs "
            f"`{key}: jinja` or no {key} at all)."
        )
    if jinja is not None:
        return _read_jinja(jinja, base_dir, f"{key}_jinja")
    if name is None:
        return None
    if name == "jinja":
        raise TuneforgeError(f"{key}: jinja needs {key}_jinja (an inline template or a path to a .jinja file).")
    if name == "tokenizer_default":
        own = tokenizer_own_template(tokenizer)
        if not own:
            raise TuneforgeError(
                f"{key}: tokenizer_default, but the tokenizer has no chat template. Choose a named template "
                f"({', '.join(NAMES)}), `{FALLBACK_PREFIX}chatml`, or give {key}_jinja."
            )
        return own
    if name.startswith(FALLBACK_PREFIX):
        fallback = canonical(name[len(FALLBACK_PREFIX):])
        return tokenizer_own_template(tokenizer) or template(fallback)
    return template(name)


def _single_token(tokenizer, text: str) -> bool:
    ids = tokenizer.convert_tokens_to_ids(text)
    return ids is not None and ids != tokenizer.unk_token_id


def eot_tokens_for(name_or_template: str | None, tokenizer) -> list[str]:
    """The end-of-turn token(s) a template writes after each turn (used when `eot_tokens` is not set).

    Accepts a template name or a template's text (None: the tokenizer's template). For a template we did
    not write, the known terminators that occur in its text and are tokens of the tokenizer; failing
    that, the eos token.
    """
    eos = tokenizer.eos_token
    text = name_or_template if name_or_template is not None else tokenizer_own_template(tokenizer)
    name = None
    if text is not None:
        name = ALIASES.get(text, text) if ALIASES.get(text, text) in NAMES else name_of(text)
    if name is not None:
        return [eos if t == "eos" else t for t in _EOT[name] if t != "eos" or eos]
    found = [t for t in _KNOWN_EOT if text and t in text and _single_token(tokenizer, t)]
    if found:
        return found
    return [eos] if eos else []


def stop_token_ids(tokenizer, eot_tokens: list[str] | None = None) -> list[int]:
    """eos plus the end-of-turn tokens (`eot_tokens` from the config, else the chat template's own)."""
    names = list(eot_tokens or [])
    if not names and tokenizer.chat_template:
        names = eot_tokens_for(tokenizer.chat_template, tokenizer)
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for name in names:
        tid = tokenizer.convert_tokens_to_ids(name)
        if tid is None or tid == tokenizer.unk_token_id:
            raise ModelError(f"end-of-turn token {name!r} is not a single token of the tokenizer; fix eot_tokens.")
        if tid not in ids:
            ids.append(tid)
    if not ids:
        raise ModelError("the tokenizer has no eos token and no end-of-turn token is known; set eot_tokens.")
    return ids
