"""User mistakes in datasets surface from `prepare` as one DataError line naming the dataset entry, the
file, the row and the problem (rows are counted from 0, in file order)."""

from __future__ import annotations

import pytest

from tuneforge.config import load
from tuneforge.data.pipeline import prepare
from tuneforge.errors import DataError

GOOD = {"instruction": "Say hi.", "input": "", "output": "hello"}


def prepare_error(tokenizer, entries: list[dict]) -> str:
    cfg = load(data={"base_model": "unused", "datasets": entries, "shuffle_merged_datasets": False})
    with pytest.raises(DataError) as err:
        prepare(cfg, tokenizer)
    message = str(err.value)
    assert "\n" not in message, message  # one message, not a stack trace
    return message


def test_missing_field(tiny_tokenizer, write_jsonl):
    path = write_jsonl([GOOD, GOOD, {"instruction": "Say bye.", "input": ""}])
    message = prepare_error(tiny_tokenizer, [{"path": str(path), "type": "alpaca"}])
    assert message == f"datasets[0] ({path}) row 2: missing field `output` (the row has: input, instruction)"


def test_wrong_type(tiny_tokenizer, write_jsonl):
    path = write_jsonl([GOOD, {"instruction": "Count.", "output": 3}])
    message = prepare_error(tiny_tokenizer, [{"path": str(path), "type": "alpaca"}])
    assert message == f"datasets[0] ({path}) row 1: field `output` must be text, got int: '3'"


def test_empty_text_in_the_second_entry(tiny_tokenizer, write_jsonl):
    good = write_jsonl([GOOD], "good.jsonl")
    path = write_jsonl([{"text": "some words"}, {"text": ""}], "corpus.jsonl")
    message = prepare_error(tiny_tokenizer, [{"path": str(good), "type": "alpaca"},
                                             {"path": str(path), "type": "completion"}])
    assert message == f"datasets[1] ({path}) row 1: field `text` is empty"


def test_user_defined_missing_named_column(tiny_tokenizer, write_jsonl):
    path = write_jsonl([{"q": "2+2?", "a": "4"}])
    entry = {"path": str(path), "type": {"field_instruction": "question", "field_output": "a"}}
    message = prepare_error(tiny_tokenizer, [entry])
    assert message == f"datasets[0] ({path}) row 0: missing field `question` (the row has: a, q)"


def test_input_output_bad_label(tiny_tokenizer, write_jsonl):
    segs = [{"text": "Q", "label": False}, {"text": "A", "label": True}]
    path = write_jsonl([{"segments": segs}, {"segments": [{"text": "Q", "label": "no"}]}])
    message = prepare_error(tiny_tokenizer, [{"path": str(path), "type": "input_output"}])
    assert message == f"datasets[0] ({path}) row 1: segments[0].label must be true or false, got 'no'"


def test_file_that_does_not_exist(tiny_tokenizer, tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    message = prepare_error(tiny_tokenizer, [{"path": str(missing), "type": "alpaca"}])
    assert message.startswith(f"datasets[0]: dataset file not found: {missing}")


def test_malformed_line(tiny_tokenizer, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a b"}\n{"text": "c d"\n')
    message = prepare_error(tiny_tokenizer, [{"path": str(path), "type": "completion"}])
    assert message == f"datasets[0]: could not read {path} as json: broken.jsonl line 2: invalid JSON (Expecting ',' delimiter)"


def test_unknown_type_with_did_you_mean(tiny_tokenizer, write_jsonl):
    path = write_jsonl([GOOD])
    message = prepare_error(tiny_tokenizer, [{"path": str(path), "type": "alpacha"}])
    assert message.startswith("datasets[0]: unknown dataset type `alpacha`. Did you mean `alpaca`? Known types: ")
    assert "completion" in message and "input_output" in message


def test_good_rows_prepare(tiny_tokenizer, write_jsonl):
    """The counterpart: the same shapes, well formed, prepare without error and keep every row."""
    path = write_jsonl([GOOD, {**GOOD, "input": "now"}])
    cfg = load(data={"base_model": "unused", "datasets": [{"path": str(path), "type": "alpaca"}],
                     "shuffle_merged_datasets": False})
    data = prepare(cfg, tiny_tokenizer)
    assert list(data.train["_row"]) == [0, 1]
    assert data.stats["train"].rows_out == 2


def test_chat_message_without_content(tiny_tokenizer, write_jsonl):
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = write_jsonl([{"messages": ok}, {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}])
    message = prepare_error(tiny_tokenizer, [{"path": str(path), "type": "chat_template", "chat_template": "chatml"}])
    assert message.startswith(f"datasets[0] ({path}) row 1: ")
    assert "content" in message
