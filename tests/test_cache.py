"""The prepared-data cache: what its key covers, reuse, atomic writes, and recovery from damage."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from tuneforge.config import load
from tuneforge.config.data import DataKeys
from tuneforge.data import cache, formats, pipeline
from tuneforge.data.cache import cache_key
from tuneforge.data.pipeline import prepare

IGN = -100


def _rows(n: int = 40, salt: int = 0) -> list[dict]:
    rows = []
    for i in range(n):
        ids = [10 + (i * 7 + k * 3 + salt) % 900 for k in range(5 + i % 9)]
        rows.append({"input_ids": ids, "labels": [IGN, IGN] + ids[2:]})
    return rows


@pytest.fixture
def setup(tmp_path, write_config, write_jsonl, tiny_tokenizer):
    """Returns make(extra_config) -> (cfg, tokenizer), with one pre-tokenized data file."""
    data = write_jsonl(_rows())

    def make(extra: dict | None = None, name: str = "config.yaml"):
        body = {"datasets": [{"path": str(data)}], "dataset_prepared_path": str(tmp_path / "prepared"),
                **(extra or {})}
        return load(write_config(body, name), []), tiny_tokenizer

    make.data = data
    make.root = tmp_path / "prepared"
    return make


def _key(make, extra=None, tokenizer=None) -> str:
    cfg, tok = make(extra)
    return cache_key(cfg, tokenizer or tok)[0]


# ---------------------------------------------------------------- what the key covers
def test_key_is_stable_across_loads(setup, tiny_model_dir):
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert _key(setup) == _key(setup) == _key(setup, tokenizer=again)


@pytest.mark.parametrize("extra", [
    {"output_dir": "/elsewhere/out"},
    {"learning_rate": 3e-4, "num_epochs": 3, "warmup_steps": 5, "optimizer": "adamw_torch"},
    {"micro_batch_size": 8, "gradient_accumulation_steps": 4},
    {"sample_packing": True, "pad_to_sequence_len": True, "sample_packing_bin_size": 10,
     "sample_packing_group_size": 1000, "sample_packing_sequentially": True, "eval_sample_packing": False},
    {"logging_steps": 7, "wandb_project": "p", "use_tensorboard": True},
    {"adapter": "lora", "lora_r": 16, "lora_target_linear": True},
    {"dataset_num_proc": 4},
], ids=["output_dir", "optimizer", "batch", "packing", "logging", "adapter", "num_proc"])
def test_key_ignores_keys_that_do_not_change_tokens(setup, extra):
    assert _key(setup, extra) == _key(setup)


@pytest.mark.parametrize("extra", [
    {"sequence_len": 256},
    {"eval_sequence_len": 64, "val_set_size": 0.1},
    {"excess_length_strategy": "truncate"},
    {"min_sample_len": 3},
    {"train_on_inputs": True},
    {"eot_tokens": ["<|im_end|>"]},
    {"chat_template": "chatml"},
    {"chat_template_kwargs": {"enable_thinking": False}},
    {"default_system_message": "Be brief."},
    {"special_tokens": {"pad_token": "<unk>"}},
    {"tokens": ["<extra_tok>"]},
    {"dataset_exact_deduplication": True},
    {"shuffle_merged_datasets": False},
    {"seed": 1},
    {"val_set_size": 0.2},
    {"extra": {"reward": "x"}},
], ids=lambda d: next(iter(d)))
def test_key_changes_with_each_token_affecting_config_key(setup, extra):
    assert _key(setup, extra) != _key(setup)


def test_key_changes_with_test_datasets(setup, write_jsonl):
    other = write_jsonl(_rows(10, salt=1), "eval.jsonl")
    assert _key(setup, {"test_datasets": [{"path": str(other)}]}) != _key(setup)


@pytest.mark.parametrize("field,value", [
    ("split", "validation"), ("roles_to_train", ["user", "assistant"]), ("train_on_eos", "all"),
    ("field_messages", "conversation"), ("shards", 2), ("drop_system_message", True),
    ("message_property_mappings", {"role": "from", "content": "value"}), ("chat_template", "chatml"),
])
def test_key_changes_with_every_dataset_entry_field(setup, field, value):
    base = {"datasets": [{"path": str(setup.data)}]}
    changed = {"datasets": [{"path": str(setup.data), field: value}]}
    assert _key(setup, changed) != _key(setup, base)


def test_key_hashes_file_contents_not_size_or_mtime(setup):
    before = _key(setup)
    stat = setup.data.stat()
    text = setup.data.read_text()
    edited = text.replace('"input_ids": [10,', '"input_ids": [11,', 1)
    assert edited != text and len(edited) == len(text)
    setup.data.write_text(edited)
    os.utime(setup.data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    assert setup.data.stat().st_mtime_ns == stat.st_mtime_ns
    assert _key(setup) != before


def test_key_follows_contents_not_location(setup, tmp_path):
    moved = tmp_path / "moved" / "data.jsonl"
    moved.parent.mkdir()
    moved.write_bytes(setup.data.read_bytes())
    assert _key(setup, {"datasets": [{"path": str(moved)}]}) == _key(setup)


def test_key_covers_every_file_of_a_folder(setup, tmp_path, write_jsonl):
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps(_rows(3)[0]) + "\n")
    (folder / "b.jsonl").write_text(json.dumps(_rows(3)[1]) + "\n")
    extra = {"datasets": [{"path": str(folder)}]}
    before = _key(setup, extra)
    (folder / "b.jsonl").write_text(json.dumps(_rows(3)[2]) + "\n")
    assert _key(setup, extra) != before


def test_key_changes_with_the_tokenizer(setup, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    base = _key(setup)
    added = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    added.add_tokens(["<brand_new>"])
    assert _key(setup, tokenizer=added) != base
    special = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    special.add_special_tokens({"eos_token": "<|im_end|>"})
    assert _key(setup, tokenizer=special) != base
    templated = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    templated.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert _key(setup, tokenizer=templated) != base
    # The same tokenizer saved elsewhere with an edited tokenizer_config.json is a different tokenizer folder.
    other = tmp_path / "tok2"
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(str(other))
    conf = json.loads((other / "tokenizer_config.json").read_text())
    conf["model_max_length"] = 77
    (other / "tokenizer_config.json").write_text(json.dumps(conf))
    assert _key(setup, tokenizer=AutoTokenizer.from_pretrained(str(other))) != base


def test_key_changes_with_a_jinja_template_file(setup, tmp_path):
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    extra = {"datasets": [{"path": str(setup.data), "chat_template_jinja": str(tpl)}]}
    before = _key(setup, extra)
    tpl.write_text("{% for m in messages %}{{ m['role'] }}{% endfor %}")
    assert _key(setup, extra) != before


def test_key_changes_with_the_format_version(setup, monkeypatch):
    fmt = formats.registered()["pretokenized"]
    before = _key(setup)
    monkeypatch.setitem(formats._REGISTRY, "pretokenized", formats.Format(fmt.name, fmt.builder, "999"))
    assert _key(setup) != before


def test_key_changes_when_the_user_module_source_is_edited(setup, tmp_path, monkeypatch):
    name = f"userfmt_{uuid.uuid4().hex[:8]}"
    src = tmp_path / f"{name}.py"
    src.write_text("def fmt(row, tokenizer, cfg):\n    return {'input_ids': row['input_ids']}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    extra = {"datasets": [{"path": str(setup.data), "type": f"{name}.fmt"}]}
    before = _key(setup, extra)
    assert _key(setup, extra) == before
    src.write_text("def fmt(row, tokenizer, cfg):\n    return {'input_ids': row['input_ids'][:4]}\n")
    assert _key(setup, extra) != before


def test_key_for_hub_datasets_uses_id_revision_split_name(setup):
    def hub(**kw):
        return {"datasets": [{"path": "some-org/some-dataset", **kw}]}

    base = _key(setup, hub())
    assert _key(setup, hub()) == base
    for kw in ({"revision": "abc123"}, {"split": "test"}, {"name": "en"}, {"data_files": "x.json"}):
        assert _key(setup, hub(**kw)) != base, kw
    assert _key(setup, {"datasets": [{"path": "other-org/some-dataset"}]}) != base


def test_key_changes_with_the_cache_format(setup, monkeypatch):
    before = _key(setup)
    monkeypatch.setattr(cache, "CACHE_FORMAT", "999")
    assert _key(setup) != before


def test_every_data_key_is_classified():
    """A new data key must be put in the key (TOKEN_KEYS) or declared batch-time on purpose."""
    known = set(cache.TOKEN_KEYS) | set(cache.BATCH_TIME_KEYS) | set(cache.ENTRY_LIST_KEYS)
    unclassified = set(DataKeys.model_fields) - known
    assert not unclassified, f"classify these keys in tuneforge/data/cache.py: {sorted(unclassified)}"
    assert not set(cache.TOKEN_KEYS) & set(cache.BATCH_TIME_KEYS)


# ---------------------------------------------------------------- reuse and rebuild
def _rows_of(ds) -> list[tuple]:
    return [(r["input_ids"], r["labels"], r["_row"]) for r in ds]


def test_second_prepare_reuses_the_cache(setup, monkeypatch, caplog):
    cfg, tok = setup({"val_set_size": 5})
    first = prepare(cfg, tok)
    assert not first.reused_cache and first.cache_dir.parent == setup.root
    assert (first.cache_dir / cache.MARKER).is_file()

    def no_build(*a, **k):
        raise AssertionError("rebuilt although the cache is valid")

    monkeypatch.setattr(pipeline, "build", no_build)
    with caplog.at_level(logging.INFO, logger="tuneforge"):
        second = prepare(*setup({"val_set_size": 5, "output_dir": "/x", "learning_rate": 1.0}))
    assert second.reused_cache and second.cache_dir == first.cache_dir
    assert f"reusing prepared data from {first.cache_dir}" in caplog.text
    assert _rows_of(second.train) == _rows_of(first.train)
    assert _rows_of(second.eval) == _rows_of(first.eval)
    assert {k: v.as_dict() for k, v in second.stats.items()} == {k: v.as_dict() for k, v in first.stats.items()}
    assert second.stats["train"].rows_out + second.stats["eval"].rows_out == 40


def test_edited_data_is_never_served_stale(setup):
    first = prepare(*setup())
    setup.data.write_text("".join(json.dumps(r) + "\n" for r in _rows(40, salt=5)))
    second = prepare(*setup())
    assert not second.reused_cache and second.cache_dir != first.cache_dir
    expected = {tuple(r["input_ids"]) for r in _rows(40, salt=5)}
    assert {tuple(r["input_ids"]) for r in second.train} == expected


def test_rebuild_replaces_the_entry(setup):
    cfg, tok = setup()
    first = prepare(cfg, tok)
    created = json.loads((first.cache_dir / cache.MARKER).read_text())["created"]
    again = prepare(cfg, tok, rebuild=True)
    assert not again.reused_cache and again.cache_dir == first.cache_dir
    assert json.loads((again.cache_dir / cache.MARKER).read_text())["created"] > created
    assert sorted(p.name for p in setup.root.iterdir() if not p.name.endswith(".lock")) == [first.cache_dir.name]


def test_skip_prepare_dataset_writes_nothing(setup):
    data = prepare(*setup({"skip_prepare_dataset": True}))
    assert data.cache_dir is None and not data.reused_cache and len(data.train) == 40
    assert not setup.root.exists()


# ---------------------------------------------------------------- crashes and damage
def test_failure_mid_write_leaves_no_entry(setup, monkeypatch):
    from tuneforge.data import chunked

    real = chunked.write_rows
    calls = []

    def failing(ds, path):
        calls.append(path)
        real(ds, path)
        if len(calls) == 2:  # train written, eval written, then the disk fills up
            raise OSError("No space left on device")

    monkeypatch.setattr(chunked, "write_rows", failing)
    cfg, tok = setup({"val_set_size": 5})
    with pytest.raises(OSError, match="No space"):
        prepare(cfg, tok)
    key = cache_key(cfg, tok)[0]
    assert not (setup.root / key).exists()
    assert not list(setup.root.glob(".partial*"))
    monkeypatch.setattr(chunked, "write_rows", real)
    assert not prepare(cfg, tok).reused_cache


KILLER = """
import os, sys
from transformers import AutoTokenizer
from tuneforge.config import load
from tuneforge.data import chunked
from tuneforge.data.pipeline import prepare
real = chunked.write_rows
def killed(ds, path):
    real(ds, path)
    os._exit(9)  # like SIGKILL: no cleanup code runs
chunked.write_rows = killed
prepare(load(sys.argv[1], []), AutoTokenizer.from_pretrained(sys.argv[2]))
"""


def test_killed_preprocess_never_leaves_a_reusable_cache(setup, tiny_model_dir, tmp_path):
    cfg, tok = setup({"val_set_size": 5})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLER), str(tmp_path / "config.yaml"),
                           str(tiny_model_dir)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr[-2000:]
    key = cache_key(cfg, tok)[0]
    partial = list(setup.root.glob(f".partial.{key}.*"))
    assert len(partial) == 1 and (partial[0] / "train").is_dir()
    assert not (setup.root / key).exists()
    data = prepare(cfg, tok)
    assert not data.reused_cache and len(data.train) == 35 and len(data.eval) == 5
    assert not list(setup.root.glob(".partial*")), "the dead writer's folder is swept"


def _damage_marker(entry: Path):
    (entry / cache.MARKER).unlink()


def _damage_arrow(entry: Path):
    arrow = next((entry / "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-100])


def _damage_stats(entry: Path):
    (entry / "stats.json").write_text("{not json")


def _damage_key(entry: Path):
    marker = json.loads((entry / cache.MARKER).read_text())
    marker["key"] = "0" * 32
    (entry / cache.MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize("damage", [_damage_marker, _damage_arrow, _damage_stats, _damage_key])
def test_damaged_cache_is_rebuilt(setup, damage, caplog):
    cfg, tok = setup()
    first = prepare(cfg, tok)
    expected = _rows_of(first.train)
    damage(first.cache_dir)
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        again = prepare(cfg, tok)
    assert not again.reused_cache
    assert "rebuilding" in caplog.text
    assert _rows_of(again.train) == expected
    assert prepare(cfg, tok).reused_cache  # and the rebuilt entry is good
