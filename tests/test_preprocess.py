"""`tuneforge preprocess`: the summary, the --debug view, and that it always rebuilds the cache."""

from __future__ import annotations

import json
import re
import uuid

import pytest
from typer.testing import CliRunner

from tuneforge.cli import app
from tuneforge.data import cache
from tuneforge.data.packing import pack
from tuneforge.data.preprocess import MASKED_STYLE, TRAINED_STYLE, render_masked_text, render_token_triples
from tuneforge.errors import DataError

IGN = -100
PROMPT = "Question: what is two plus two?"
ANSWER = " The answer is four."


def _qa_row(tok, prompt: str = PROMPT, answer: str = ANSWER) -> dict:
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return {"input_ids": p + a, "labels": [IGN] * len(p) + a}


def _invoke(*args: str):
    result = CliRunner().invoke(app, ["preprocess", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def config(tmp_path, write_config, write_jsonl):
    def make(rows: list[dict], **extra) -> str:
        data = write_jsonl(rows)
        body = {"datasets": [{"path": str(data)}], "dataset_prepared_path": str(tmp_path / "prepared"), **extra}
        return str(write_config(body))

    return make


def _cells(line: str) -> list[str]:
    """The numbers of a summary table row, after the dataset name (whose path may hold digits)."""
    rest = line.split(".jsonl", 1)[1] if ".jsonl" in line else line.split("all", 1)[1]
    return re.findall(r"[\d,.]+%?", rest)


def test_summary_counts_rows_reasons_tokens_and_trained_share(config, tiny_tokenizer):
    ok = [{"input_ids": list(range(10, 10 + n)), "labels": [IGN] * 3 + list(range(13, 10 + n))} for n in (5, 8, 12)]
    too_long = [{"input_ids": list(range(10, 30)), "labels": list(range(10, 30))}] * 2
    untrained = [{"input_ids": [5, 6, 7, 8, 9], "labels": [IGN] * 5}]
    short = [{"input_ids": [5, 6], "labels": [5, 6]}]
    out = _invoke(config(ok + too_long + untrained + short, sequence_len=16, min_sample_len=3,
                         shuffle_merged_datasets=False))
    row = next(line for line in out.splitlines() if "datasets[0]" in line and "dropped" not in line)
    tokens = 5 + 8 + 12
    trained = (5 - 3) + (8 - 3) + (12 - 3)
    assert _cells(row) == ["7", "3", "4", "0", f"{tokens}", f"{trained}", f"{100 * trained / tokens:.1f}%"]
    assert "dropped 2 longer than sequence_len (16); 1 shorter than min_sample_len (3); 1 no trained tokens" in out
    assert "Prepared data saved to" in out


def test_summary_per_dataset_with_total_and_truncation(tmp_path, write_config, write_jsonl):
    a = write_jsonl([{"input_ids": list(range(10, 10 + n))} for n in (4, 30, 6)], "a.jsonl")
    b = write_jsonl([{"input_ids": list(range(10, 10 + n))} for n in (9, 9)], "b.jsonl")
    cfg = write_config({"datasets": [{"path": str(a)}, {"path": str(b)}], "sequence_len": 16,
                        "excess_length_strategy": "truncate", "dataset_exact_deduplication": True,
                        "dataset_prepared_path": str(tmp_path / "p")})
    out = _invoke(str(cfg))
    lines = out.splitlines()
    row_a = next(x for x in lines if x.strip().startswith("datasets[0]") and ":" not in x)
    row_b = next(x for x in lines if x.strip().startswith("datasets[1]") and ":" not in x)
    total = next(x for x in lines if x.strip().startswith("all"))
    # a: 3 rows, one cut to 16 -> 4 + 16 + 6 tokens; trained = tokens - 1 per row (no labels: all trained)
    assert _cells(row_a)[:6] == ["3", "3", "0", "1", "26", "23"]
    # b: two identical rows, one removed as an exact duplicate
    assert _cells(row_b)[:6] == ["2", "1", "1", "0", "9", "8"]
    assert _cells(total)[:6] == ["5", "4", "1", "1", "35", "31"]
    assert "truncated 1 rows to 16 tokens" in out
    assert "dropped 1 exact duplicate" in out


def test_summary_reports_packing_efficiency(config):
    lengths = [3, 17, 40, 25, 8, 60, 33, 12, 50, 29, 9, 44]
    rows = [{"input_ids": [10 + (i + k) % 500 for k in range(n)]} for i, n in enumerate(lengths)]
    out = _invoke(config(rows, sequence_len=64, sample_packing=True))
    n_rows = len(pack(lengths, 64))
    eff = sum(lengths) / (n_rows * 64)
    assert f"{len(lengths)} rows -> {n_rows} packed rows of 64 tokens, efficiency {100 * eff:.1f}%" in out


def test_debug_shows_what_is_trained(config, tiny_tokenizer):
    row = _qa_row(tiny_tokenizer)
    out = _invoke(config([row]), "--debug")
    assert f"[[{PROMPT}]]{ANSWER}</s>" in out
    first = row["input_ids"][0]
    piece = tiny_tokenizer.decode([first])
    assert f"{piece}(-100, {first})" in out
    eos = tiny_tokenizer.eos_token_id
    assert f"</s>({eos}, {eos})" in out
    assert "1 tokens" not in out and f"{len(row['input_ids'])} tokens, {len(row['labels']) - row['labels'].count(IGN)} trained" in out


def test_debug_text_only_and_num_examples(config, tiny_tokenizer):
    rows = [_qa_row(tiny_tokenizer, f"Say {w}.", f" {w}") for w in ("one", "two", "three")]
    out = _invoke(config(rows, shuffle_merged_datasets=False), "--debug", "--debug-num-examples", "2",
                  "--debug-text-only")
    assert "[[Say one.]] one</s>" in out and "[[Say two.]] two</s>" in out and "three" not in out
    assert "(-100," not in out


def test_preprocess_always_rebuilds(config, tmp_path):
    path = config([{"input_ids": [10, 11, 12, 13]}] * 3)
    _invoke(path)
    entries = [p for p in (tmp_path / "prepared").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1
    created = json.loads((entries[0] / cache.MARKER).read_text())["created"]
    out = _invoke(path)
    assert "saved to" in out and "reused" not in out
    assert json.loads((entries[0] / cache.MARKER).read_text())["created"] > created


def test_user_module_format_through_the_command(tmp_path, monkeypatch, write_config, write_jsonl, tiny_tokenizer):
    name = f"qa_fmt_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "def build(row, tokenizer, cfg):\n"
        "    p = tokenizer(row['q'], add_special_tokens=False)['input_ids']\n"
        "    a = tokenizer(row['a'], add_special_tokens=False)['input_ids']\n"
        "    return {'input_ids': p + a, 'labels': [-100] * len(p) + a}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = write_jsonl([{"q": "Name a color:", "a": " blue"}])
    cfg = write_config({"datasets": [{"path": str(data), "type": f"{name}.build"}],
                        "dataset_prepared_path": str(tmp_path / "p")})
    out = _invoke(str(cfg), "--debug")
    assert "[[Name a color:]] blue" in out


def test_no_datasets_is_one_clear_error(tmp_path, write_config):
    cfg = write_config({"dataset_prepared_path": str(tmp_path / "p")})
    result = CliRunner().invoke(app, ["preprocess", str(cfg)])
    assert isinstance(result.exception, DataError)
    assert "no `datasets:`" in str(result.exception)


def test_colours_mark_trained_and_masked_spans(tiny_tokenizer):
    row = _qa_row(tiny_tokenizer)
    text = render_masked_text(tiny_tokenizer, row["input_ids"], row["labels"])
    styled = {text.plain[s.start : s.end]: s.style for s in text.spans}
    assert styled == {f"[[{PROMPT}]]": MASKED_STYLE, f"{ANSWER}</s>": TRAINED_STYLE}
    triples = render_token_triples(tiny_tokenizer, row["input_ids"], row["labels"])
    styles = [s.style for s in triples.spans]
    n_prompt = row["labels"].count(IGN)
    assert styles == [MASKED_STYLE] * n_prompt + [TRAINED_STYLE] * (len(row["labels"]) - n_prompt)


def test_first_token_is_never_shown_as_trained(tiny_tokenizer):
    # Without labels every token is its own label, but position 0 has no previous position to predict it.
    ids = tiny_tokenizer("hello world", add_special_tokens=False)["input_ids"]
    text = render_masked_text(tiny_tokenizer, ids, list(ids))
    first = tiny_tokenizer.decode(ids[:1])
    assert text.plain.startswith(f"[[{first}]]")


def _user_format(tmp_path, monkeypatch, body: str) -> str:
    name = f"fmt_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}.build"


def test_rows_skipped_by_the_format_are_counted(tmp_path, monkeypatch, write_config, write_jsonl):
    # The first 1,100 rows (a whole map batch and more) produce nothing; the schema must still hold.
    spec = _user_format(tmp_path, monkeypatch, (
        "def build(row, tokenizer, cfg):\n"
        "    return [] if row['i'] < 1100 else {'input_ids': [10, 11, 12 + row['i'] % 7]}\n"
    ))
    data = write_jsonl([{"i": i} for i in range(1200)])
    cfg = write_config({"datasets": [{"path": str(data), "type": spec}], "dataset_prepared_path": str(tmp_path / "p")})
    out = _invoke(str(cfg))
    row = next(x for x in out.splitlines() if x.strip().startswith("datasets[0]") and ":" not in x)
    assert _cells(row)[:3] == ["1,200", "100", "1,100"]
    assert "dropped 1,100 format produced no row" in out


def test_inconsistent_format_columns_are_one_clear_error(tmp_path, monkeypatch, write_config, write_jsonl):
    spec = _user_format(tmp_path, monkeypatch, (
        "def build(row, tokenizer, cfg):\n"
        "    out = {'input_ids': [10, 11, 12]}\n"
        "    if row['i'] == 3:\n"
        "        out['extra_mask'] = [1, 1, 1]\n"
        "    return out\n"
    ))
    data = write_jsonl([{"i": i} for i in range(6)])
    cfg = write_config({"datasets": [{"path": str(data), "type": spec}], "dataset_prepared_path": str(tmp_path / "p")})
    with pytest.raises(DataError, match=r"datasets\[0\] \(.*\) row 3: the format produced the columns"):
        _invoke(str(cfg))


def test_a_format_that_produces_nothing_is_one_clear_error(tmp_path, monkeypatch, write_config, write_jsonl):
    spec = _user_format(tmp_path, monkeypatch, "def build(row, tokenizer, cfg):\n    return []\n")
    data = write_jsonl([{"i": i} for i in range(5)])
    cfg = write_config({"datasets": [{"path": str(data), "type": spec}], "dataset_prepared_path": str(tmp_path / "p")})
    with pytest.raises(DataError, match=r"datasets\[0\]: the format produced no rows from any of the 5 rows"):
        _invoke(str(cfg))


def test_debug_shows_both_sides_of_a_pair(tmp_path, monkeypatch, write_config, write_jsonl, tiny_tokenizer):
    from tuneforge.data import formats

    def build(ctx):
        def enc(s):
            return ctx.tokenizer(s, add_special_tokens=False)["input_ids"]

        def row_fn(row):
            p, c, r = enc(row["prompt"]), enc(row["chosen"]), enc(row["rejected"])
            return [{"chosen_input_ids": p + c, "chosen_labels": [IGN] * len(p) + c,
                     "rejected_input_ids": p + r, "rejected_labels": [IGN] * len(p) + r, "margin": 1.5}]

        return row_fn

    monkeypatch.setitem(formats._REGISTRY, "test_pairs", formats.Format("test_pairs", build, "1"))
    data = write_jsonl([{"prompt": "Pick a number:", "chosen": " seven", "rejected": " blue"}])
    cfg = write_config({"datasets": [{"path": str(data), "type": "test_pairs"}],
                        "dataset_prepared_path": str(tmp_path / "p")})
    out = _invoke(str(cfg), "--debug", "--debug-text-only")
    assert "margin=1.5" in out
    assert "[[Pick a number:]] seven" in out and "[[Pick a number:]] blue" in out
    n_p, n_c, n_r = (len(tiny_tokenizer(x, add_special_tokens=False)["input_ids"])
                     for x in ("Pick a number:", " seven", " blue"))
    assert f"chosen: {n_p + n_c} tokens, {n_c} trained" in out
    assert f"rejected: {n_p + n_r} tokens, {n_r} trained" in out
