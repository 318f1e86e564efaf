"""Streamed training data (pretraining_dataset, streaming: true): packing, position, shards, errors, resume."""

from __future__ import annotations

import json

import pytest
import yaml

from test_engine_support import losses, one_thread, train  # noqa: F401
from tuneforge.config import load
from tuneforge.config.errors import ConfigError
from tuneforge.errors import DataError, TuneforgeError


def _corpus(path, n: int, words: int = 12, start: int = 0):
    """n JSON-lines documents; document i names itself (`doc<i>`) so tests can tell which were read."""
    with open(path, "w") as f:
        for i in range(start, start + n):
            f.write(json.dumps({"text": f"doc{i} " + " ".join(f"w{(i * 7 + j) % 50}" for j in range(i % words + 1))})
                    + "\n")
    return path


def _config(tmp_path, model_dir, name="cfg.yaml", **keys):
    base = {"base_model": str(model_dir), "output_dir": str(tmp_path / "out"), "sequence_len": 32,
            "micro_batch_size": 2, "learning_rate": 3e-3, "optimizer": "adamw_torch", "seed": 3, "max_steps": 6,
            "pretraining_dataset": [{"path": "corpus.jsonl", "type": "pretrain"}],
            "shuffle_merged_datasets": False}  # in corpus order unless a test shuffles
    base.update(keys)
    (tmp_path / name).write_text(yaml.safe_dump(base, sort_keys=False))
    return load(tmp_path / name)


def _stream(cfg, tokenizer, rank=0, world=1):
    from tuneforge.data.streaming import StreamSpec

    return StreamSpec(cfg, tokenizer).open(rank, world)


def _docs_of(row, tokenizer):
    return [tokenizer.decode(d["input_ids"]) for d in row]


# ---------------------------------------------------------------- packing
def test_rows_are_packed_in_order_with_whole_documents(tmp_path, tiny_model_dir, tiny_tokenizer):
    _corpus(tmp_path / "corpus.jsonl", 40)
    cfg = _config(tmp_path, tiny_model_dir)
    stream = _stream(cfg, tiny_tokenizer)
    expected = []
    for line in (tmp_path / "corpus.jsonl").read_text().splitlines():
        ids = tiny_tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
        expected.append([*ids, tiny_tokenizer.eos_token_id])  # the tiny tokenizer adds no BOS
    got = []
    for _ in range(12):
        row = stream.next_row()
        assert sum(len(d["input_ids"]) for d in row) <= 32
        for d in row:
            assert d["labels"] == d["input_ids"]  # pretraining trains every token
        got += [d["input_ids"] for d in row]
    # next-fit in stream order: the documents come back exactly, in order, none cut (all are < 32 tokens)
    assert all(len(e) <= 32 for e in expected)
    assert got == expected[: len(got)]
    # and a row only ends early when the next document does not fit
    stream2 = _stream(cfg, tiny_tokenizer)
    row = stream2.next_row()
    nxt = stream2.pending[0] if stream2.pending else stream2.next_row()[0]
    assert sum(len(d["input_ids"]) for d in row) + len(nxt["input_ids"]) > 32


def test_concatenation_fills_every_row_and_cuts_documents(tmp_path, tiny_model_dir, tiny_tokenizer):
    _corpus(tmp_path / "corpus.jsonl", 40)
    cfg = _config(tmp_path, tiny_model_dir, pretraining_sample_concatenation=True)
    stream = _stream(cfg, tiny_tokenizer)
    rows = [stream.next_row() for _ in range(10)]
    assert all(sum(len(d["input_ids"]) for d in r) == 32 for r in rows)
    flat = [t for r in rows for d in r for t in d["input_ids"]]
    whole = []
    for line in (tmp_path / "corpus.jsonl").read_text().splitlines():
        whole += tiny_tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
        whole.append(tiny_tokenizer.eos_token_id)
    assert flat == whole[:320]  # the token stream, cut into rows, nothing lost or repeated


def test_long_documents_are_cut_into_row_sized_pieces(tmp_path, tiny_model_dir, tiny_tokenizer):
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"text": " ".join(f"x{i}" for i in range(60))}) + "\n")
    cfg = _config(tmp_path, tiny_model_dir)
    stream = _stream(cfg, tiny_tokenizer)
    ids = tiny_tokenizer(json.loads((tmp_path / "corpus.jsonl").read_text())["text"],
                         add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert len(ids) > 64
    pieces = [stream.next_row() for _ in range(-(-len(ids) // 32))]
    assert [d["input_ids"] for r in pieces for d in r] == [ids[i:i + 32] for i in range(0, len(ids), 32)]
    assert stream.next_row()[0]["input_ids"] == ids[:32]  # the next row starts the corpus again
    assert stream.passes == 1


def test_rows_collate_without_cross_document_attention(tmp_path, tiny_model_dir, tiny_tokenizer):
    from tuneforge.data.collate import collate

    _corpus(tmp_path / "corpus.jsonl", 20)
    row = _stream(_config(tmp_path, tiny_model_dir), tiny_tokenizer).next_row()
    assert len(row) >= 2
    batch = collate([row], pad_id=0, pad_to=32)
    n0 = len(row[0]["input_ids"])
    assert batch["position_ids"][0, n0].item() == 0  # the second document starts again at position 0
    assert batch["target_ids"][0, n0 - 1].item() == -100  # and is not the first one's target
    joined = _stream(_config(tmp_path, tiny_model_dir, name="b.yaml", pretrain_multipack_attn=False),
                     tiny_tokenizer).next_row()
    assert len(joined) == 1  # one sequence: positions run on across the documents
    assert joined[0]["input_ids"] == [t for d in row for t in d["input_ids"]]


# ---------------------------------------------------------------- position and shards
def test_state_dict_continues_exactly(tmp_path, tiny_model_dir, tiny_tokenizer):
    _corpus(tmp_path / "corpus.jsonl", 30)
    cfg = _config(tmp_path, tiny_model_dir, pretraining_sample_concatenation=True)
    full = _stream(cfg, tiny_tokenizer)
    ref = [full.next_row() for _ in range(25)]  # past the end of the corpus: a second pass
    assert full.passes == 1
    for k in (1, 7, 19):
        first = _stream(cfg, tiny_tokenizer)
        for _ in range(k):
            first.next_row()
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
        again = _stream(cfg, tiny_tokenizer)
        again.load_state_dict(state)
        assert [again.next_row() for _ in range(25 - k)] == ref[k:]


def test_resume_seeks_instead_of_rereading(tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch):
    """The saved cursor is a byte offset: after a resume the consumed lines are not even parsed."""
    from tuneforge.data import stream_sources

    _corpus(tmp_path / "corpus.jsonl", 30)
    cfg = _config(tmp_path, tiny_model_dir)
    first = _stream(cfg, tiny_tokenizer)
    for _ in range(5):
        first.next_row()
    state = first.state_dict()
    assert state["cursor"]["offset"] > 0
    parsed = []
    real = stream_sources._parse
    monkeypatch.setattr(stream_sources, "_parse", lambda raw, *a: parsed.append(raw) or real(raw, *a))
    again = _stream(cfg, tiny_tokenizer)
    again.load_state_dict(state)
    again.next_row()
    assert parsed and b"doc0 " not in parsed[0]
    assert json.loads(parsed[0])["text"].startswith(f"doc{state['cursor']['row']} ")


def test_processes_read_disjoint_shards_that_cover_the_corpus(tmp_path, tiny_model_dir, tiny_tokenizer):
    _corpus(tmp_path / "corpus.jsonl", 23)
    cfg = _config(tmp_path, tiny_model_dir)
    seen = []
    for rank in (0, 1):
        stream = _stream(cfg, tiny_tokenizer, rank, 2)
        names = []
        while len(names) < 13:  # a whole pass, and the first document of the next
            names += [text.split()[0] for text in _docs_of(stream.next_row(), tiny_tokenizer)]
        seen.append(names[:13])
    assert seen[0] == [f"doc{i}" for i in range(0, 23, 2)] + ["doc0"]
    assert seen[1] == [f"doc{i}" for i in range(1, 23, 2)] + ["doc1", "doc3"]


def test_skip_drops_the_first_rows(tmp_path, tiny_model_dir, tiny_tokenizer):
    _corpus(tmp_path / "corpus.jsonl", 10)
    cfg = _config(tmp_path, tiny_model_dir, pretraining_dataset=[{"path": "corpus.jsonl", "skip": 4}])
    first = _docs_of(_stream(cfg, tiny_tokenizer).next_row(), tiny_tokenizer)[0]
    assert first.startswith("doc4 ")


def test_path_json_with_data_files_and_several_entries(tmp_path, tiny_model_dir, tiny_tokenizer):
    _corpus(tmp_path / "a.jsonl", 3)
    (tmp_path / "b.txt").write_text("first line\nsecond line\n")
    cfg = _config(tmp_path, tiny_model_dir, pretraining_dataset=[
        {"path": "json", "data_files": ["a.jsonl"]}, {"path": "b.txt"}])
    stream = _stream(cfg, tiny_tokenizer)
    texts = []
    while stream.passes == 0:
        texts += _docs_of(stream.next_row(), tiny_tokenizer)
    assert [t.split()[0] for t in texts if "doc" in t or "line" in t][:5] == ["doc0", "doc1", "doc2", "first",
                                                                             "second"]


def test_reading_the_stream_holds_bounded_memory(tmp_path, tiny_model_dir, tiny_tokenizer):
    """Python memory while reading a whole pass stays within a fixed bound (read-ahead + one row), far below
    what the documents read would take if any part of the stream kept them (bench/stream_memory.py shows
    VmRSS flat while the corpus grows 10x)."""
    import tracemalloc

    _corpus(tmp_path / "corpus.jsonl", 6000, words=40)
    stream = _stream(_config(tmp_path, tiny_model_dir, sequence_len=256), tiny_tokenizer)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tokens = 0
        while stream.passes == 0:
            tokens += sum(len(d["input_ids"]) for d in stream.next_row())
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    held = tokens * 2 * 8  # input_ids + labels, 8 bytes a token (less than Python lists take)
    assert tokens > 100_000
    assert peak < 1.5e6 < held / 2, (peak, held)


def _names(rows, tokenizer) -> list[int]:
    return [int(text.split()[0][3:]) for row in rows for text in _docs_of(row, tokenizer)]


def test_shuffle_takes_each_window_in_a_seeded_random_order(tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch):
    from tuneforge.data import stream_sources

    _corpus(tmp_path / "corpus.jsonl", 300)
    keys = {"shuffle_merged_datasets": True, "streaming_multipack_buffer_size": 100}

    def one_pass(seed):
        stream = _stream(_config(tmp_path, tiny_model_dir, name=f"s{seed}.yaml", seed=seed, **keys), tiny_tokenizer)
        rows = []
        while stream.passes == 0:
            rows.append(stream.next_row())
        return _names(rows, tiny_tokenizer)[:300]

    first = one_pass(3)
    for w in range(3):  # window w is source rows 100w .. 100w+99, each taken once, not in order
        assert sorted(first[100 * w:100 * w + 100]) == list(range(100 * w, 100 * w + 100))
        assert first[100 * w:100 * w + 100] != sorted(first[100 * w:100 * w + 100])
    assert one_pass(3) == first and one_pass(4) != first  # seeded
    parsed = []
    real = stream_sources._parse
    monkeypatch.setattr(stream_sources, "_parse", lambda raw, *a: parsed.append(raw) or real(raw, *a))
    _stream(_config(tmp_path, tiny_model_dir, name="m.yaml", **keys), tiny_tokenizer).next_row()
    assert len(parsed) == 100  # memory holds one window of source rows, nothing more


def test_shuffled_state_continues_exactly(tmp_path, tiny_model_dir, tiny_tokenizer):
    _corpus(tmp_path / "corpus.jsonl", 30)
    cfg = _config(tmp_path, tiny_model_dir, pretraining_sample_concatenation=True, shuffle_merged_datasets=True,
                  streaming_multipack_buffer_size=7)
    full = _stream(cfg, tiny_tokenizer)
    ref = [full.next_row() for _ in range(25)]  # a second pass, shuffled anew
    assert full.passes == 1
    taken = []
    for k in (1, 7, 19):
        first = _stream(cfg, tiny_tokenizer)
        for _ in range(k):
            first.next_row()
        state = json.loads(json.dumps(first.state_dict()))
        taken.append(state["taken"])
        again = _stream(cfg, tiny_tokenizer)
        again.load_state_dict(state)
        assert [again.next_row() for _ in range(25 - k)] == ref[k:]
    assert any(0 < t < 7 for t in taken)  # mid-window: the window is read again, its taken rows skipped
    other = _config(tmp_path, tiny_model_dir, name="o.yaml", streaming_multipack_buffer_size=8,
                    shuffle_merged_datasets=True)
    with pytest.raises(DataError, match="windows of 7 rows, this run's is shuffled in windows of 8 rows"):
        _stream(other, tiny_tokenizer).load_state_dict(state)


def test_two_processes_resume_on_one_without_skipping_rows(tmp_path, tiny_model_dir, tiny_tokenizer):
    """2 processes -> 1: the stream restarts at the earliest row either had not finished; every row is trained,
    and the rows trained twice are exactly those after that point that a process had trained."""
    from tuneforge.engine.plan import Position  # noqa: F401 - the plan below is the trainer's
    from tuneforge.engine.stream_plan import StreamPlan

    _corpus(tmp_path / "corpus.jsonl", 60)
    cfg = _config(tmp_path, tiny_model_dir, shuffle_merged_datasets=True, streaming_multipack_buffer_size=6)
    before, states = [], []
    for rank, rows in ((0, 4), (1, 9)):  # the processes are apart, as shards of unequal documents make them
        stream = _stream(cfg, tiny_tokenizer, rank, 2)
        before += _names([stream.next_row() for _ in range(rows)], tiny_tokenizer)
        states.append(json.loads(json.dumps(stream.state_dict())))
    assert len(before) == len(set(before))
    untrained = min(set(range(60)) - set(before))
    plan = StreamPlan(cfg, _stream(cfg, tiny_tokenizer))
    plan.load_state_dict(states, tmp_path / "checkpoint-9")
    restart = plan.stream.cursor["row"]
    assert untrained - 2 < restart <= untrained  # at most the other process's row next to it is read again
    after = []
    while len(after) < 60 - restart:
        after += _names([plan.stream.next_row()], tiny_tokenizer)
    after = after[:60 - restart]
    assert sorted(after) == list(range(restart, 60))  # each row from the restart point on, once
    assert set(before) | set(after) == set(range(60))  # none skipped
    assert sorted(set(before) & set(after)) == sorted(i for i in before if i >= restart)
    for s in states:
        del s["restart"]  # a checkpoint of an earlier version
    with pytest.raises(TuneforgeError, match="resume it on 2 process"):
        StreamPlan(cfg, _stream(cfg, tiny_tokenizer)).load_state_dict(states, tmp_path / "checkpoint-9")


def test_parquet_streams_through_datasets_and_resumes_by_row(tmp_path, tiny_model_dir, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": [f"doc{i} " + "w1 " * (i % 5) for i in range(20)]}), tmp_path / "c.parquet")
    cfg = _config(tmp_path, tiny_model_dir, pretraining_dataset=[{"path": "c.parquet", "text_column": "body"}])
    full = _stream(cfg, tiny_tokenizer)
    ref = [full.next_row() for _ in range(8)]
    assert _docs_of(ref[0], tiny_tokenizer)[0].startswith("doc0 ")
    part = _stream(cfg, tiny_tokenizer)
    for _ in range(3):
        part.next_row()
    assert set(part.state_dict()["cursor"]) == {"row"}  # not seekable: the position is a row count
    again = _stream(cfg, tiny_tokenizer)
    again.load_state_dict(part.state_dict())
    assert [again.next_row() for _ in range(5)] == ref[3:]


# ---------------------------------------------------------------- errors a user can make
def test_streamed_configs_need_max_steps_and_test_datasets(tmp_path, tiny_model_dir):
    _corpus(tmp_path / "corpus.jsonl", 5)
    with pytest.raises(ConfigError, match="max_steps"):
        _config(tmp_path, tiny_model_dir, max_steps=None)
    with pytest.raises(ConfigError, match="test_datasets"):
        _config(tmp_path, tiny_model_dir, val_set_size=0.1)
    with pytest.raises(ConfigError, match="max_steps"):
        _config(tmp_path, tiny_model_dir, pretraining_dataset=None, max_steps=None, streaming=True,
                datasets=[{"path": "corpus.jsonl", "type": "completion"}])


def test_bad_rows_and_missing_files_are_named(tmp_path, tiny_model_dir, tiny_tokenizer):
    (tmp_path / "corpus.jsonl").write_text('{"body": "x"}\n')
    cfg = _config(tmp_path, tiny_model_dir)
    with pytest.raises(DataError, match=r"row 0: text_column `text`.*body"):
        _stream(cfg, tiny_tokenizer).next_row()
    (tmp_path / "corpus.jsonl").write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(DataError, match="line 1 .*not valid JSON"):
        s = _stream(cfg, tiny_tokenizer)
        s.next_row()
        s.next_row()
    cfg = _config(tmp_path, tiny_model_dir, name="m.yaml", pretraining_dataset=[{"path": "missing.jsonl"}])
    with pytest.raises(DataError, match="not found: missing.jsonl"):
        _stream(cfg, tiny_tokenizer)
    (tmp_path / "corpus.jsonl").write_text('{"text": "only one"}\n')
    with pytest.raises(DataError, match="no document to process 1 of 2"):
        _stream(_config(tmp_path, tiny_model_dir), tiny_tokenizer, 1, 2).next_row()


# ---------------------------------------------------------------- training
def test_streamed_datasets_apply_the_format_and_length_rules(tmp_path, tiny_model_dir, tiny_tokenizer):
    rows = [{"instruction": f"say {i}", "output": "ok " * (1 + 60 * (i == 2))} for i in range(6)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _config(tmp_path, tiny_model_dir, pretraining_dataset=None, streaming=True, sample_packing=True,
                  sequence_len=160, datasets=[{"path": "sft.jsonl", "type": "alpaca"}])
    stream = _stream(cfg, tiny_tokenizer)
    docs = []
    while stream.passes == 0:
        docs += stream.next_row()
    texts = [tiny_tokenizer.decode(d["input_ids"]) for d in docs[:5]]
    assert [t.split("say ")[1][0] for t in texts] == ["0", "1", "3", "4", "5"]  # row 2 is too long: dropped
    assert all(70 <= len(d["input_ids"]) <= 80 for d in docs)
    assert len(stream.next_row()) == 2  # two documents of ~72 tokens per row of 160
    assert all(-100 in d["labels"] for d in docs)  # the prompt is masked, as prepared alpaca rows are


def test_resumed_streamed_run_has_the_same_losses(tmp_path, tiny_model_dir):
    _corpus(tmp_path / "corpus.jsonl", 24)
    keys = {"max_steps": 8, "save_steps": 1, "gradient_accumulation_steps": 2, "warmup_steps": 2,
            "model_config": {"attention_dropout": 0.2}, "shuffle_merged_datasets": True,
            "streaming_multipack_buffer_size": 10}
    full = train(_config(tmp_path, tiny_model_dir, **keys))
    ref = losses(full)
    assert sorted(ref) == list(range(1, 9))
    assert ref[8] < ref[1]  # it learns from the stream
    ckpt = tmp_path / "out" / "checkpoint-5"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["stream"][0]["passes"] == 1  # the checkpoint falls in the second pass over the corpus
    assert state["stream"][0]["taken"] > 0  # and inside a shuffle window
    resumed = train(_config(tmp_path, tiny_model_dir, name="r.yaml", output_dir=str(tmp_path / "r"), **keys,
                            resume_from_checkpoint=str(ckpt)))
    got = losses(resumed)
    assert sorted(got) == [6, 7, 8]
    for step in (6, 7, 8):
        assert abs(got[step] - ref[step]) <= 1e-6, (step, got[step], ref[step])


def test_resume_without_the_stream_position_is_refused(tmp_path, tiny_model_dir):
    _corpus(tmp_path / "corpus.jsonl", 30)
    train(_config(tmp_path, tiny_model_dir, max_steps=3, save_steps=2))
    ckpt = tmp_path / "out" / "checkpoint-2"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state["stream"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(TuneforgeError, match="no stream position"):
        train(_config(tmp_path, tiny_model_dir, name="r.yaml", output_dir=str(tmp_path / "r"), max_steps=3,
                      resume_from_checkpoint=str(ckpt)))


def test_example_corpus_regenerates_identically(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples"
    spec = importlib.util.spec_from_file_location("make_pretrain_corpus", examples / "data" / "make_pretrain_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "HERE", tmp_path)
    module.main()
    for name in ("pretrain_corpus.jsonl", "pretrain_test.jsonl"):
        assert (tmp_path / name).read_bytes() == (examples / "data" / name).read_bytes(), name


def test_preprocess_shows_the_first_streamed_rows(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from tuneforge.cli import app

    _corpus(tmp_path / "corpus.jsonl", 10)
    _config(tmp_path, tiny_model_dir)
    import logging

    logger = logging.getLogger("tuneforge")
    filters = list(logger.filters)  # the command adds one; later tests read these log lines
    try:
        result = CliRunner().invoke(app, ["preprocess", str(tmp_path / "cfg.yaml"), "--debug",
                                          "--debug-num-examples", "2"])
    finally:
        logger.filters[:] = filters
    assert result.exit_code == 0, result.output
    assert "streamed while training" in result.output
    assert "--- packed row 1:" in result.output and "[[do]]c0 w0</s>" in result.output  # a first token is no target


@pytest.mark.slow
def test_two_processes_read_their_own_shards_and_resume_exactly(tmp_path, tiny_model_dir):
    """Under torchrun (2 CPU processes) each process keeps its own stream position in the checkpoint, the
    positions are disjoint shards, and a resumed 2-process run repeats the uninterrupted run's losses; one
    process resumes the same checkpoint too."""
    import os
    import subprocess
    import sys

    _corpus(tmp_path / "corpus.jsonl", 24)
    keys = {"max_steps": 4, "save_steps": 2, "lr_scheduler": "constant"}
    _config(tmp_path, tiny_model_dir, **keys)
    _config(tmp_path, tiny_model_dir, name="r.yaml", output_dir=str(tmp_path / "r"), **keys,
            resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))

    def torchrun(name):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                               "tuneforge.cli", "train", str(tmp_path / name)], capture_output=True, text=True,
                              env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        out = tmp_path / ("out" if name == "cfg.yaml" else "r")
        return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if r["type"] == "train"}

    full = torchrun("cfg.yaml")
    positions = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())["stream"]
    assert [(p["rank"], p["world"]) for p in positions] == [(0, 2), (1, 2)]
    # rank r read source rows r, r + 2, ...: its cursor is after its last row, of its own parity
    assert {p["cursor"]["row"] % 2 for p in positions} == {0, 1}
    resumed = torchrun("r.yaml")
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert abs(resumed[step] - full[step]) <= 1e-5, (step, resumed, full)
    # the same checkpoint on one process: its stream restarts where the slower process was
    one = train(_config(tmp_path, tiny_model_dir, name="one.yaml", output_dir=str(tmp_path / "one"), **keys,
                        resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2")))
    assert sorted(losses(one)) == [3, 4]
