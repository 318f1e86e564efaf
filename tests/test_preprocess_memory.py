"""Map-style preprocessing in bounded chunks (data/chunked.py): the same rows as formatting by `map`, for any
number of processes, and nothing left in the datasets library's cache. Peak memory at 100K vs 1M rows is
measured by bench/preprocess_memory.py (docs/benchmarks.md, "Preprocessing memory")."""

from __future__ import annotations

import json
import random

import pytest

from tuneforge.config import load
from tuneforge.data import chunked, pipeline

WORDS = ["the", "a", "of", "to", "and", "in", "is", "it", "you", "that", "he", "was", "for", "on", "are", "with", "as", "his", "they", "be", "at", "one", "have", "this"]


def _chats(path, n: int, seed: int = 0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            turns = [{"role": "user" if t % 2 == 0 else "assistant",
                      "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30 if i != 3 else 400)))}
                     for t in range(rng.choice([2, 4]))]
            if i == 5:
                turns = [{"role": "user", "content": "no answer"}]  # trains nothing: dropped
            f.write(json.dumps({"messages": turns}) + "\n")
    return path


def _cfg(tmp_path, model_dir, **keys):
    import yaml

    body = {"base_model": str(model_dir), "chat_template": "chatml", "sequence_len": 256,
            "datasets": [{"path": str(tmp_path / "chat.jsonl"), "type": "chat_template"}],
            "dataset_prepared_path": str(tmp_path / "prepared"), "val_set_size": 0.1, **keys}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(body))
    return load(tmp_path / "c.yaml", [])


def _rows(ds):
    return [(r["_row"], r["input_ids"], r["labels"]) for r in ds]


@pytest.mark.parametrize("num_proc", [1, 2])
def test_chunked_rows_equal_the_map_rows(tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch, num_proc):
    _chats(tmp_path / "chat.jsonl", 5000)  # 3 chunks of CHUNK_ROWS
    cfg = _cfg(tmp_path, tiny_model_dir, dataset_num_proc=num_proc)
    chunked_data = pipeline.prepare(cfg, tiny_tokenizer)
    reference = pipeline.build(cfg, tiny_tokenizer)  # no work folder: formatted by `map`, as before
    for split in ("train", "eval"):
        got, want = getattr(chunked_data, split), getattr(reference, split)
        assert _rows(got) == _rows(want)
        assert chunked_data.stats[split].as_dict() == reference.stats[split].as_dict()
    stats = chunked_data.stats["train"]
    assert stats.dropped  # the long row and the one without an answer
    # `_trained` holds each row's trained-token count, which the statistics now read
    assert chunked_data.train["_trained"] == pipeline.trained_per_row(chunked_data.train).tolist()
    assert {p.name for p in (tmp_path / "prepared").iterdir()} == {chunked_data.cache_dir.name,
                                                                   f".{chunked_data.cache_dir.name}.lock"}


def test_nothing_is_left_in_the_datasets_cache(tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch):
    import datasets

    _chats(tmp_path / "chat.jsonl", 300)
    hf = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf)
    data = pipeline.prepare(_cfg(tmp_path, tiny_model_dir), tiny_tokenizer, rebuild=True)
    assert len(data.train) > 200
    assert not [p for p in hf.rglob("*") if p.is_file()] if hf.exists() else True
    assert not list((tmp_path / "prepared").glob(".partial*"))  # the work folder is gone too


def test_default_num_proc_follows_the_cores_and_a_busy_machine(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert chunked.default_num_proc(1_000_000, cores=8) == 8
    assert chunked.default_num_proc(100, cores=8) == 1  # too few rows to pay for starting processes
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the cli lowers it on a busy machine
    assert chunked.default_num_proc(1_000_000, cores=8) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    assert chunked.default_num_proc(1_000_000, cores=8) == 8


def test_trained_counts_skip_position_zero():
    import pyarrow as pa

    labels = pa.array([[-100, 5, 6], [7, -100, 8], [], [9]])
    assert chunked.trained_counts(labels).tolist() == [2, 1, 0, 0]
