"""[INST]-style templates (no assistant header): masks equal Axolotl's on multi-turn data.

The oracle is Axolotl's published method, rebuilt here independently of tuneforge's masker: for each
assistant turn, tokenize the conversation up to that turn twice, once with the turn's content replaced by a
dummy string; the tokens between the first and the last difference are the turn's trained tokens, and the
first eos after them is trained too. So `content</s>` is trained, a token holding only the separator before
the content (`[/INST] `) or before the eos (Llama 2's `content </s>`) is not, and a token merging the
separator space with the content's first word (`▁Four`) is trained.
"""

from __future__ import annotations

import pytest

from chat_support import with_template_tokens
from test_chat_masking import _sentencepiece_like, encode
from tuneforge import chat_templates as ct
from tuneforge.data.formats import IGNORE_INDEX

TURNS = [
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six, of course."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You are welcome."},
]
SYSTEM = [{"role": "system", "content": "You are terse."}]
LLAMA2 = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ '<<SYS>>\\n' + m.content + "
          "'\\n<</SYS>>\\n\\n' }}{% elif m.role == 'user' %}{{ '[INST] ' + m.content.strip() + ' [/INST]' }}"
          "{% elif m.role == 'assistant' %}{{ ' ' + m.content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
# Templates that write the system prompt into the LAST user turn change earlier text when a turn is appended,
# which the dummy-diff method cannot follow; they are compared without a system prompt.
SYSTEM_LAST = ("mistral_v2v3", "mistral_v3_tekken", "pixtral")
INST = ("mistral", "mistral_v1", "mistral_v2v3", "mistral_v3_tekken", "mistral_v7_tekken", "pixtral", "llama2")


def axolotl_labels(tok, template: str, messages: list[dict]) -> tuple[list[int], list[int]]:
    def ids(msgs):
        return tok.apply_chat_template(msgs, chat_template=template, tokenize=True, return_dict=False)

    full = ids(messages)
    labels = [IGNORE_INDEX] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        dummy = ids(messages[:i] + [{"role": "assistant", "content": "[[dummy_message]]"}])
        real = ids(messages[: i + 1])
        assert full[: len(real)] == real  # the conversation up to this turn is a prefix of the whole
        start = next(k for k in range(min(len(dummy), len(real))) if dummy[k] != real[k])
        end = len(real) - next(k for k in range(min(len(dummy), len(real))) if dummy[-1 - k] != real[-1 - k])
        labels[start:end] = real[start:end]
        eos = next(k for k in range(end, len(full)) if full[k] == tok.eos_token_id)
        labels[eos] = full[eos]
    return full, labels


def _tokenizers(tiny_model_dir):
    from transformers import AutoTokenizer

    yield "byte-level", with_template_tokens(AutoTokenizer.from_pretrained(str(tiny_model_dir)))
    for scheme in ("first", "always"):
        yield f"sentencepiece-{scheme}", _sentencepiece_like(scheme)


@pytest.mark.parametrize("name", INST)
def test_inst_masks_equal_axolotls_on_multi_turn_data(tiny_model_dir, name):
    template = LLAMA2 if name == "llama2" else ct.template(name)
    top = {"chat_template_jinja": LLAMA2} if name == "llama2" else {"chat_template": name}
    for label, tok in _tokenizers(tiny_model_dir):
        for messages in ([TURNS] if name in SYSTEM_LAST else [TURNS, SYSTEM + TURNS]):
            out = encode(tok, {"messages": messages}, top=top)
            ids, labels = axolotl_labels(tok, template, messages)
            assert out["input_ids"] == ids, (label, name)
            assert out["labels"] == labels, (label, name)


def test_the_separator_alone_is_not_trained(tiny_model_dir):
    """The case the oracle pins, spelled out: the byte-level tokenizer keeps ` ` before `Four.` and before `</s>`
    as tokens of their own here, and neither is trained."""
    from transformers import AutoTokenizer

    tok = with_template_tokens(AutoTokenizer.from_pretrained(str(tiny_model_dir)))
    out = encode(tok, {"messages": TURNS[:2]}, top={"chat_template_jinja": LLAMA2})
    pieces = [(tok.decode([i]), label != IGNORE_INDEX) for i, label in zip(out["input_ids"], out["labels"], strict=True)]
    trained = "".join(text for text, t in pieces if t)
    assert trained.strip() == "Four.</s>"
    after_inst = pieces[[text for text, _ in pieces].index("[/INST]") + 1:]
    assert "".join(text for text, _ in after_inst) == " Four. </s>"
    spaces = [t for text, t in after_inst if not text.strip()]
    assert spaces and not any(spaces)  # the separator spaces exist as tokens and are untrained
