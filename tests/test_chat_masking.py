"""The `chat_template` format and turn-level masking: exact label vectors for every named template.

Expected labels come from an oracle independent of the implementation: hand-written trained strings are
located in the text that transformers renders, and the pieces between them are tokenized on their own.
Token ids are also compared with `apply_chat_template(tokenize=True)` and the mask with transformers'
`return_assistant_tokens_mask` on the templates' `{% generation %}` variants.
"""

from __future__ import annotations

import pytest

from chat_support import with_template_tokens
from tuneforge import chat_templates as ct
from tuneforge.config import load
from tuneforge.data import formats
from tuneforge.data.formats import IGNORE_INDEX, FormatContext, RowError
from tuneforge.data.masking import ChatMasker
from tuneforge.errors import DataError

EOT = {"chatml": "<|im_end|>", "qwen3": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>",
       "mistral": "</s>", "phi_3": "<|end|>"}
EOT |= {name: "</s>" if eot == ["eos"] else eot[0] for name, eot in ct._EOT.items() if name not in EOT}
NO_THINK = "<think>\n\n</think>\n\n"  # qwen3 writes an empty think block for answers after the last user turn
# Where a reply starts with a space after its header (the header is the generation prompt), that space is the
# reply's first character, as the model generates it.
SPACE_AFTER_HEADER = ("deepseek_v2", "llava", "jamba")
# [INST]-style templates with a space between [/INST] and the reply: tokens holding reply text are trained and a
# token of the space alone is not (Axolotl's masks); these are checked with the offset oracle below.
LEAD_SPACE = ("mistral_v1", "mistral_v2v3")
INST_NO_HEADER = ("mistral", "mistral_v3_tekken", "mistral_v7_tekken", "pixtral")  # [/INST]reply, no space


def answer(name: str, text: str, after_last_user: bool = True) -> str:
    """The trained text of a plain reply `text`, up to and including its end-of-turn token."""
    if name in ("qwen3", "qwen3_5") and after_last_user:
        text = NO_THINK + text
    if name in SPACE_AFTER_HEADER:
        text = " " + text
    if name.startswith("command_a"):
        text = "<|START_RESPONSE|>" + text + "<|END_RESPONSE|>"
    return text + EOT[name]

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six."},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_CHAT = [
    {"role": "system", "content": "Use tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "tool_calls": [  # no content at all, as OpenAI-style data often has
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21 degrees."},
]
CALL = {
    "chatml": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "qwen3": NO_THINK + '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
    "gemma": '```tool_call\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```',
    "phi_3": '[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
}
CALL |= {
    "qwen_25": CALL["chatml"], "falcon_h1": CALL["chatml"], "qwen3_5": CALL["qwen3"],
    "llama3_2_vision": CALL["llama3"], "llama4": CALL["llama3"],
    "mistral_v3_tekken": CALL["mistral"], "mistral_v7_tekken": CALL["mistral"],
    "mistral_v2v3": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',
    "gemma3": CALL["gemma"], "gemma3n": CALL["gemma"], "phi_35": CALL["phi_3"], "phi_4": CALL["phi_3"],
    "deepseek_v3": "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
                   '{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
    "cohere": 'Action: [{"tool_name": "get_weather", "parameters": {"city": "Paris"}}]',
    "aya": 'Action: [{"tool_name": "get_weather", "parameters": {"city": "Paris"}}]',
    "command_a_tool_use": '<|START_ACTION|>[{"tool_call_id": "0", "tool_name": "get_weather", '
                          '"parameters": {"city": "Paris"}}]<|END_ACTION|>',
    "jamba": ' <tool_calls>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_calls>',
    "exaone4": '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
}


@pytest.fixture(scope="session")
def chat_tok(tiny_model_dir):
    """The tiny tokenizer plus every marker our templates write, as a real model's tokenizer has them."""
    from transformers import AutoTokenizer

    return with_template_tokens(AutoTokenizer.from_pretrained(str(tiny_model_dir)))


# ---------------------------------------------------------------------------------------------- helpers
def row_fn(tok, *, top: dict | None = None, **entry):
    cfg = load(data={"base_model": "unused", "datasets": [{"path": "d.jsonl", "type": "chat_template", **entry}],
                     **(top or {})})
    fmt, _ = formats.resolve("chat_template")
    return fmt.builder(FormatContext(cfg=cfg, entry=cfg.datasets[0], tokenizer=tok))


def encode(tok, row, *, top=None, **entry) -> dict:
    out = row_fn(tok, top=top, **entry)(row)
    assert len(out) == 1
    assert len(out[0]["input_ids"]) == len(out[0]["labels"])
    return out[0]


def trained_runs(tok, out) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    runs, cur = [], []
    for i, label in zip(out["input_ids"], out["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == i
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def oracle(tok, text: str, trained: list[str]) -> tuple[list[int], list[int]]:
    """Expected (ids, labels): `trained` strings found in order in `text`, every piece tokenized alone."""
    ids: list[int] = []
    labels: list[int] = []

    def add(piece: str, train: bool) -> None:
        if piece:
            t = tok(piece, add_special_tokens=False)["input_ids"]
            ids.extend(t)
            labels.extend(t if train else [IGNORE_INDEX] * len(t))

    pos = 0
    for s in trained:
        at = text.index(s, pos)
        add(text[pos:at], False)
        add(s, True)
        pos = at + len(s)
    add(text[pos:], False)
    return ids, labels


def offset_oracle(tok, text: str, trained: list[str]) -> list[int]:
    """Expected labels of the whole-text tokenization: a token is trained when its characters overlap one of
    the `trained` strings (found in order), as Axolotl's masks work; a token of separator spaces alone is not."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ranges, pos = [], 0
    for s in trained:
        at = text.index(s, pos)
        ranges.append((at, at + len(s)))
        pos = at + len(s)
    return [i if any(a < end and b > start for start, end in ranges) else IGNORE_INDEX
            for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]


def hf_text(tok, template: str, messages, tools=None, **kw) -> str:
    clean = [{k: v for k, v in m.items() if v is not None} for m in messages]
    return tok.apply_chat_template(clean, tools=tools, chat_template=template, tokenize=False, **kw)


def hf_ids(tok, template: str, messages, tools=None) -> list[int]:
    clean = [{k: v for k, v in m.items() if v is not None} for m in messages]
    return tok.apply_chat_template(clean, tools=tools, chat_template=template, tokenize=True, return_dict=False)


def check_exact(tok, out, template, messages, trained, tools=None):
    if ct.name_of(template) in LEAD_SPACE:
        text = hf_text(tok, template, messages, tools)
        assert out["input_ids"] == hf_ids(tok, template, messages, tools)
        assert out["labels"] == offset_oracle(tok, text, trained)
        return
    ids, labels = oracle(tok, hf_text(tok, template, messages, tools), trained)
    assert out["input_ids"] == ids
    assert out["labels"] == labels
    assert trained_runs(tok, out) == trained


# ------------------------------------------------------------------------- every template, exact vectors
@pytest.mark.parametrize("name", ct.NAMES)
def test_multi_turn_with_system_exact_labels(chat_tok, name):
    out = encode(chat_tok, {"messages": CHAT}, top={"chat_template": name})
    expected = [answer(name, "Four.", after_last_user=False), answer(name, "Six.")]
    if name == "phi_35":  # a finished conversation ends with eos, the last turn's second terminator
        expected.append("</s>")
    check_exact(chat_tok, out, ct.template(name), CHAT, expected)
    # (b) nothing of the system/user turns or of the scaffolding is trained
    trained = "".join(trained_runs(chat_tok, out))
    for text in ("You are terse.", "two plus two", "three plus three", "user", "system", "assistant", "<s>",
                 "[INST]", "[/INST]", "USER", "ASSISTANT", "model"):
        assert text not in trained
    # (d) same ids as transformers' own tokenization of the whole conversation
    assert out["input_ids"] == hf_ids(chat_tok, ct.template(name), CHAT)


@pytest.mark.parametrize("name", ct.TOOL_NAMES)
def test_tool_call_conversation_exact_labels(chat_tok, name):
    out = encode(chat_tok, {"messages": TOOL_CHAT, "tools": TOOLS}, top={"chat_template": name})
    expected = [CALL[name] + EOT[name], answer(name, "It is 21 degrees.")]
    if name == "phi_35":
        expected.append("</s>")
    check_exact(chat_tok, out, ct.template(name), TOOL_CHAT, expected, TOOLS)
    trained = "".join(trained_runs(chat_tok, out))
    assert '"temp"' not in trained and "Weather of a city" not in trained and "Use tools." not in trained
    assert out["input_ids"] == hf_ids(chat_tok, ct.template(name), TOOL_CHAT, TOOLS)


@pytest.mark.parametrize("name", ct.NAMES)
@pytest.mark.parametrize("messages,tools", [(CHAT, None), (TOOL_CHAT, TOOLS), (CHAT[1:3], None)])
def test_mask_matches_transformers_assistant_mask(chat_tok, name, messages, tools):
    """(e) transformers marks the `{% generation %}` spans of the marked template variant."""
    if tools and name not in ct.TOOL_NAMES:
        pytest.skip("the template has no tool format")
    masker = ChatMasker(chat_tok, ct.template(name))
    ours = masker.encode(messages, [m["role"] == "assistant" for m in messages], tools)
    clean = [{k: v for k, v in m.items() if v is not None} for m in messages]
    ref = chat_tok.apply_chat_template(
        clean, tools=tools, chat_template=ct.template(name, generation_markers=True),
        tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
    )
    assert ours.input_ids == ref["input_ids"]
    assert [int(label != IGNORE_INDEX) for label in ours.labels] == ref["assistant_masks"]
    assert sum(ref["assistant_masks"]) > 0


# --------------------------------------------------------------------------------- train_on_eos / eot
@pytest.mark.parametrize("eos,eot,expected", [
    ("turn", None, ["Four.<|im_end|>", "Six.<|im_end|>"]),
    ("all", None, ["<|im_end|>", "<|im_end|>", "Four.<|im_end|>", "<|im_end|>", "Six.<|im_end|>"]),
    ("last", None, ["Four.", "Six.<|im_end|>"]),
    ("none", None, ["Four.", "Six."]),
    ("none", "turn", ["Four.<|im_end|>", "Six.<|im_end|>"]),  # <|im_end|> is an eot token: train_on_eot rules
    ("turn", "none", ["Four.", "Six."]),
    ("none", "all", ["<|im_end|>", "<|im_end|>", "Four.<|im_end|>", "<|im_end|>", "Six.<|im_end|>"]),
])
def test_train_on_eos_and_eot_modes_chatml(tiny_tokenizer, eos, eot, expected):
    entry = {"train_on_eos": eos} | ({"train_on_eot": eot} if eot else {})
    out = encode(tiny_tokenizer, {"messages": CHAT}, top={"chat_template": "chatml"}, **entry)
    check_exact(tiny_tokenizer, out, ct.template("chatml"), CHAT, expected)


@pytest.mark.parametrize("eos,expected", [
    ("turn", ["Four.</s>", "Six.</s>"]), ("all", ["Four.</s>", "Six.</s>"]),
    ("last", ["Four.", "Six.</s>"]), ("none", ["Four.", "Six."]),
])
def test_train_on_eos_modes_mistral_where_eos_closes_turns(tiny_tokenizer, eos, expected):
    out = encode(tiny_tokenizer, {"messages": CHAT}, top={"chat_template": "mistral"}, train_on_eos=eos)
    check_exact(tiny_tokenizer, out, ct.template("mistral"), CHAT, expected)


def test_eos_and_eot_follow_their_own_settings(tiny_tokenizer):
    """A template closing turns with <|im_end|> and ending the text with eos: each token has its own key."""
    template = ct.template("chatml") + "{%- if not add_generation_prompt %}{{- eos_token }}{%- endif %}"
    top = {"chat_template_jinja": template}
    cases = [
        ({"train_on_eos": "none", "train_on_eot": "turn"}, ["Four.<|im_end|>", "Six.<|im_end|>"]),
        ({"train_on_eos": "turn", "train_on_eot": "none"}, ["Four.", "Six.", "</s>"]),
        ({"train_on_eos": "turn"}, ["Four.<|im_end|>", "Six.<|im_end|>", "</s>"]),
    ]
    for entry, expected in cases:
        out = encode(tiny_tokenizer, {"messages": CHAT}, top=top, **entry)
        check_exact(tiny_tokenizer, out, template, CHAT, expected)


def test_configured_eot_tokens_replace_the_template_default(tiny_tokenizer, caplog):
    # With eot_tokens: [</s>] <|im_end|> is no terminator: the first answer has none (tuneforge says so
    # once, since the model would not learn to stop there) and the last one runs up to the final </s>.
    template = ct.template("chatml") + "{%- if not add_generation_prompt %}{{- eos_token }}{%- endif %}"
    with caplog.at_level("WARNING", logger="tuneforge"):
        out = encode(tiny_tokenizer, {"messages": CHAT}, top={"chat_template_jinja": template, "eot_tokens": ["</s>"]})
    check_exact(tiny_tokenizer, out, template, CHAT, ["Four.", "Six.<|im_end|>\n</s>"])
    assert "no end-of-turn token" in caplog.text
    with pytest.raises(DataError, match="eot_tokens: `<not a token>` is not a single token"):
        row_fn(tiny_tokenizer, top={"chat_template": "chatml", "eot_tokens": ["<not a token>"]})


def test_input_ids_do_not_depend_on_masking_choices(chat_tok):
    for name in ct.TOOL_NAMES:
        variants = [
            encode(chat_tok, {"messages": TOOL_CHAT, "tools": TOOLS}, top={"chat_template": name, **top}, **entry)
            for top, entry in [({}, {}), ({"train_on_inputs": True}, {}), ({}, {"train_on_eos": "all"}),
                               ({}, {"roles_to_train": ["user", "tool"], "train_on_eos": "none"})]
        ]
        assert all(v["input_ids"] == variants[0]["input_ids"] for v in variants)
        assert variants[1]["labels"] != variants[0]["labels"] != variants[3]["labels"]


# ------------------------------------------------------------------------------- which turns are trained
def test_roles_to_train_user_only(tiny_tokenizer):
    out = encode(tiny_tokenizer, {"messages": CHAT}, top={"chat_template": "llama3"}, roles_to_train=["user"])
    expected = ["What is two plus two?<|eot_id|>", "And three plus three?<|eot_id|>"]
    check_exact(tiny_tokenizer, out, ct.template("llama3"), CHAT, expected)


def test_roles_to_train_accepts_data_role_names(tiny_tokenizer):
    out = encode(tiny_tokenizer, {"messages": CHAT}, top={"chat_template": "chatml"}, roles_to_train=["human", "gpt"])
    expected = ["What is two plus two?<|im_end|>", "Four.<|im_end|>", "And three plus three?<|im_end|>",
                "Six.<|im_end|>"]
    check_exact(tiny_tokenizer, out, ct.template("chatml"), CHAT, expected)


def test_train_on_inputs_trains_every_turn_gemma_folded_system(tiny_tokenizer):
    out = encode(tiny_tokenizer, {"messages": CHAT}, top={"chat_template": "gemma", "train_on_inputs": True})
    # The system prompt lives inside the first user turn: it is trained, the "\n\n" joining them is not,
    # and the user turn's <end_of_turn> closes both.
    expected = ["You are terse.", "What is two plus two?<end_of_turn>", "Four.<end_of_turn>",
                "And three plus three?<end_of_turn>", "Six.<end_of_turn>"]
    check_exact(tiny_tokenizer, out, ct.template("gemma"), CHAT, expected)


def test_train_on_inputs_qwen3_grouped_tool_results(tiny_tokenizer):
    chat = [
        {"role": "user", "content": "Paris and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "content": "21C"},
        {"role": "tool", "content": "25C"},
        {"role": "assistant", "content": "Both warm.", "reasoning_content": "Compare."},
    ]
    out = encode(tiny_tokenizer, {"messages": chat}, top={"chat_template": "qwen3", "train_on_inputs": True})
    calls = (NO_THINK + '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>')
    # Two tool results share one user turn, so only the second one is followed by <|im_end|> (after the
    # untrained `\n</tool_response>` scaffolding).
    expected = ["Paris and Rome?<|im_end|>", calls, "21C", "25C", "<|im_end|>",
                "<think>\nCompare.\n</think>\n\nBoth warm.<|im_end|>"]
    check_exact(tiny_tokenizer, out, ct.template("qwen3"), chat, expected)
    assert out["input_ids"] == hf_ids(tiny_tokenizer, ct.template("qwen3"), chat)


def test_message_field_training_overrides_roles(tiny_tokenizer):
    chat = [dict(m) for m in CHAT]
    chat[2]["train"] = False  # first answer: not trained
    chat[3]["train"] = True  # second question: trained
    out = encode(tiny_tokenizer, {"messages": chat}, top={"chat_template": "phi_3"}, message_field_training="train")
    check_exact(tiny_tokenizer, out, ct.template("phi_3"), CHAT, ["And three plus three?<|end|>", "Six.<|end|>"])
    with pytest.raises(RowError, match="`train` \\(message_field_training\\) must be true or false"):
        chat[3]["train"] = "yes"
        encode(tiny_tokenizer, {"messages": chat}, top={"chat_template": "phi_3"}, message_field_training="train")


def test_drop_system_message_and_default_system_message(tiny_tokenizer):
    out = encode(tiny_tokenizer, {"messages": CHAT}, top={"chat_template": "chatml"}, drop_system_message=True)
    assert out["input_ids"] == hf_ids(tiny_tokenizer, ct.template("chatml"), CHAT[1:])
    check_exact(tiny_tokenizer, out, ct.template("chatml"), CHAT[1:], ["Four.<|im_end|>", "Six.<|im_end|>"])

    top = {"chat_template": "chatml", "default_system_message": "Be kind."}
    with_default = [{"role": "system", "content": "Be kind."}, *CHAT[1:]]
    out = encode(tiny_tokenizer, {"messages": CHAT[1:]}, top=top)
    assert out["input_ids"] == hf_ids(tiny_tokenizer, ct.template("chatml"), with_default)
    out = encode(tiny_tokenizer, {"messages": CHAT}, top=top)  # the row's own system prompt is kept
    assert out["input_ids"] == hf_ids(tiny_tokenizer, ct.template("chatml"), CHAT)
    out = encode(tiny_tokenizer, {"messages": CHAT}, top=top, drop_system_message=True)  # replaced
    assert out["input_ids"] == hf_ids(tiny_tokenizer, ct.template("chatml"), with_default)


def test_empty_user_turn_keeps_terminators_with_their_turns(tiny_tokenizer):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": ""}, {"role": "assistant", "content": "Bye"}]
    out = encode(tiny_tokenizer, {"messages": chat}, top={"chat_template": "chatml"})
    check_exact(tiny_tokenizer, out, ct.template("chatml"), chat, ["Hello<|im_end|>", "Bye<|im_end|>"])
    out = encode(tiny_tokenizer, {"messages": chat}, top={"chat_template": "chatml"}, train_on_eos="all")
    expected = ["<|im_end|>", "Hello<|im_end|>", "<|im_end|>", "Bye<|im_end|>"]
    check_exact(tiny_tokenizer, out, ct.template("chatml"), chat, expected)


# ------------------------------------------------------------------------------------ row shapes / keys
def test_sharegpt_rows_with_property_mappings_and_roles(tiny_tokenizer):
    convo = [{"from": "system", "value": "You are terse."}, {"from": "human", "value": "What is two plus two?"},
             {"from": "bot", "value": "Four."}]
    entry = {"field_messages": "conversations", "message_property_mappings": {"role": "from", "content": "value"},
             "roles": {"assistant": ["bot"]}}
    out = encode(tiny_tokenizer, {"conversations": convo}, top={"chat_template": "chatml"}, **entry)
    check_exact(tiny_tokenizer, out, ct.template("chatml"), CHAT[:3], ["Four.<|im_end|>"])
    # Without any configuration: `conversations` and from/value rows are recognised (gpt is an assistant).
    convo[2]["from"] = "gpt"
    out2 = encode(tiny_tokenizer, {"conversations": convo}, top={"chat_template": "chatml"})
    assert out2 == out


def test_extra_property_mapping_and_custom_field(tiny_tokenizer):
    chat = [{"who": "user", "text": "Weather in Paris?"},
            {"who": "assistant", "text": "", "calls": TOOL_CHAT[2]["tool_calls"]}]
    entry = {"field_messages": "dialog", "message_property_mappings": {"role": "who", "content": "text",
                                                                        "tool_calls": "calls"}}
    out = encode(tiny_tokenizer, {"dialog": chat}, top={"chat_template": "llama3"}, **entry)
    expected_chat = [{"role": "user", "content": "Weather in Paris?"},
                     {"role": "assistant", "content": "", "tool_calls": TOOL_CHAT[2]["tool_calls"]}]
    check_exact(tiny_tokenizer, out, ct.template("llama3"), expected_chat, [CALL["llama3"] + "<|eot_id|>"])


def test_tools_as_json_string(tiny_tokenizer):
    import json

    a = encode(tiny_tokenizer, {"messages": TOOL_CHAT, "tools": TOOLS}, top={"chat_template": "chatml"})
    b = encode(tiny_tokenizer, {"messages": TOOL_CHAT, "defs": json.dumps(TOOLS)}, top={"chat_template": "chatml"},
               field_tools="defs")
    assert a == b


@pytest.mark.parametrize("row,message", [
    ({"text": "hi"}, r"no `messages` field; the row has keys \['text'\]"),
    ({"messages": "hi"}, "must be a list of messages, got str"),
    ({"messages": []}, "empty conversation"),
    ({"messages": ["hi"]}, "message 0 is a str, not a dict"),
    ({"messages": [{"content": "hi"}]}, r"message 0 has no `role` \(its keys: \['content'\]\)"),
    ({"messages": [{"role": "user"}]}, "message 0 has no `content`"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
     r"message 1 has role `robot`, which is not a known role .*roles: \{assistant: \[robot\]\}"),
    ({"messages": [{"role": "user", "content": 5}]}, r"message 0 \(user\): `content` must be a string"),
    ({"messages": [{"role": "user", "content": None}]}, r"`content` must be a string"),
    ({"messages": [{"role": "user", "content": "a"}], "tools": "{oops"}, "`tools` is a string but not valid JSON"),
    ({"messages": [{"role": "user", "content": "a"}], "tools": 3}, "`tools` must be a list"),
])
def test_bad_rows_raise_row_errors(tiny_tokenizer, row, message):
    fn = row_fn(tiny_tokenizer, top={"chat_template": "chatml"})
    with pytest.raises(RowError, match=message):
        fn(row)


def test_roles_to_train_typo_is_an_error(tiny_tokenizer):
    with pytest.raises(DataError, match="roles_to_train names `asistant`.*Did you mean `assistant`"):
        row_fn(tiny_tokenizer, top={"chat_template": "chatml"}, roles_to_train=["asistant"])
    # A role added under `roles:` may be trained by its canonical name.
    out = encode(tiny_tokenizer, {"messages": [*CHAT[:2], {"role": "critic", "content": "Fine."}]},
                 top={"chat_template": "chatml"}, roles={"reviewer": ["critic"]}, roles_to_train=["reviewer"])
    assert trained_runs(tiny_tokenizer, out) == ["Fine.<|im_end|>"]


def test_row_function_pickles_for_worker_processes(tiny_tokenizer):
    import pickle

    fn = row_fn(tiny_tokenizer, top={"chat_template": "qwen3"}, train_on_eos="all")
    clone = pickle.loads(pickle.dumps(fn))
    row = {"messages": TOOL_CHAT, "tools": TOOLS}
    assert clone(row) == fn(row)


def test_trained_content_missing_from_the_rendering_is_an_error(tiny_tokenizer):
    # This template never renders system messages.
    template = "{% for m in messages %}{% if m.role != 'system' %}{{ m.role + ': ' + m.content + eos_token }}" \
               "{% endif %}{% endfor %}"
    fn = row_fn(tiny_tokenizer, top={"chat_template_jinja": template}, roles_to_train=["system", "assistant"])
    with pytest.raises(RowError, match=r"message 0 \(system\) is to be trained, but its content does not appear"):
        fn({"messages": CHAT})
    # Not trained: simply absent.
    out = encode(tiny_tokenizer, {"messages": CHAT}, top={"chat_template_jinja": template})
    assert trained_runs(tiny_tokenizer, out) == ["Four.</s>", "Six.</s>"]


def test_missing_template_is_a_clear_error(tiny_model_dir):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(DataError, match="needs a chat template, but the tokenizer has none"):
        row_fn(bare)
    with pytest.raises(DataError, match="unknown template `lama3`.*Did you mean `llama3`"):
        row_fn(bare, chat_template="lama3")


# ---------------------------------------------------------------------------- templates and tokenizers
def test_per_dataset_template_overrides_the_top_level_one(write_config, tiny_model_dir):
    from tuneforge.models.tokenizer import load_tokenizer

    cfg = load(data={"base_model": str(tiny_model_dir), "chat_template": "chatml",
                     "datasets": [{"path": "a.jsonl", "type": "chat_template"},
                                  {"path": "b.jsonl", "type": "chat_template", "chat_template": "llama3"}]})
    tok = load_tokenizer(cfg)
    assert tok.chat_template == ct.template("chatml")
    fmt, _ = formats.resolve("chat_template")
    a = fmt.builder(FormatContext(cfg=cfg, entry=cfg.datasets[0], tokenizer=tok))({"messages": CHAT})[0]
    b = fmt.builder(FormatContext(cfg=cfg, entry=cfg.datasets[1], tokenizer=tok))({"messages": CHAT})[0]
    assert a["input_ids"] == hf_ids(tok, ct.template("chatml"), CHAT)
    assert b["input_ids"] == hf_ids(tok, ct.template("llama3"), CHAT)
    assert trained_runs(tok, b) == ["Four.<|eot_id|>", "Six.<|eot_id|>"]  # llama3's own eot token
    assert tok.chat_template == ct.template("chatml")  # the override is for that dataset only


def test_tokenizer_template_is_used_when_nothing_is_configured(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = ct.template("gemma")
    out = encode(tok, {"messages": CHAT})
    check_exact(tok, out, ct.template("gemma"), CHAT, ["Four.<end_of_turn>", "Six.<end_of_turn>"])


def test_enable_thinking_false_keeps_the_empty_think_block_in_the_prompt(tiny_tokenizer):
    top = {"chat_template": "qwen3", "chat_template_kwargs": {"enable_thinking": False}}
    out = encode(tiny_tokenizer, {"messages": CHAT}, top=top)
    # The generation prompt already holds the empty think block, so it is prompt, not answer.
    check_exact(tiny_tokenizer, out, ct.template("qwen3"), CHAT, ["Four.<|im_end|>", "Six.<|im_end|>"])


def test_pieces_follow_generation_time_boundaries_where_whole_text_tokenization_differs(tiny_tokenizer):
    """(d) where boundaries do not coincide: a prompt ending in a space.

    With `assistant: ` as the generation prompt the model sees the space as its own token when it
    generates, but tokenizing the whole conversation merges it into the answer's first word. tuneforge
    keeps the generation-time split, so its ids differ from `apply_chat_template` there and only there.
    """
    template = ("{% for m in messages %}{{ m.role + ': ' + m.content + eos_token + '\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    chat = [CHAT[1], {"role": "assistant", "content": "the end"}]  # " the" is one token, "the" another
    masker = ChatMasker(tiny_tokenizer, template)
    enc = masker.encode_completion(chat[:1], chat[1])
    prompt = tiny_tokenizer(hf_text(tiny_tokenizer, template, chat[:1], add_generation_prompt=True),
                            add_special_tokens=False)["input_ids"]
    assert enc.input_ids[: enc.prompt_len] == prompt
    assert tiny_tokenizer.decode(enc.input_ids) == hf_text(tiny_tokenizer, template, chat)
    whole = hf_ids(tiny_tokenizer, template, chat)
    assert enc.input_ids != whole
    assert enc.input_ids[: enc.prompt_len - 1] == whole[: enc.prompt_len - 1]  # same up to the space
    assert trained_runs(tiny_tokenizer, {"input_ids": enc.input_ids, "labels": enc.labels}) == ["the end</s>"]


@pytest.mark.parametrize("name", ct.NAMES)
def test_encode_completion_for_preference_formats(chat_tok, name):
    masker = ChatMasker(chat_tok, ct.template(name))
    prompt, completion = CHAT[:4], CHAT[4]
    enc = masker.encode_completion(prompt, completion)
    prompt_ids = chat_tok.apply_chat_template(prompt, chat_template=ct.template(name), tokenize=True,
                                              add_generation_prompt=True, return_dict=False)
    assert enc.input_ids[: enc.prompt_len] == prompt_ids
    assert all(label == IGNORE_INDEX for label in enc.labels[: enc.prompt_len])
    out = {"input_ids": enc.input_ids, "labels": enc.labels}
    expected = [answer(name, "Six.")] + (["</s>"] if name == "phi_35" else [])
    if name in LEAD_SPACE:
        assert enc.labels == offset_oracle(chat_tok, hf_text(chat_tok, ct.template(name), CHAT), expected)
    else:
        assert trained_runs(chat_tok, out) == expected
        assert enc.labels[enc.prompt_len] != IGNORE_INDEX


def _sentencepiece_like(scheme: str):
    """A Metaspace (SentencePiece-style) BPE tokenizer that adds a prefix space, as Llama 2/Mistral v1 do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tuneforge.tiny import SPECIAL_TOKENS, _corpus

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
    tk.train_from_iterator(_corpus(800), trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                                             show_progress=False))
    return with_template_tokens(PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:]))


@pytest.mark.parametrize("scheme", ["first", "always"])
def test_prefix_space_tokenizers_match_apply_chat_template(scheme):
    tok = _sentencepiece_like(scheme)
    for name in ct.NAMES:
        for messages, tools in [(CHAT, None), (TOOL_CHAT, TOOLS)] if name in ct.TOOL_NAMES else [(CHAT, None)]:
            out = encode(tok, {"messages": messages, "tools": tools}, top={"chat_template": name})
            assert out["input_ids"] == hf_ids(tok, ct.template(name), messages, tools), (scheme, name)
            ref = tok.apply_chat_template(
                [{k: v for k, v in m.items() if v is not None} for m in messages], tools=tools,
                chat_template=ct.template(name, True), return_dict=True, return_assistant_tokens_mask=True)
            mask = ref["assistant_masks"]
            if scheme == "always" and name in INST_NO_HEADER:
                # The `▁` this tokenizer inserts after [/INST] is a token of its own here: transformers' character
                # mask trains it with the reply, Axolotl's token diff does not, and tuneforge follows Axolotl
                # (test_chat_masking_inst.py checks those masks exactly). Everything else agrees.
                spaces = [k for k, i in enumerate(out["input_ids"]) if mask[k] and not tok.decode([i]).strip()
                          and (k == 0 or not mask[k - 1])]
                assert spaces, (scheme, name)
                mask = [0 if k in spaces else m for k, m in enumerate(mask)]
            assert [int(x != IGNORE_INDEX) for x in out["labels"]] == mask, (scheme, name)


@pytest.mark.parametrize("name", ["pixtral", "mistral_v2v3", "mistral_v3_tekken"])
def test_system_prompt_in_the_last_user_turn_is_masked_on_its_own(chat_tok, name):
    """These templates write the system prompt into the last user turn, after earlier replies; with every turn
    trained it is trained where it stands, and the earlier replies keep their own spans."""
    out = encode(chat_tok, {"messages": CHAT}, top={"chat_template": name, "train_on_inputs": True})
    text = hf_text(chat_tok, ct.template(name), CHAT)
    assert text.index("Four.") < text.index("You are terse.")
    expected = ["What is two plus two?", "Four.</s>", "You are terse.", "And three plus three?", "Six.</s>"]
    if name in LEAD_SPACE:
        assert out["labels"] == offset_oracle(chat_tok, text, expected)
    else:
        check_exact(chat_tok, out, ct.template(name), CHAT, expected)
    out = encode(chat_tok, {"messages": CHAT}, top={"chat_template": name})
    assert "terse" not in "".join(trained_runs(chat_tok, out))
