"""Loading `datasets:` entries: local file formats, folders, data_files, split, ds_type, shards, hub ids,
and the errors for missing or malformed files."""

from __future__ import annotations

import gzip
import json
import time

import pytest

from tuneforge.config import ConfigError, load
from tuneforge.data.sources import load_source
from tuneforge.errors import DataError

ROWS = [{"text": f"row {i}", "n": i} for i in range(10)]


def source(entry: dict, config_file=None):
    if config_file is not None:
        import yaml

        config_file.write_text(yaml.safe_dump({"base_model": "unused", "datasets": [entry]}))
        cfg = load(config_file)
    else:
        cfg = load(data={"base_model": "unused", "datasets": [entry]})
    return load_source(cfg.datasets[0], cfg, "datasets[0]")


def texts(ds) -> list[str]:
    return list(ds["text"])


def all_texts(rows=ROWS) -> list[str]:
    return [r["text"] for r in rows]


@pytest.fixture
def hf_rows():
    import datasets

    return datasets.Dataset.from_list(ROWS)


# ---------------------------------------------------------------- file formats
def test_jsonl_and_json_array(tmp_path, write_jsonl):
    assert texts(source({"path": str(write_jsonl(ROWS))})) == all_texts()
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(ROWS))
    ds = source({"path": str(array)})
    assert texts(ds) == all_texts() and list(ds["n"]) == list(range(10))


def test_parquet_csv_and_text(tmp_path, hf_rows):
    hf_rows.to_parquet(str(tmp_path / "d.parquet"))
    hf_rows.to_csv(str(tmp_path / "d.csv"), index=False)
    (tmp_path / "d.txt").write_text("first line\nsecond line\n")
    assert texts(source({"path": str(tmp_path / "d.parquet")})) == all_texts()
    csv = source({"path": str(tmp_path / "d.csv")})
    assert texts(csv) == all_texts() and list(csv["n"]) == list(range(10))
    assert texts(source({"path": str(tmp_path / "d.txt")})) == ["first line", "second line"]


def test_arrow_file_and_save_to_disk_folder(tmp_path, hf_rows):
    import datasets
    import pyarrow as pa

    table = pa.table({"text": all_texts()})
    with pa.OSFile(str(tmp_path / "plain.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    assert texts(source({"path": str(tmp_path / "plain.arrow")})) == all_texts()

    hf_rows.save_to_disk(str(tmp_path / "saved"))
    assert texts(source({"path": str(tmp_path / "saved")})) == all_texts()
    # The .arrow file inside a save_to_disk folder also loads on its own.
    [inner] = (tmp_path / "saved").glob("*.arrow")
    assert texts(source({"path": str(inner)})) == all_texts()

    dd = datasets.DatasetDict({"train": hf_rows.select(range(3)), "test": hf_rows.select(range(7, 10))})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert texts(source({"path": str(tmp_path / "dict"), "split": "test"})) == all_texts()[7:]
    with pytest.raises(DataError, match=r"has no split `validation`; it has: train, test"):
        source({"path": str(tmp_path / "dict"), "split": "validation"})


def test_compressed_jsonl(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS)
    assert texts(source({"path": str(path)})) == all_texts()


# ---------------------------------------------------------------- folders, data_files, split, ds_type, shards
def test_folder_of_files_and_data_files(tmp_path, write_jsonl):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:4]))
    (folder / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[4:]))
    (folder / "notes.md").write_text("not data")
    assert sorted(texts(source({"path": str(folder)}))) == sorted(all_texts())
    assert texts(source({"path": str(folder), "data_files": "b.jsonl"})) == all_texts()[4:]
    assert texts(source({"path": str(folder), "data_files": ["a*.jsonl"]})) == all_texts()[:4]
    with pytest.raises(DataError, match=r"data_files entry `c.jsonl` matches no file"):
        source({"path": str(folder), "data_files": ["c.jsonl"]})


def test_split_slice_and_ds_type(tmp_path, write_jsonl):
    path = write_jsonl(ROWS)
    assert texts(source({"path": str(path), "split": "train[:30%]"})) == all_texts()[:3]
    assert texts(source({"path": str(path), "split": "train[-2:]"})) == all_texts()[8:]
    no_ext = tmp_path / "rows.data"
    no_ext.write_text(path.read_text())
    with pytest.raises(DataError, match=r"cannot tell the file format.*set `ds_type:`"):
        source({"path": str(no_ext)})
    assert texts(source({"path": str(no_ext), "ds_type": "jsonl"})) == all_texts()
    with pytest.raises(DataError, match=r'Unknown split "test"'):
        source({"path": str(path), "split": "test"})


def test_shards(write_jsonl):
    path = str(write_jsonl(ROWS))
    # Contiguous shards of 10 rows in 3: sizes 4, 3, 3.
    assert texts(source({"path": path, "shards": 3})) == ["row 0", "row 1", "row 2", "row 3"]
    assert texts(source({"path": path, "shards": 3, "shards_idx": 1})) == ["row 4", "row 5", "row 6"]
    assert texts(source({"path": path, "shards": 3, "shards_idx": 2})) == ["row 7", "row 8", "row 9"]
    with pytest.raises(ConfigError, match=r"shards_idx: must be below shards \(3\)"):
        source({"path": path, "shards": 3, "shards_idx": 3})


def test_relative_path_is_found_next_to_the_config(tmp_path, monkeypatch, write_jsonl):
    write_jsonl(ROWS, "beside.jsonl")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert texts(source({"path": "beside.jsonl"}, config_file=tmp_path / "cfg.yaml")) == all_texts()


# ---------------------------------------------------------------- hub ids
def test_hub_entry_keys_reach_load_dataset(monkeypatch, hf_rows):
    import datasets

    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return hf_rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = source({"path": "someone/some-set", "name": "subset", "split": "train[:10%]", "revision": "abc123",
                 "data_files": ["x.parquet"], "shards": 2, "shards_idx": 1})
    assert calls == [("someone/some-set", {"name": "subset", "split": "train[:10%]", "data_files": ["x.parquet"],
                                           "revision": "abc123"})]
    assert texts(ds) == all_texts()[5:]


def test_unreachable_hub_id_fails_fast_and_clearly(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        source({"path": "nobody-tuneforge/no-such-dataset"})
    assert time.monotonic() - start < 15
    message = str(err.value)
    assert message.startswith("datasets[0]: could not load `nobody-tuneforge/no-such-dataset` from the Hugging Face hub")
    assert "Offline mode is on" in message and "\n" not in message


# ---------------------------------------------------------------- missing and malformed files
def test_missing_file_names_path_and_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        source({"path": "data/missing.jsonl"})
    assert f"dataset file not found: data/missing.jsonl (looked in {tmp_path}). " in str(err.value)  # once
    elsewhere = tmp_path / "run"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(DataError) as err:
        source({"path": "data/missing.jsonl"}, config_file=tmp_path / "config.yaml")
    assert f"(looked in {tmp_path} and {elsewhere})" in str(err.value)  # the config's folder first, as resolved
    with pytest.raises(DataError, match=r"dataset file not found: /nowhere/x.jsonl \(looked in /nowhere/x.jsonl\)"):
        source({"path": "/nowhere/x.jsonl"})


def test_malformed_json_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok too"}\n\n{"text": "broken"\n')
    with pytest.raises(DataError, match=r"could not read .*bad.jsonl as json: bad.jsonl line 4: invalid JSON"):
        source({"path": str(path)})
    array = tmp_path / "bad.json"
    array.write_text('[\n{"text": "a"},\n{"text": "b"\n]')
    with pytest.raises(DataError, match=r"bad.json: invalid JSON at line 4"):
        source({"path": str(array)})


def test_non_object_line_and_empty_file(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"text": "ok"}\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"list.jsonl line 2: each line must be a JSON object, got list"):
        source({"path": str(path)})
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty.jsonl is empty"):
        source({"path": str(empty)})
