"""SFT formats: alpaca (and styles), oasst/gpteacher/jeopardy, user-defined dict types, input_output,
completion, and `type: module.function`.

Every expected vector is built from independent tokenizer calls on the literal prompt text written in
this file, never from the format's own helpers.
"""

from __future__ import annotations

import pytest

from tuneforge.config import load
from tuneforge.data import formats
from tuneforge.data.formats import IGNORE_INDEX, FormatContext, RowError
from tuneforge.errors import DataError

M = IGNORE_INDEX
NO_INPUT_SYS = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
INPUT_SYS = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


@pytest.fixture(scope="module")
def bos_tokenizer(tiny_model_dir):
    """The tiny tokenizer configured to add BOS, like Llama's."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir), add_bos_token=True)
    assert tok("a")["input_ids"][0] == tok.bos_token_id  # the premise of the BOS tests
    return tok


def row_fn(tokenizer, type_, **cfg_keys):
    entry = {"path": "data.jsonl", "type": type_}
    for key in ("field",):
        if key in cfg_keys:
            entry[key] = cfg_keys.pop(key)
    cfg = load(data={"base_model": "unused", "datasets": [entry], **cfg_keys})
    fmt, style = formats.resolve(cfg.datasets[0].type)
    return fmt.builder(FormatContext(cfg=cfg, entry=cfg.datasets[0], tokenizer=tokenizer, style=style))


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def tok_id(tok, token):
    i = tok.convert_tokens_to_ids(token)
    assert i is not None and i != tok.unk_token_id
    return i


def expected(tok, prompt, response, end, *, bos=False, train_on_inputs=False):
    p = tok(prompt)["input_ids"] if bos else ids(tok, prompt)
    r = ids(tok, response) + end
    return p + r, (p if train_on_inputs else [M] * len(p)) + r


# ---------------------------------------------------------------- alpaca
def test_alpaca_no_input_masks_prompt_and_trains_output_and_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    [out] = row_fn(tok, "alpaca")({"instruction": "Name a color.", "input": "", "output": "Blue sky."})
    prompt = f"{NO_INPUT_SYS}\n\n### Instruction:\nName a color.\n\n### Response:\n"
    want_ids, want_labels = expected(tok, prompt, "Blue sky.", [tok.eos_token_id])
    assert out["input_ids"] == want_ids
    assert out["labels"] == want_labels
    assert tok.decode(out["input_ids"]) == prompt + "Blue sky.</s>"
    trained = [t for t in out["labels"] if t != M]
    assert trained == ids(tok, "Blue sky.") + [tok.eos_token_id]


def test_alpaca_with_input_and_bos(bos_tokenizer):
    tok = bos_tokenizer
    row = {"instruction": "Add the numbers.", "input": "12 + 30", "output": "42"}
    [out] = row_fn(tok, "alpaca")(row)
    prompt = f"{INPUT_SYS}\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n12 + 30\n\n### Response:\n"
    want_ids, want_labels = expected(tok, prompt, "42", [tok.eos_token_id], bos=True)
    assert out["input_ids"][0] == tok.bos_token_id and out["labels"][0] == M
    assert (out["input_ids"], out["labels"]) == (want_ids, want_labels)


def test_alpaca_train_on_inputs_trains_everything(bos_tokenizer):
    tok = bos_tokenizer
    [out] = row_fn(tok, "alpaca", train_on_inputs=True)({"instruction": "Say hi.", "output": "hello"})
    prompt = f"{NO_INPUT_SYS}\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    want_ids, _ = expected(tok, prompt, "hello", [tok.eos_token_id], bos=True)
    assert out["input_ids"] == want_ids
    assert out["labels"] == out["input_ids"]


def test_alpaca_boundary_is_tokenized_apart(tiny_tokenizer):
    # "### Response:\n" + "\n\nx" tokenized together would merge the newlines; we keep them apart.
    tok = tiny_tokenizer
    [out] = row_fn(tok, "alpaca")({"instruction": "a", "output": "\n\nx"})
    prompt = f"{NO_INPUT_SYS}\n\n### Instruction:\na\n\n### Response:\n"
    n_prompt = len(ids(tok, prompt))
    assert out["input_ids"][n_prompt:] == ids(tok, "\n\nx") + [tok.eos_token_id]
    assert out["labels"][:n_prompt] == [M] * n_prompt


STYLE_CASES = {
    "chatml": (
        f"<|im_start|>system\n{INPUT_SYS}<|im_end|>\n<|im_start|>user\nAdd.\n1 + 2<|im_end|>\n<|im_start|>assistant\n",
        "<|im_end|>",
    ),
    "llama3": (
        f"<|start_header_id|>system<|end_header_id|>\n\n{INPUT_SYS}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAdd.\n\n1 + 2<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>",
    ),
    "phi": (f"<|system|>\n{INPUT_SYS}<|end|>\n<|user|>\nAdd.\n1 + 2<|end|>\n<|assistant|>\n", "<|end|>"),
    "chat": (f"SYSTEM: {INPUT_SYS}\nUSER: Add.\n1 + 2\nASSISTANT:", None),
}


@pytest.mark.parametrize("style", sorted(STYLE_CASES))
def test_alpaca_styles(tiny_tokenizer, style):
    tok = tiny_tokenizer
    prompt, end_token = STYLE_CASES[style]
    end = [tok_id(tok, end_token)] if end_token else [tok.eos_token_id]
    [out] = row_fn(tok, f"alpaca:{style}")({"instruction": "Add.", "input": "1 + 2", "output": "3"})
    assert (out["input_ids"], out["labels"]) == expected(tok, prompt, "3", end)
    if end_token:  # the turn is closed by the template's marker, not by the tokenizer's EOS
        assert tok.eos_token_id not in out["input_ids"]
        assert out["labels"][-1] == end[0]


def test_alpaca_chatml_without_input(tiny_tokenizer):
    tok = tiny_tokenizer
    [out] = row_fn(tok, "alpaca:chatml")({"instruction": "Hi", "output": "hello"})
    prompt = f"<|im_start|>system\n{NO_INPUT_SYS}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert (out["input_ids"], out["labels"]) == expected(tok, prompt, "hello", [tok_id(tok, "<|im_end|>")])


def test_alpaca_unknown_style_lists_known(tiny_tokenizer):
    with pytest.raises(DataError, match=r"unknown prompt style `chatlm`.*chatml.*llama3"):
        row_fn(tiny_tokenizer, "alpaca:chatlm")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"input": "x", "output": "y"}, r"missing field `instruction` \(the row has: input, output\)"),
        ({"instruction": "x", "output": 7}, r"field `output` must be text, got int"),
        ({"instruction": "x", "output": "  "}, r"field `output` is empty"),
        ({"instruction": "x", "input": ["a"], "output": "y"}, r"field `input` must be text, got list"),
    ],
)
def test_alpaca_bad_rows(tiny_tokenizer, row, message):
    with pytest.raises(RowError, match=message):
        row_fn(tiny_tokenizer, "alpaca")(row)


@pytest.mark.parametrize(
    ("type_", "row", "prompt", "response"),
    [
        ("oasst", {"INSTRUCTION": "Tell me a word.", "RESPONSE": "water"},
         f"{NO_INPUT_SYS}\n\n### Instruction:\nTell me a word.\n\n### Response:\n", "water"),
        ("gpteacher", {"instruction": "Sum.", "input": "1 2", "response": "3"},
         f"{INPUT_SYS}\n\n### Instruction:\nSum.\n\n### Input:\n1 2\n\n### Response:\n", "3"),
        ("jeopardy", {"question": "He wrote it.", "category": "BOOKS", "answer": "Tolstoy"},
         "Below is a Jeopardy clue, with its category given as input. Answer the clue briefly, in the form of "
         "a question.\n\n### Instruction:\nHe wrote it.\n\n### Input:\nBOOKS\n\n### Response:\n", "what is Tolstoy"),
    ],
)
def test_simple_instruction_types(tiny_tokenizer, type_, row, prompt, response):
    tok = tiny_tokenizer
    [out] = row_fn(tok, type_)(row)
    assert (out["input_ids"], out["labels"]) == expected(tok, prompt, response, [tok.eos_token_id])


# ---------------------------------------------------------------- user-defined dict type
USER_TYPE = {
    "field_system": "sys",
    "field_instruction": "question",
    "field_input": "context",
    "field_output": "answer",
    "system_prompt": "Be brief.",
    "system_format": "System: {system}\n",
    "format": "Q: {instruction}\nContext: {input}\nA: ",
    "no_input_format": "Q: {instruction}\nA: ",
}


def test_user_defined_with_input_uses_row_system(tiny_tokenizer):
    tok = tiny_tokenizer
    row = {"sys": "You add numbers.", "question": "Sum?", "context": "2 and 3", "answer": "5"}
    [out] = row_fn(tok, USER_TYPE)(row)
    prompt = "System: You add numbers.\nQ: Sum?\nContext: 2 and 3\nA: "
    assert (out["input_ids"], out["labels"]) == expected(tok, prompt, "5", [tok.eos_token_id])


def test_user_defined_no_input_falls_back_to_system_prompt(bos_tokenizer):
    tok = bos_tokenizer
    row = {"sys": None, "question": "Sum?", "context": "", "answer": "5"}
    [out] = row_fn(tok, USER_TYPE)(row)
    prompt = "System: Be brief.\nQ: Sum?\nA: "
    assert (out["input_ids"], out["labels"]) == expected(tok, prompt, "5", [tok.eos_token_id], bos=True)


def test_user_defined_defaults_and_train_on_inputs(tiny_tokenizer):
    tok = tiny_tokenizer
    fn = row_fn(tok, {"field_instruction": "q"}, train_on_inputs=True)
    [with_input] = fn({"q": "Copy", "input": "abc", "output": "abc"})
    [no_input] = fn({"q": "Copy", "output": "abc"})
    want, _ = expected(tok, "Copy abc ", "abc", [tok.eos_token_id])
    assert with_input["input_ids"] == want and with_input["labels"] == want
    want, _ = expected(tok, "Copy ", "abc", [tok.eos_token_id])
    assert no_input["input_ids"] == want


def test_user_defined_no_input_format_defaults_to_format_without_input(tiny_tokenizer):
    tok = tiny_tokenizer
    fn = row_fn(tok, {"format": "[{instruction}|{input}] "})
    [out] = fn({"instruction": "Hi", "output": "yo"})
    assert (out["input_ids"], out["labels"]) == expected(tok, "[Hi|] ", "yo", [tok.eos_token_id])


def test_user_defined_missing_named_field(tiny_tokenizer):
    fn = row_fn(tiny_tokenizer, USER_TYPE)
    with pytest.raises(RowError, match=r"missing field `context` \(the row has: answer, question, sys\)"):
        fn({"sys": "s", "question": "q", "answer": "a"})
    with pytest.raises(RowError, match=r"missing field `answer`"):
        fn({"sys": "s", "question": "q", "context": "c"})


def test_user_defined_bad_format_string_fails_at_build(tiny_tokenizer):
    with pytest.raises(DataError, match=r"`type.format` is not a valid format string.*\{instruction\}, \{input\}"):
        row_fn(tiny_tokenizer, {"format": "{instruction} {question}"})


# ---------------------------------------------------------------- input_output
SEGMENTS = [
    {"text": "<s>Question: 2 + 2?", "label": False},
    {"text": " Answer: 4", "label": True},
    {"text": "</s>", "label": True},
]


@pytest.mark.parametrize("tokenizer_name", ["tiny_tokenizer", "bos_tokenizer"])
def test_input_output_concatenates_segments_verbatim(request, tokenizer_name):
    tok = request.getfixturevalue(tokenizer_name)
    [out] = row_fn(tok, "input_output")({"segments": SEGMENTS})
    parts = [ids(tok, s["text"]) for s in SEGMENTS]
    assert out["input_ids"] == parts[0] + parts[1] + parts[2]
    assert out["labels"] == [M] * len(parts[0]) + parts[1] + parts[2]
    # No BOS/EOS beyond the ones written in the text: decoding gives back the exact concatenation.
    assert tok.decode(out["input_ids"]) == "".join(s["text"] for s in SEGMENTS)
    assert out["input_ids"].count(tok.bos_token_id) == 1 and out["input_ids"][-1] == tok.eos_token_id


def test_input_output_train_on_inputs(tiny_tokenizer):
    [out] = row_fn(tiny_tokenizer, "input_output", train_on_inputs=True)({"segments": SEGMENTS})
    assert out["labels"] == out["input_ids"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"text": "x"}, r"missing field `segments` \(the row has: text\)"),
        ({"segments": []}, r"non-empty list"),
        ({"segments": [{"text": "a", "label": "yes"}]}, r"segments\[0\]\.label must be true or false, got 'yes'"),
        ({"segments": [{"text": "a", "label": True}, {"text": None, "label": False}]}, r"segments\[1\]\.text"),
        ({"segments": [{"text": "", "label": True}]}, r"all segments are empty"),
    ],
)
def test_input_output_bad_rows(tiny_tokenizer, row, message):
    with pytest.raises(RowError, match=message):
        row_fn(tiny_tokenizer, "input_output")(row)


# ---------------------------------------------------------------- completion
def test_completion_trains_all_tokens_with_bos_and_eos(bos_tokenizer):
    tok = bos_tokenizer
    [out] = row_fn(tok, "completion")({"text": "The water is cold."})
    want = tok("The water is cold.")["input_ids"] + [tok.eos_token_id]
    assert out["input_ids"] == want and out["labels"] == want


def test_completion_field_and_no_bos(tiny_tokenizer):
    tok = tiny_tokenizer
    [out] = row_fn(tok, "completion", field="body")({"body": "hello world", "text": "ignored"})
    assert out["input_ids"] == ids(tok, "hello world") + [tok.eos_token_id]
    with pytest.raises(RowError, match=r"missing field `body` \(the row has: text\)"):
        row_fn(tok, "completion", field="body")({"text": "x"})


def test_completion_splits_long_text_into_sequence_len_chunks(bos_tokenizer):
    tok = bos_tokenizer
    text = " ".join(f"{n} + {n} = {2 * n}." for n in range(40))
    full = tok(text)["input_ids"] + [tok.eos_token_id]
    assert len(full) > 5 * 16  # several chunks, with a shorter last one
    out = row_fn(tok, "completion", sequence_len=16)({"text": text})
    assert len(out) == -(-len(full) // 16)
    assert [len(r["input_ids"]) for r in out[:-1]] == [16] * (len(out) - 1)
    assert 1 <= len(out[-1]["input_ids"]) <= 16
    assert sum((r["input_ids"] for r in out), []) == full
    assert all(r["labels"] == r["input_ids"] for r in out)


# ---------------------------------------------------------------- type: module.function and unknown types
def test_user_module_function(tmp_path, monkeypatch, tiny_tokenizer):
    (tmp_path / "my_fmt_a1.py").write_text(
        "def reverse(row, tokenizer, cfg):\n"
        "    ids = tokenizer(row['text'][::-1], add_special_tokens=False)['input_ids']\n"
        "    return {'input_ids': ids + [cfg.sequence_len]}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    [out] = row_fn(tiny_tokenizer, "my_fmt_a1.reverse", sequence_len=99)({"text": "abc"})
    want = ids(tiny_tokenizer, "cba") + [99]
    assert out["input_ids"] == want and out["labels"] == want  # labels default to input_ids


def test_user_module_errors(tmp_path, monkeypatch, tiny_tokenizer):
    (tmp_path / "my_fmt_b2.py").write_text("def bad(row, tokenizer, cfg):\n    return [1, 2]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(DataError, match=r"cannot be imported"):
        formats.resolve("no_such_module_zz.fn")
    with pytest.raises(DataError, match=r"module `my_fmt_b2` has no function `missing`"):
        formats.resolve("my_fmt_b2.missing")
    with pytest.raises(RowError, match=r"must return a dict"):
        row_fn(tiny_tokenizer, "my_fmt_b2.bad")({"text": "x"})


@pytest.mark.parametrize(("typo", "meant"), [("alpacca", "alpaca"), ("completon", "completion"),
                                             ("input_ouput", "input_output")])
def test_unknown_type_did_you_mean(typo, meant):
    with pytest.raises(DataError, match=rf"unknown dataset type `{typo}`\. Did you mean `{meant}`\?"):
        formats.resolve(typo)


def test_completion_chunks_through_prepare(bos_tokenizer, write_jsonl):
    from tuneforge.data.pipeline import prepare

    tok = bos_tokenizer
    long_text = " ".join(f"{n} + 1 = {n + 1}." for n in range(30))
    path = write_jsonl([{"text": "short one"}, {"text": long_text}])
    cfg = load(data={"base_model": "unused", "sequence_len": 32, "shuffle_merged_datasets": False,
                     "datasets": [{"path": str(path), "type": "completion"}]})
    train = prepare(cfg, tok).train
    full = tok(long_text)["input_ids"] + [tok.eos_token_id]
    chunks = [full[i : i + 32] for i in range(0, len(full), 32)]
    chunks = [c for c in chunks if len(c) > 1]  # a lone last token has no target and is dropped
    assert list(train["_row"]) == [0] + [1] * len(chunks)
    assert list(train["input_ids"]) == [tok("short one")["input_ids"] + [tok.eos_token_id], *chunks]
    assert max(train["length"]) == 32


@pytest.mark.parametrize("before", [False, True])
def test_shuffle_before_merging_keeps_datasets_in_order_and_shuffles_within(tiny_tokenizer, write_jsonl, before):
    from tuneforge.config import load
    from tuneforge.data.pipeline import build

    first = write_jsonl([{"text": f"first {i}"} for i in range(12)], "first.jsonl")
    second = write_jsonl([{"text": f"second {i}"} for i in range(12)], "second.jsonl")
    cfg = load(data={"base_model": "unused", "shuffle_merged_datasets": False, "seed": 3,
                     "shuffle_before_merging_datasets": before,
                     "datasets": [{"path": str(first), "type": "completion"}, {"path": str(second), "type": "completion"}]})
    texts = [tiny_tokenizer.decode(ids, skip_special_tokens=True) for ids in build(cfg, tiny_tokenizer).train["input_ids"]]
    assert [t.split()[0] for t in texts] == ["first"] * 12 + ["second"] * 12  # one dataset after the other
    order = [int(t.split()[1]) for t in texts[:12]]
    assert sorted(order) == list(range(12)) and (order != list(range(12))) == before
