"""Preference, KTO, Bradley-Terry and stepwise dataset formats: exact token ids and label masks.

Expected values come from independent renderings: the chatml/llama3 strings Axolotl hard-codes in its
DPO/KTO strategies (tokenized prompt and answer apart, as TRL does), TRL's own tokenization of plain
prompt/chosen/rejected rows, and TRL's PRM rule (label on the last token of each step).
"""

from __future__ import annotations

import logging
import warnings

import pytest

from test_pref_support import make_cfg, one_thread, write_jsonl  # noqa: F401
from tuneforge.errors import DataError

IGNORE = -100
CHATML_PROMPT = "<|im_start|>system\n{s}<|im_end|>\n<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n"
LLAMA3_PROMPT = ("<s><|start_header_id|>system<|end_header_id|>\n\n{s}<|eot_id|><|start_header_id|>user"
                 "<|end_header_id|>\n\n{p}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def _row_fn(tiny_model_dir, tokenizer, type_spec, **keys):
    from tuneforge.data import formats
    from tuneforge.data.formats import FormatContext

    entry = {"path": "data.jsonl", "type": type_spec}
    entry.update(keys.pop("entry", {}))
    cfg = make_cfg(tiny_model_dir, datasets=[entry], **keys)
    fmt, style = formats.resolve(cfg.datasets[0].type)
    return fmt.builder(FormatContext(cfg=cfg, entry=cfg.datasets[0], tokenizer=tokenizer, style=style))


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _expected(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    p, a = _ids(tokenizer, prompt), _ids(tokenizer, answer)
    return p + a, [IGNORE] * len(p) + a


ROW = {"system": "be brief", "question": "what is two plus two", "chosen": "four", "rejected": "five"}


@pytest.mark.parametrize("template,prompt,end", [("chatml", CHATML_PROMPT, "<|im_end|>"),
                                                  ("llama3", LLAMA3_PROMPT, "<|eot_id|>")])
def test_fixed_template_pairs_match_axolotl_strings(template, prompt, end, tiny_model_dir, tiny_tokenizer):
    row_fn = _row_fn(tiny_model_dir, tiny_tokenizer, f"{template}.intel", rl="dpo")
    (out,) = row_fn(dict(ROW))
    text = prompt.format(s=ROW["system"], p=ROW["question"])
    for side in ("chosen", "rejected"):
        ids, labels = _expected(tiny_tokenizer, text, ROW[side] + end)
        assert out[f"{side}_input_ids"] == ids
        assert out[f"{side}_labels"] == labels


def test_every_fixed_type_reads_its_fields(tiny_model_dir, tiny_tokenizer):
    base = {"chosen": "yes", "rejected": "no"}
    rows = {
        "chatml": {"instruction": "hi", "chosen_response": "yes", "rejected_response": "no"},
        "chatml.argilla": {"input": "hi", **base},
        "chatml.icr": {"input": "hi", **base},
        "chatml.prompt_pairs": {"prompt": "hi", **base},
        "chatml.ultra": {"prompt": "hi", "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}],
                         "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]},
        "chatml.argilla_chat": {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}],
                                "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]},
    }
    want = _expected(tiny_tokenizer, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "yes<|im_end|>")
    for type_spec, row in rows.items():
        (out,) = _row_fn(tiny_model_dir, tiny_tokenizer, type_spec, rl="dpo")(row)
        assert (out["chosen_input_ids"], out["chosen_labels"]) == want, type_spec


def test_chat_template_default_maps_fields_and_roles(tiny_model_dir, tiny_tokenizer):
    row = {"conversation": [{"from": "system", "value": ROW["system"]}, {"from": "human", "value": ROW["question"]}],
           "good": {"from": "gpt", "value": "four"}, "bad": "five"}
    entry = {"field_messages": "conversation", "field_chosen": "good", "field_rejected": "bad",
             "message_property_mappings": {"role": "from", "content": "value"}}
    (out,) = _row_fn(tiny_model_dir, tiny_tokenizer, "chat_template.default", rl="dpo", chat_template="chatml",
                     entry=entry)(row)
    (fixed,) = _row_fn(tiny_model_dir, tiny_tokenizer, "chatml.intel", rl="dpo")(dict(ROW))
    assert out == fixed
    (plain_name,) = _row_fn(tiny_model_dir, tiny_tokenizer, "chat_template", rl="dpo", chat_template="chatml",
                            entry=entry)(row)
    assert plain_name == fixed  # under rl, `chat_template` means chat_template.default


def test_chat_template_argilla_for_orpo(tiny_model_dir, tiny_tokenizer):
    conv = lambda answer: [{"role": "user", "content": ROW["question"]}, {"role": "assistant", "content": answer}]  # noqa: E731
    row = {"system": ROW["system"], "chosen": conv("four"), "rejected": conv("five")}
    row_fn = _row_fn(tiny_model_dir, tiny_tokenizer, "chat_template.argilla", rl="orpo", chat_template="chatml")
    (out,) = row_fn(row)
    (fixed,) = _row_fn(tiny_model_dir, tiny_tokenizer, "chatml.intel", rl="dpo")(dict(ROW))
    assert out == fixed
    bad = {**row, "rejected": [{"role": "user", "content": "another question"}, {"role": "assistant", "content": "x"}]}
    with pytest.raises(DataError, match="share the same conversation"):
        row_fn(bad)


def _trl_tokenized(tmp_path, tokenizer, rows, kto=False):
    """TRL's own tokenization of plain-text rows (its trainer's prepared train_dataset)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    from tuneforge.tiny import tiny_llama_config

    logging.getLogger("transformers").setLevel(logging.ERROR)
    config = tiny_llama_config(len(tokenizer), hidden=16, layers=1, heads=2, kv_heads=1)
    model, ref = AutoModelForCausalLM.from_config(config), AutoModelForCausalLM.from_config(config)
    cls, conf = (KTOTrainer, KTOConfig) if kto else (DPOTrainer, DPOConfig)
    args = conf(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = cls(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer)
    return list(trainer.train_dataset)


def test_plain_rows_are_tokenized_as_trl_does(tmp_path, tiny_model_dir, tiny_tokenizer):
    rows = [{"prompt": "Question: two plus two?\nAnswer:", "chosen": " four", "rejected": " five, I think"},
            {"prompt": "say hi", "chosen": "hi</s>", "rejected": " bye"}]  # an answer already ending in EOS
    row_fn = _row_fn(tiny_model_dir, tiny_tokenizer, None, rl="dpo")
    theirs = _trl_tokenized(tmp_path, tiny_tokenizer, rows)
    for row, t in zip(rows, theirs, strict=True):
        (out,) = row_fn(row)
        p = t["prompt_ids"]
        assert out["chosen_input_ids"] == p + t["chosen_ids"]
        assert out["chosen_labels"] == [IGNORE] * len(p) + t["chosen_ids"]
        assert out["rejected_input_ids"] == p + t["rejected_ids"]
        assert out["rejected_labels"] == [IGNORE] * len(p) + t["rejected_ids"]


def test_plain_kto_rows_are_tokenized_as_trl_does(tmp_path, tiny_model_dir, tiny_tokenizer):
    rows = [{"prompt": "two plus two?", "completion": " four", "label": True},
            {"prompt": "three plus one?", "completion": " five", "label": False}]
    row_fn = _row_fn(tiny_model_dir, tiny_tokenizer, None, rl="kto")
    theirs = _trl_tokenized(tmp_path, tiny_tokenizer, rows, kto=True)
    for row, t in zip(rows, theirs, strict=True):
        (out,) = row_fn(row)
        p = t["prompt_ids"]
        assert out["input_ids"] == p + t["completion_ids"]
        assert out["labels"] == [IGNORE] * len(p) + t["completion_ids"]
        assert out["label"] is row["label"] and out["prompt_len"] == len(p)


def test_conversational_rows_use_the_configured_template(tiny_model_dir, tiny_tokenizer):
    row = {"prompt": [{"role": "system", "content": ROW["system"]}, {"role": "user", "content": ROW["question"]}],
           "chosen": [{"role": "assistant", "content": "four"}], "rejected": [{"role": "assistant", "content": "five"}]}
    (out,) = _row_fn(tiny_model_dir, tiny_tokenizer, None, rl="dpo", chat_template="chatml")(row)
    (fixed,) = _row_fn(tiny_model_dir, tiny_tokenizer, "chatml.intel", rl="dpo")(dict(ROW))
    assert out == fixed


def test_dict_type_for_dpo_and_kto(tiny_model_dir, tiny_tokenizer):
    spec = {"field_prompt": "q", "field_chosen": "good", "field_rejected": "bad", "prompt_format": "{system}Q: {prompt}\nA:",
            "chosen_format": " {chosen}"}
    row = {"q": "two plus two", "system": "Math. ", "good": "four", "bad": " five"}
    (out,) = _row_fn(tiny_model_dir, tiny_tokenizer, spec, rl="dpo")(row)
    prompt = _ids(tiny_tokenizer, "Math. Q: two plus two\nA:")
    full = _ids(tiny_tokenizer, "Math. Q: two plus two\nA: four</s>")
    assert full[: len(prompt)] == prompt
    assert out["chosen_input_ids"] == full and out["chosen_labels"] == [IGNORE] * len(prompt) + full[len(prompt):]

    kto_spec = {"field_prompt": "q", "field_completion": "answer", "field_label": "ok", "completion_format": " {completion}"}
    (k,) = _row_fn(tiny_model_dir, tiny_tokenizer, kto_spec, rl="kto")({"q": "two plus two", "answer": "four", "ok": "true"})
    q = _ids(tiny_tokenizer, "two plus two")
    assert k["input_ids"] == _ids(tiny_tokenizer, "two plus two four</s>") and k["label"] is True
    assert k["labels"][: len(q)] == [IGNORE] * len(q) and k["prompt_len"] == len(q)


@pytest.mark.parametrize("template,prompt,end", [("chatml", CHATML_PROMPT, "<|im_end|>"),
                                                  ("llama3", LLAMA3_PROMPT, "<|eot_id|>")])
def test_kto_fixed_types(template, prompt, end, tiny_model_dir, tiny_tokenizer):
    row = {"system": ROW["system"], "question": ROW["question"], "completion": "four", "label": False}
    (out,) = _row_fn(tiny_model_dir, tiny_tokenizer, f"{template}.intel", rl="kto")(row)
    ids, labels = _expected(tiny_tokenizer, prompt.format(s=ROW["system"], p=ROW["question"]), "four" + end)
    assert out == {"input_ids": ids, "labels": labels, "label": False, "prompt_len": labels.count(IGNORE)}
    chat = {"completion": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "label": True}
    (c,) = _row_fn(tiny_model_dir, tiny_tokenizer, f"{template}.argilla_chat", rl="kto")(chat)
    assert c["label"] is True and tiny_tokenizer.decode(c["input_ids"][c["prompt_len"]:]) == "yo" + end


def test_bradley_terry_renders_whole_conversations(tiny_model_dir, tiny_tokenizer):
    row = {"system": ROW["system"], "input": ROW["question"], "chosen": "four", "rejected": "five", "margin": 2}
    (out,) = _row_fn(tiny_model_dir, tiny_tokenizer, "bradley_terry.chat_template", reward_model=True,
                     chat_template="chatml")(row)
    text = CHATML_PROMPT.format(s=ROW["system"], p=ROW["question"]) + "four<|im_end|>\n"
    assert tiny_tokenizer.decode(out["chosen_input_ids"]) == text
    assert out["margin"] == 2.0
    assert tiny_tokenizer.decode([t for t in out["chosen_labels"] if t != IGNORE]) == "four<|im_end|>"
    (none,) = _row_fn(tiny_model_dir, tiny_tokenizer, "bradley_terry.chat_template", reward_model=True,
                      chat_template="chatml")({**row, "margin": None})
    assert none["margin"] == 0.0


@pytest.mark.parametrize("last_only,separator", [(False, None), (True, None), (False, " ||")])
def test_stepwise_labels_sit_on_each_step_end(last_only, separator, tiny_model_dir, tiny_tokenizer):
    row = {"prompt": "two plus two", "completions": ["two and two", "is four", "done"], "labels": [True, False, True]}
    entry = {"train_on_last_step_only": last_only}
    if separator is not None:
        entry["step_separator"] = separator
    (out,) = _row_fn(tiny_model_dir, tiny_tokenizer, "stepwise_supervised", process_reward_model=True, entry=entry)(row)
    sep = _ids(tiny_tokenizer, separator or "\n")
    ids = [tiny_tokenizer.bos_token_id] + _ids(tiny_tokenizer, row["prompt"])
    labels = [IGNORE] * len(ids)
    for k, (step, flag) in enumerate(zip(row["completions"], row["labels"], strict=True)):
        piece = _ids(tiny_tokenizer, step) + sep
        ids += piece
        labelled = (not last_only) or k == 2
        labels += [IGNORE] * (len(piece) - 1) + [int(flag) if labelled else IGNORE]
    assert out == {"input_ids": ids, "labels": labels}
    assert [t for t in out["labels"] if t != IGNORE] == ([1] if last_only else [1, 0, 1])


def test_stepwise_max_completion_length(tiny_model_dir, tiny_tokenizer):
    row = {"prompt": "q", "completions": ["a b c d e f g", "h"], "labels": [True, True]}
    (out,) = _row_fn(tiny_model_dir, tiny_tokenizer, "stepwise_supervised", process_reward_model=True,
                     entry={"max_completion_length": 3})(row)
    prompt = 1 + len(_ids(tiny_tokenizer, "q"))
    assert len(out["input_ids"]) == prompt + 3 and all(t == IGNORE for t in out["labels"])


def test_method_variants_and_errors(tiny_model_dir, tiny_tokenizer):
    from tuneforge.data import formats

    dpo_fmt = formats.resolve("chatml.intel")[0]
    assert "kto=" in dpo_fmt.version  # the cache key sees both row shapes of the name
    with pytest.raises(DataError, match="preference format.*rl: dpo"):
        _row_fn(tiny_model_dir, tiny_tokenizer, "chatml.icr", rl="kto")  # no KTO form of icr
    with pytest.raises(DataError, match="preference format"):
        _row_fn(tiny_model_dir, tiny_tokenizer, "chatml.intel")  # SFT
    with pytest.raises(DataError, match="stepwise format"):
        _row_fn(tiny_model_dir, tiny_tokenizer, "stepwise_supervised", rl="dpo")
    with pytest.raises(DataError, match="question"):
        _row_fn(tiny_model_dir, tiny_tokenizer, "chatml.intel", rl="dpo")({"chosen": "a", "rejected": "b"})
    with pytest.raises(DataError, match="label.*true or false"):
        _row_fn(tiny_model_dir, tiny_tokenizer, "chatml.intel", rl="kto")({"question": "q", "completion": "a", "label": "maybe"})
    with pytest.raises(DataError, match="missing field `chosen`"):
        _row_fn(tiny_model_dir, tiny_tokenizer, None, rl="dpo")({"prompt": "q", "rejected": "b"})


def test_pipeline_errors_name_the_row_and_the_fix(tmp_path, tiny_model_dir, tiny_tokenizer):
    from tuneforge.methods import get_objective

    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "chosen": "a", "rejected": "b"}, {"question": "q"}])
    cfg = make_cfg(tiny_model_dir, tmp_path / "a", rl="dpo", datasets=[{"path": str(data), "type": "chatml.intel"}])
    with pytest.raises(DataError, match=r"row 1.*chosen"):
        get_objective(cfg).prepare_data(tiny_tokenizer)
    sft = write_jsonl(tmp_path / "s.jsonl", [{"instruction": "q", "output": "a"}])
    cfg = make_cfg(tiny_model_dir, tmp_path / "b", rl="dpo", datasets=[{"path": str(sft), "type": "alpaca"}])
    with pytest.raises(DataError, match="preference pairs.*chatml.intel"):
        get_objective(cfg).prepare_data(tiny_tokenizer)


def test_preprocess_debug_shows_chosen_and_rejected(tmp_path, tiny_model_dir, capsys):
    from tuneforge.data.preprocess import run

    data = write_jsonl(tmp_path / "d.jsonl", [dict(ROW)])
    cfg = make_cfg(tiny_model_dir, tmp_path / "p", rl="dpo", datasets=[{"path": str(data), "type": "chatml.intel"}])
    run(cfg, debug=True, text_only=True)
    out = capsys.readouterr().out
    assert "chosen:" in out and "rejected:" in out
    assert "four<|im_end|>" in out and "five<|im_end|>" in out
    assert "[[<|im_start|>system" in out  # the prompt is shown masked


def test_pretokenized_pairs_are_kept_verbatim(tiny_model_dir, tiny_tokenizer):
    row = {"chosen_input_ids": [5, 6, 7], "chosen_labels": [-100, 6, 7], "rejected_input_ids": [5, 8],
           "rejected_labels": [-100, 8]}
    (out,) = _row_fn(tiny_model_dir, tiny_tokenizer, None, rl="dpo")(dict(row))
    assert out == row
    with pytest.raises(DataError, match="rejected_labels"):
        _row_fn(tiny_model_dir, tiny_tokenizer, None, rl="dpo")({**row, "rejected_labels": None})
    with pytest.raises(DataError, match="3 tokens but `chosen_labels` has 2"):
        _row_fn(tiny_model_dir, tiny_tokenizer, None, rl="dpo")({**row, "chosen_labels": [-100, 6]})
