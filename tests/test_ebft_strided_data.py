"""EBFT data transforms under Axolotl's names: the strided ones (token rows + prompt_length), the structured
prompt transforms (prompt + ground_truth), how the strided objective reads them, and `validate`."""

from __future__ import annotations

import json

import pytest

from tuneforge.data.formats.ebft_structured import PROMPT_TRANSFORMS
from tuneforge.errors import DataError


def _rows(tokenizer, write_config, entry: dict, row: dict, **top):
    from tuneforge.config import load
    from tuneforge.data.formats import FormatContext, resolve

    cfg = load(write_config({"rl": "ebft", "ebft": {"mode": "strided"}, "datasets": [entry], **top}))
    fmt, style = resolve(entry["type"])
    return fmt.builder(FormatContext(cfg=cfg, entry=cfg.datasets[0], tokenizer=tokenizer, style=style))(row)


def test_strided_structured_rows(tiny_tokenizer, write_config, write_jsonl):
    write_jsonl([], "d.jsonl")
    entry = {"path": "d.jsonl", "type": "ebft_strided_structured.transform"}
    [out] = _rows(tiny_tokenizer, write_config, entry, {"prompt": "Reverse cat:", "completion": " tac"})
    prompt = tiny_tokenizer("Reverse cat:", add_special_tokens=False)["input_ids"]
    answer = tiny_tokenizer(" tac", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert out == {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer,
                   "prompt_length": len(prompt)}
    [same] = _rows(tiny_tokenizer, write_config, entry, {"input": "Reverse cat:", "output": " tac"})
    assert same == out  # Axolotl-style input/output keys
    with pytest.raises(Exception, match="no completion field"):
        _rows(tiny_tokenizer, write_config, entry, {"prompt": "x"})


def test_strided_chat_rows_are_chat_template_rows_plus_prompt_length(tiny_tokenizer, write_config, write_jsonl):
    write_jsonl([], "d.jsonl")
    row = {"messages": [{"role": "user", "content": "Reverse cat."}, {"role": "assistant", "content": "tac"}]}
    [chat] = _rows(tiny_tokenizer, write_config, {"path": "d.jsonl", "type": "chat_template"}, row,
                   chat_template="chatml")
    [out] = _rows(tiny_tokenizer, write_config, {"path": "d.jsonl", "type": "ebft_strided_chat.transform"}, row,
                  chat_template="chatml")
    first = next(i for i, label in enumerate(chat["labels"]) if label != -100)
    assert out == {**chat, "prompt_length": first}
    assert 0 < first < len(chat["input_ids"])


def test_structured_prompt_transforms():
    code = PROMPT_TRANSFORMS["ebft_opencode.transform"](None, None)({"input": "sum 1 2", "output": "3"})
    assert code == {"prompt": [{"role": "user", "content": "sum 1 2"}], "ground_truth": "3"}
    think = PROMPT_TRANSFORMS["ebft_reasoning.transform"](None, None)
    assert think({"question": "q", "answer": "a", "reasoning": "r"})["ground_truth"] == "<think>\nr\n</think>\n\na"
    assert think({"problem": "q", "solution": "a"}) == {"prompt": [{"role": "user", "content": "q"}], "ground_truth": "a"}
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]
    first = PROMPT_TRANSFORMS["ebft_chat_multiturn.transform"](None, None)({"messages": chat})
    assert first == {"prompt": chat[:2], "ground_truth": "a1", "remaining_turns": chat[3:]}
    last = PROMPT_TRANSFORMS["ebft_chat_multiturn.transform_last_turn"](None, None)({"messages": chat})
    assert last == {"prompt": chat[:4], "ground_truth": "a2"}
    every = PROMPT_TRANSFORMS["ebft_chat_multiturn.transform_all_turns"](None, None)({"messages": chat})
    assert every == [{"prompt": chat[:2], "ground_truth": "a1"}, {"prompt": chat[:4], "ground_truth": "a2"}]
    with pytest.raises(DataError, match="assistant turn"):
        PROMPT_TRANSFORMS["ebft_chat_multiturn.transform"](None, None)({"messages": chat[:2]})


def test_prompt_pipeline_and_validate_know_the_names(write_config, write_jsonl):
    from tuneforge.config import load
    from tuneforge.data.formats.grpo import resolve_transform
    from tuneforge.data.validate_rows import check_without_model

    write_jsonl([{"input": "x", "output": "y"}], "d.jsonl")
    for name in ("ebft_opencode.transform", "ebft_reasoning.transform", "ebft_chat_multiturn.transform"):
        cfg = load(write_config({"rl": "ebft", "datasets": [{"path": "d.jsonl", "type": name}]}))
        assert callable(resolve_transform(name, cfg, "datasets[0]")[0])
        check_without_model(cfg)  # no "module not found" for Axolotl's names
    for name in ("ebft_strided_structured.transform", "ebft_strided_chat.transform"):
        check_without_model(load(write_config({"rl": "ebft", "ebft": {"mode": "strided"},
                                               "datasets": [{"path": "d.jsonl", "type": name}]})))


def test_one_row_becomes_a_prompt_per_turn_builtin_or_batched_user_transform(write_config, write_jsonl, tmp_path):
    from tuneforge.config import load
    from tuneforge.data.formats.grpo import prepare_prompts
    from tuneforge.models.tokenizer import load_tokenizer

    chat = [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]
    write_jsonl([{"messages": chat}, {"messages": chat[:2]}], "d.jsonl")
    # Written for datasets.map(batched=True), as Axolotl users write them: columns in, columns out.
    (tmp_path / "explode.py").write_text(
        "def every_turn(cfg):\n"
        "    def fn(examples):\n"
        "        prompts, truths = [], []\n"
        "        for messages in examples['messages']:\n"
        "            for i, m in enumerate(messages):\n"
        "                if m['role'] == 'assistant':\n"
        "                    prompts.append(messages[:i]); truths.append(m['content'])\n"
        "        return {'prompt': prompts, 'ground_truth': truths}\n"
        "    return fn, {'remove_columns': '__all__', 'batched': True}\n")
    for name in ("ebft_chat_multiturn.transform_all_turns", "explode.every_turn"):
        cfg = load(write_config({"rl": "ebft", "chat_template": "chatml", "shuffle_merged_datasets": False,
                                 "datasets": [{"path": "d.jsonl", "type": name}]}))
        train = prepare_prompts(cfg, load_tokenizer(cfg)).train
        assert train["_row"] == [0, 0, 1], name
        assert [json.loads(c)["ground_truth"] for c in train["columns_json"]] == ["a1", "a2", "a1"], name
        assert [json.loads(p) for p in train["prompt_json"]] == [chat[:1], chat[:3], chat[:1]], name


def test_objective_reads_prompt_length_and_drops_documents_without_a_block(write_config, write_jsonl, tiny_tokenizer):
    from tuneforge.config import load
    from tuneforge.methods.ebft.strided import StridedEBFTObjective

    words = " ".join(f"w{i}" for i in range(40))
    write_jsonl([{"prompt": words, "completion": words}, {"prompt": "a", "completion": "b"}], "d.jsonl")
    cfg = load(write_config({"rl": "ebft", "sequence_len": 512, "skip_prepare_dataset": True,
                             "ebft": {"mode": "strided", "context_length": 4, "generate_max_len": 4, "stride": 4,
                                      "min_completion_prefix": 2},
                             "datasets": [{"path": "d.jsonl", "type": "ebft_strided_structured.transform"}]}))
    obj = StridedEBFTObjective(cfg)
    data = obj.prepare_data(tiny_tokenizer)
    assert len(data.train) == 1  # "a" -> "b" has no room for a block after its prompt
    row = data.train[0]
    batch = obj.collate([[row]], 0, training=True)
    assert batch["documents"][0]["offset"] == row["prompt_length"] + 2  # max(prompt + prefix, context_length)
    raw = dict(row, prompt_length=None, labels=None)
    assert obj._offset(raw) == 4  # raw text: context_length
    masked = dict(row, prompt_length=None)
    assert obj._offset(masked) == row["prompt_length"] + 2  # labels that start untrained are a prompt too


def test_no_document_long_enough_is_a_clear_error(write_config, write_jsonl, tiny_tokenizer):
    from tuneforge.config import load
    from tuneforge.methods.ebft.strided import StridedEBFTObjective

    write_jsonl([{"text": "short"}], "d.jsonl")
    cfg = load(write_config({"rl": "ebft", "skip_prepare_dataset": True, "ebft": {"mode": "strided"},
                             "datasets": [{"path": "d.jsonl", "type": "completion"}]}))
    with pytest.raises(DataError, match="ebft.context_length"):
        StridedEBFTObjective(cfg).prepare_data(tiny_tokenizer)
