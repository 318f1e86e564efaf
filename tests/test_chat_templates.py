"""Named chat templates: exact rendering, generation markers, template resolution and eot tokens."""

from __future__ import annotations

import pytest

from tuneforge import chat_templates as ct
from tuneforge.errors import TuneforgeError

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
TOOL_CHAT = [
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                           "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "21C"},
    {"role": "assistant", "content": "Warm.", "reasoning_content": "Tool says 21."},
]


def render(tok, name, messages, markers=False, **kw):
    return tok.apply_chat_template(messages, chat_template=ct.template(name, markers), tokenize=False, **kw)


# The exact text each template writes for CHAT plus a generation prompt: pins every family's layout.
EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
    "qwen3": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
             "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s>[INST]Be brief.\n\nHi[/INST]Hello!</s>[INST]Bye[/INST]",
    "gemma": "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
             "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n",
    "phi_3": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"
             "<|user|>\nBye<|end|>\n<|assistant|>\n",
}


@pytest.mark.parametrize("name", ct.NAMES)
def test_exact_rendering_with_system_and_generation_prompt(tiny_tokenizer, name):
    assert render(tiny_tokenizer, name, CHAT, add_generation_prompt=True) == EXPECTED[name]
    # Without the generation prompt the text is the same minus the assistant header.
    plain = render(tiny_tokenizer, name, CHAT)
    assert EXPECTED[name].startswith(plain) and len(plain) <= len(EXPECTED[name])


@pytest.mark.parametrize("name", ct.NAMES)
@pytest.mark.parametrize("messages,tools", [(CHAT, None), (TOOL_CHAT, TOOLS), (CHAT[1:], TOOLS)])
def test_generation_markers_do_not_change_the_text(tiny_tokenizer, name, messages, tools):
    marked = ct.template(name, generation_markers=True)
    assert "{% generation %}" in marked and "{% generation %}" not in ct.template(name)
    assert render(tiny_tokenizer, name, messages, True, tools=tools) == render(tiny_tokenizer, name, messages, tools=tools)


@pytest.mark.parametrize("name", ct.NAMES)
def test_tools_calls_and_results_are_rendered(tiny_tokenizer, name):
    text = render(tiny_tokenizer, name, TOOL_CHAT, tools=TOOLS)
    assert '"name": "get_weather"' in text  # the definition and the call both name the function
    assert '{"city": "Paris"}' in text
    assert "21C" in text and "Warm." in text
    assert text.count("get_weather") == 2


def test_gemma_folds_the_system_prompt_into_the_first_user_turn(tiny_tokenizer):
    text = render(tiny_tokenizer, "gemma", CHAT)
    assert "system" not in text
    assert text.startswith("<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n")


def test_qwen3_reasoning_and_enable_thinking(tiny_tokenizer):
    text = render(tiny_tokenizer, "qwen3", TOOL_CHAT, tools=TOOLS)
    # Both assistant turns follow the last user message, so both show a think block.
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n" in text
    assert "<think>\nTool says 21.\n</think>\n\nWarm.<|im_end|>" in text
    assert "<|im_start|>user\n<tool_response>\n21C\n</tool_response><|im_end|>\n" in text
    # An answer before a later user message loses its reasoning.
    chat = [{"role": "user", "content": "A"}, {"role": "assistant", "content": "<think>hm</think>B"},
            {"role": "user", "content": "C"}]
    assert "<|im_start|>assistant\nB<|im_end|>" in render(tiny_tokenizer, "qwen3", chat)
    off = render(tiny_tokenizer, "qwen3", CHAT, add_generation_prompt=True, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_resolve_named_alias_and_unknown(tiny_tokenizer):
    for name in ct.NAMES:
        assert ct.resolve(name, None, tiny_tokenizer) == ct.template(name)
    assert ct.resolve("phi", None, tiny_tokenizer) == ct.template("phi_3")
    assert ct.resolve(None, None, tiny_tokenizer) is None
    with pytest.raises(TuneforgeError, match="unknown template `chatlm`.*Did you mean `chatml`"):
        ct.resolve("chatlm", None, tiny_tokenizer)


def test_resolve_tokenizer_default_and_fallback(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(tiny_model_dir)  # saved without a chat template
    assert bare.chat_template is None
    with pytest.raises(TuneforgeError, match="tokenizer has no chat template"):
        ct.resolve("tokenizer_default", None, bare)
    assert ct.resolve("tokenizer_default_fallback_llama3", None, bare) == ct.template("llama3")
    with pytest.raises(TuneforgeError, match="unknown template `nope`"):
        ct.resolve("tokenizer_default_fallback_nope", None, bare)

    own = "{% for m in messages %}{{ m.content }}{% endfor %}"
    tok = bare
    tok.chat_template = own
    tok.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert ct.resolve("tokenizer_default", None, tok) == own
    assert ct.resolve("tokenizer_default_fallback_chatml", None, tok) == own
    tok.chat_template = ct.template("chatml")  # as load_tokenizer does for a top-level chat_template
    assert ct.resolve("tokenizer_default", None, tok) == own  # the saved template, not the replacement


def test_resolve_jinja_inline_file_and_conflicts(tiny_tokenizer, tmp_path):
    inline = "{{ messages[0].content }}"
    assert ct.resolve("jinja", inline, tiny_tokenizer) == inline
    assert ct.resolve(None, inline, tiny_tokenizer) == inline  # a bare chat_template_jinja implies jinja
    (tmp_path / "t.jinja").write_text(inline + "!")
    assert ct.resolve(None, "t.jinja", tiny_tokenizer, tmp_path) == inline + "!"  # relative to the config
    assert ct.resolve("jinja", str(tmp_path / "t.jinja"), tiny_tokenizer) == inline + "!"
    with pytest.raises(TuneforgeError, match="missing.jinja"):
        ct.resolve(None, "missing.jinja", tiny_tokenizer, tmp_path)
    with pytest.raises(TuneforgeError, match="needs chat_template_jinja"):
        ct.resolve("jinja", None, tiny_tokenizer)
    with pytest.raises(TuneforgeError, match="both set"):
        ct.resolve("chatml", inline, tiny_tokenizer)


def test_load_tokenizer_applies_the_named_template(write_config):
    from tuneforge.config import load
    from tuneforge.models.tokenizer import load_tokenizer

    cfg = load(write_config({"chat_template": "gemma"}))
    assert load_tokenizer(cfg).chat_template == ct.template("gemma")
    cfg = load(write_config({"chat_template_jinja": "{{ 'x' }}"}, name="b.yaml"))
    assert load_tokenizer(cfg).chat_template == "{{ 'x' }}"


def test_eot_tokens_for(tiny_tokenizer):
    expected = {"chatml": ["<|im_end|>"], "qwen3": ["<|im_end|>"], "llama3": ["<|eot_id|>"],
                "gemma": ["<end_of_turn>"], "mistral": ["</s>"], "phi_3": ["<|end|>"]}
    for name, eot in expected.items():
        assert ct.eot_tokens_for(name, tiny_tokenizer) == eot
        assert ct.eot_tokens_for(ct.template(name), tiny_tokenizer) == eot  # recognised by its text
        assert ct.eot_tokens_for(ct.template(name, True), tiny_tokenizer) == eot
    assert ct.eot_tokens_for("phi", tiny_tokenizer) == ["<|end|>"]
    # A template we did not write: the known terminators it contains, else eos.
    assert ct.eot_tokens_for("{{ '<|eot_id|>' }}", tiny_tokenizer) == ["<|eot_id|>"]
    assert ct.eot_tokens_for("{{ 'User: ' }}", tiny_tokenizer) == ["</s>"]
