"""A tokenizer for chat-template tests that knows every special token our named templates write.

Real model tokenizers have their family's markers as single tokens; the tiny test tokenizer knows only a
few, so the markers found in the templates' sources are added to it as special tokens.
"""

from __future__ import annotations

import re
from functools import cache

from tuneforge import chat_templates as ct

# <|im_start|>, <|START_OF_TURN_TOKEN|>, <|turn>, <turn|>, [INST], [/TOOL_RESULTS], [|user|], <｜User｜>
_MARKER = re.compile(r"<\|[A-Za-z_]+\|?>|<[a-z_]+\|>|\[/?[A-Z_]+\]|\[\|[a-z]+\|\]|<｜[^｜]+｜>")


@cache
def template_tokens() -> tuple[str, ...]:
    found: set[str] = set()
    for name in ct.NAMES:
        found |= set(_MARKER.findall(ct.template(name)))
    return tuple(sorted(found))


def with_template_tokens(tokenizer):
    tokenizer.add_special_tokens({"additional_special_tokens": list(template_tokens())},
                                 replace_extra_special_tokens=False)
    return tokenizer
