"""`pretraining_dataset` entries written with the SFT keys (`type: completion`, `field:`): streamed as pretrain."""

from __future__ import annotations

import json

from config_support import issues_of, notes_of

ENTRY = "max_steps: 2\npretraining_dataset:\n  - path: corpus.jsonl\n    type: completion\n    field: body\n"


def test_type_completion_and_field_become_pretrain_and_text_column(tmp_path, caplog):
    cfg, notes = notes_of(tmp_path, caplog, ENTRY)
    entry = cfg.pretraining_dataset[0]
    assert (entry.type, entry.text_column) == ("pretrain", "body")
    assert "pretraining_dataset.0: `type: completion` streams as `type: pretrain` (every token of the text " \
           "trained)" in notes
    assert "pretraining_dataset.0.field is the SFT datasets' key; using text_column: body" in notes


def test_the_stream_reads_the_field_column(tmp_path, tiny_model_dir, tiny_tokenizer):
    from tuneforge.config import load
    from tuneforge.data.streaming import StreamSpec

    rows = [{"body": f"doc{i} words here", "text": "not this column"} for i in range(3)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "c.yaml"
    # In file order (streams are shuffled window by window unless told not to): the rows can be compared one by one.
    path.write_text(f"base_model: {tiny_model_dir}\nsequence_len: 64\nmicro_batch_size: 1\n"
                    "shuffle_merged_datasets: false\n" + ENTRY)
    stream = StreamSpec(load(path), tiny_tokenizer).open(0, 1)
    docs = stream.next_row()[:3]  # the corpus starts again after its last document
    expected = [tiny_tokenizer(r["body"], add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
                for r in rows]
    assert [d["input_ids"] for d in docs] == expected
    assert all(d["labels"] == d["input_ids"] for d in docs)


def test_field_and_a_different_text_column_conflict(tmp_path):
    [issue] = issues_of(tmp_path, ENTRY + "    text_column: text\n")
    assert issue.path == "pretraining_dataset.0.field"
    assert "names the text column `body` but text_column is `text`; keep one of them" in issue.message
