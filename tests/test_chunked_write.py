"""The final write of a prepared split (data/chunked.write_rows): rows in the split's order, and no page of the
source is left resident in the process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


def _file_backed(n: int, tmp_path: Path):
    import datasets

    rows = {"input_ids": [list(range(i % 50, i % 50 + 200)) for i in range(n)], "length": [200] * n,
            "_source": [i % 3 for i in range(n)]}
    datasets.Dataset.from_dict(rows).to_parquet(tmp_path / "rows.parquet")  # any source; the cache is Arrow
    ds = datasets.Dataset.from_parquet(str(tmp_path / "rows.parquet"), cache_dir=str(tmp_path / "hf"))
    assert ds.cache_files, "the rows must live in a memory-mapped Arrow file, as prepared data does"
    return ds


def test_written_rows_follow_the_shuffled_selected_order(tmp_path, monkeypatch):
    import datasets

    from tuneforge.data import chunked
    from tuneforge.data.chunked import write_rows

    monkeypatch.setattr(chunked, "BUCKET_BYTES", 300_000)  # several buckets, the last one partial

    ds = _file_backed(2500, tmp_path).shuffle(seed=4).select(range(0, 2500, 2)).remove_columns(["length"])
    assert write_rows(ds, tmp_path / "out.arrow") == len(ds)
    back = datasets.Dataset.from_file(str(tmp_path / "out.arrow"))
    assert back.features == ds.features
    assert back[:] == ds[:]
    small = chunked.columns_in_order(ds, ["_source"])  # what the statistics read, in the same order
    assert small["_source"].tolist() == ds["_source"]
    repeated = ds.select([5, 5, 0])  # a row twice: no permutation, rows taken one chunk at a time
    assert write_rows(repeated, tmp_path / "rep.arrow") == 3
    assert datasets.Dataset.from_file(str(tmp_path / "rep.arrow"))[:] == repeated[:]


def _resident_kib(path: Path) -> int:
    """Resident KiB of the process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef" and "-" in line.split()[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_the_gathered_pages_do_not_stay_mapped(tmp_path):
    """`save_to_disk` of the same shuffled split leaves the file resident through the dataset's memory map
    (checked here too, so the test shows the difference it is about)."""
    from tuneforge.data.chunked import write_rows

    ds = _file_backed(8000, tmp_path).shuffle(seed=1)
    source = Path(ds.cache_files[0]["filename"])
    size_kib = source.stat().st_size // 1024
    assert size_kib > 4000  # ~6 MB: large enough for the difference to be unmistakable
    before = _resident_kib(source)  # what building the dataset read
    write_rows(ds, tmp_path / "out.arrow")
    assert _resident_kib(source) - before < size_kib / 20
    ds.save_to_disk(str(tmp_path / "saved"))
    assert _resident_kib(source) - before > size_kib / 2
