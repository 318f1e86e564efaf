"""Named chat templates: exact rendering, generation markers, template resolution and eot tokens."""

from __future__ import annotations

from pathlib import Path

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
    # Axolotl's template names, each in its family's layout (checked against the families' own templates):
    "alpaca": '<s>Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n### Instruction:\nBye\n\n### Response:\n',
    "mistral_v1": '<s> [INST] Be brief.\n\nHi [/INST] Hello!</s> [INST] Bye [/INST]',
    "mistral_v2v3": '<s>[INST] Hi[/INST] Hello!</s>[INST] Be brief.\n\nBye[/INST]',
    "mistral_v3_tekken": '<s>[INST]Hi[/INST]Hello!</s>[INST]Be brief.\n\nBye[/INST]',
    "mistral_v7_tekken": '<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]Hi[/INST]Hello!</s>[INST]Bye[/INST]',
    "pixtral": '<s>[INST]Hi[/INST]Hello!</s>[INST]Be brief.\n\nBye[/INST]',
    "llama3_2_vision": '<s><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n',
    "llama4": '<s><|header_start|>system<|header_end|>\n\nBe brief.<|eot|><|header_start|>user<|header_end|>\n\nHi<|eot|><|header_start|>assistant<|header_end|>\n\nHello!<|eot|><|header_start|>user<|header_end|>\n\nBye<|eot|><|header_start|>assistant<|header_end|>\n\n',
    "qwen_25": '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n',
    "qwen3_5": '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n',
    "qwen2_vl": '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n',
    "gemma3": '<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n',
    "gemma3n": '<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n',
    "gemma4": '<s><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n<|turn>user\nBye<turn|>\n<|turn>model\n<|channel>thought\n<channel|>',
    "phi_35": '<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\nBye<|end|>\n<|assistant|>\n',
    "phi_4": '<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>assistant<|im_sep|>Hello!<|im_end|><|im_start|>user<|im_sep|>Bye<|im_end|><|im_start|>assistant<|im_sep|>',
    "deepseek_v2": '<s>Be brief.\n\nUser: Hi\n\nAssistant: Hello!</s>User: Bye\n\nAssistant:',
    "deepseek_v3": '<s>Be brief.<｜User｜>Hi<｜Assistant｜>Hello!</s><｜User｜>Bye<｜Assistant｜>',
    "cohere": '<s><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Be brief.<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Hello!<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Bye<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>',
    "aya": '<s><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Be brief.<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Hello!<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Bye<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>',
    "command_a": '<s><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Be brief.<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|><|START_RESPONSE|>Hello!<|END_RESPONSE|><|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Bye<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>',
    "command_a_tool_use": '<s><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Be brief.<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|><|START_RESPONSE|>Hello!<|END_RESPONSE|><|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Bye<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>',
    "command_a_rag": '<s><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Be brief.<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|><|START_RESPONSE|>Hello!<|END_RESPONSE|><|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Bye<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>',
    "falcon_h1": '<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n',
    "nemotron_h": '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n',
    "jamba": '<s><|bom|><|system|> Be brief.<|eom|><|bom|><|user|> Hi<|eom|><|bom|><|assistant|> Hello!<|eom|><|bom|><|user|> Bye<|eom|><|bom|><|assistant|>',
    "exaone": '[|system|]Be brief.[|endofturn|]\n[|user|]Hi\n[|assistant|]Hello![|endofturn|]\n[|user|]Bye\n[|assistant|]',
    "exaone4": '[|system|]\nBe brief.[|endofturn|]\n[|user|]\nHi[|endofturn|]\n[|assistant|]\n<think>\n\n</think>\n\nHello![|endofturn|]\n[|user|]\nBye[|endofturn|]\n[|assistant|]\n<think>\n\n</think>\n\n',
    "metharme": '<s><|system|>Be brief.<|user|>Hi<|model|>Hello!</s><|user|>Bye<|model|>',
    "llava": 'Be brief. USER: Hi ASSISTANT: Hello!</s>USER: Bye ASSISTANT:',
}


@pytest.mark.parametrize("name", ct.NAMES)
def test_exact_rendering_with_system_and_generation_prompt(tiny_tokenizer, name):
    assert render(tiny_tokenizer, name, CHAT, add_generation_prompt=True) == EXPECTED[name]
    # Without the generation prompt the text is the same minus the assistant header.
    plain = render(tiny_tokenizer, name, CHAT)
    if name == "phi_35":  # a finished conversation ends with eos (test_family_details)
        plain = plain.removesuffix("</s>")
    assert EXPECTED[name].startswith(plain) and len(plain) <= len(EXPECTED[name])


@pytest.mark.parametrize("name", ct.NAMES)
@pytest.mark.parametrize("messages,tools", [(CHAT, None), (TOOL_CHAT, TOOLS), (CHAT[1:], TOOLS)])
def test_generation_markers_do_not_change_the_text(tiny_tokenizer, name, messages, tools):
    if tools and name not in ct.TOOL_NAMES:
        messages, tools = [m for m in messages if "tool_calls" not in m and m["role"] != "tool"], None
    marked = ct.template(name, generation_markers=True)
    assert "{% generation %}" in marked and "{% generation %}" not in ct.template(name)
    assert render(tiny_tokenizer, name, messages, True, tools=tools) == render(tiny_tokenizer, name, messages, tools=tools)


@pytest.mark.parametrize("name", ct.TOOL_NAMES)
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


def test_every_axolotl_template_name_is_known():
    """Axolotl's `chat_template` names (its schema enum, less `jinja` and `tokenizer_default`, which resolve()
    handles, and gemma4_unified, which is not written yet) are all templates here."""
    axolotl = {"alpaca", "chatml", "mistral_v1", "mistral_v2v3", "mistral_v3_tekken", "mistral_v7_tekken", "gemma",
               "cohere", "llama3", "llama3_2_vision", "llama4", "phi_3", "phi_35", "deepseek_v2", "deepseek_v3",
               "jamba", "qwen_25", "qwen3", "qwen3_5", "falcon_h1", "nemotron_h", "exaone", "exaone4", "metharme",
               "pixtral", "llava", "qwen2_vl", "gemma3", "gemma3n", "gemma4", "command_a", "command_a_tool_use",
               "command_a_rag", "aya"}
    assert axolotl <= set(ct.NAMES)
    assert set(ct.TOOL_NAMES) <= set(ct.NAMES)
    for name in ct.NAMES:  # each is a file of its own, not code
        assert (Path(ct.__file__).parent / f"{name}.jinja").is_file()


@pytest.mark.parametrize("name", [n for n in ct.NAMES if n not in ct.TOOL_NAMES])
def test_templates_without_a_tool_format_render_plain_chats(tiny_tokenizer, name):
    text = render(tiny_tokenizer, name, CHAT[1:3])
    assert "Hi" in text and "Hello!" in text and "get_weather" not in text


def test_family_details(tiny_tokenizer):
    # mistral_v2v3 / v3_tekken / pixtral: the system prompt (and tools) precede the LAST user message.
    for name in ("mistral_v2v3", "mistral_v3_tekken"):
        text = render(tiny_tokenizer, name, TOOL_CHAT[:1] + [{"role": "user", "content": "Now?"}], tools=TOOLS)
        assert text.index("[AVAILABLE_TOOLS]") > text.index("Weather?")
    # llava and deepseek_v2: a reply follows its header after a space; the prompt ends at the header.
    assert render(tiny_tokenizer, "llava", CHAT[1:3]) == "USER: Hi ASSISTANT: Hello!</s>"
    assert render(tiny_tokenizer, "deepseek_v2", CHAT[1:3]) == "<s>User: Hi\n\nAssistant: Hello!</s>"
    # phi_35 closes a finished conversation with eos; a generation prompt replaces it.
    assert render(tiny_tokenizer, "phi_35", CHAT[1:3]).endswith("<|end|>\n</s>")
    # llama3_2_vision: the date line follows `date_string`; image parts are <|image|>.
    text = render(tiny_tokenizer, "llama3_2_vision", [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What is it?"}]}], date_string="1 Jan 2025")
    assert "Today Date: 1 Jan 2025" in text and "<|image|>What is it?<|eot_id|>" in text
    # exaone4: reasoning is shown with skip_think=false for answers after the last user message.
    text = render(tiny_tokenizer, "exaone4", TOOL_CHAT, tools=TOOLS, skip_think=False)
    assert "[|assistant|]\n<think>\nTool says 21.\n</think>\n\nWarm.[|endofturn|]" in text
    # command_a_rag lists documents; command_a_tool_use writes calls as an action list.
    text = render(tiny_tokenizer, "command_a_rag", CHAT[1:3], documents=[{"title": "Geo", "text": "Paris is in France."}])
    assert '<document id="0">Geo\nParis is in France.</document>' in text
    text = render(tiny_tokenizer, "command_a_tool_use", TOOL_CHAT, tools=TOOLS)
    assert ('<|START_ACTION|>[{"tool_call_id": "0", "tool_name": "get_weather", "parameters": {"city": "Paris"}}]'
            '<|END_ACTION|><|END_OF_TURN_TOKEN|>') in text
