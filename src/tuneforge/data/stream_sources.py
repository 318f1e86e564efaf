"""The rows of one streamed dataset entry: read lazily, this process's share only, from a saved position.

Local JSON-lines and text files (uncompressed) are read line by line from a byte offset: a resumed run seeks
straight to where the checkpoint stopped, reading nothing twice. Anything else (parquet, csv, compressed
files, a JSON array, hub ids) goes through the datasets library's streaming `IterableDataset`; a resumed run
skips the rows already consumed (read again, never trained on).

Data parallelism: source row r (counted after the entry's `skip`) belongs to process r % world, so the
processes read disjoint shards whose union is the whole entry. Other processes' lines are not even parsed.

`rows(...)` yields (row, cursor before the row, cursor after it); a cursor is a small dict the stream stores in
checkpoints. `window_rows(...)` gives them in the order training takes them: in order, or shuffled in windows.

Shuffling (`shuffle_merged_datasets`, default on, as for prepared data): the process's rows are read
`streaming_multipack_buffer_size` at a time (a window), and each window is taken in a random order seeded by
`seed`, the pass, the entry, the window's first row and the process. The position is then (cursor at the window's
start, rows of the window taken): a resumed run reads the window again, orders it the same way and skips the
rows already taken, so it continues exactly; memory holds one window of source rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.config.schema import Config
from tuneforge.errors import DataError

from .sources import _COMPRESSION, _EXTENSIONS, _looks_local, _suffix

_BUILDERS = ("json", "text", "parquet", "csv")  # `path: json` + data_files, as Axolotl writes it


class EntryFiles:
    """Where one entry's rows come from: local files of one kind, or a hub id."""

    def __init__(self, entry, cfg: Config, where: str):
        self.entry, self.where, self.cfg = entry, where, cfg
        self.hub: str | None = None
        self.files: list[Path] = []
        given = [entry.data_files] if isinstance(entry.data_files, str) else list(entry.data_files or [])
        if entry.path in _BUILDERS and given:
            self.files = [self._local(f) for f in given]
            kind = entry.path
        else:
            resolved = Path(cfg.resolve_path(entry.path) or entry.path).expanduser()
            if resolved.is_file():
                self.files = [resolved]
            elif resolved.is_dir():
                self.files = [self._local(str(resolved / f)) for f in given] if given else sorted(
                    f for f in resolved.rglob("*") if f.is_file() and _suffix(f) in _EXTENSIONS)
                if not self.files:
                    raise DataError(f"{where}: {entry.path} is a folder without data files (.jsonl, .json, "
                                    ".txt, .parquet, .csv); name them with data_files.")
            elif _looks_local(entry.path):
                raise DataError(f"{where}: dataset file not found: {entry.path}. Check the path (relative paths "
                                "start at the config's folder), or give a hub dataset id (owner/name).")
            else:
                self.hub = entry.path
            kind = None
        self.kind = self._kind(kind)

    def _local(self, name: str) -> Path:
        path = Path(self.cfg.resolve_path(name) or name).expanduser()
        if not path.is_file():
            raise DataError(f"{self.where}: data file not found: {name}. Check data_files (relative paths start at "
                            "the config's folder).")
        return path

    def _kind(self, builder: str | None) -> str:
        if self.hub:
            return "hub"
        if self.entry.ds_type:
            builder = "json" if self.entry.ds_type == "jsonl" else self.entry.ds_type
        kinds = {builder or _EXTENSIONS.get(_suffix(f)) for f in self.files}
        if len(kinds) != 1 or None in kinds:
            raise DataError(f"{self.where}: cannot tell the file format of {self.entry.path}; set `ds_type:` (json, "
                            "text, parquet, csv) or give files of one format.")
        return kinds.pop()

    @property
    def seekable(self) -> bool:
        """Line files read from a byte offset (a compressed file or a JSON array cannot be)."""
        if self.kind not in ("json", "text") or any(f.suffixes and f.suffixes[-1] in _COMPRESSION
                                                    for f in self.files):
            return False
        return all(_first_char(f) != "[" for f in self.files) if self.kind == "json" else True


def _first_char(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head[:1].decode("ascii", "replace")


def window_rows(src: EntryFiles, *, rank: int, world: int, cursor: dict | None, taken: int, window: int,
                seed: list[int] | None) -> Iterator[tuple[dict[str, Any], dict, tuple[dict | None, int]]]:
    """This process's rows of the entry in training order, from a position (cursor of a window's start, rows of
    that window taken): (row, cursor before it, position after taking it). `seed` None: in order (use window 1)."""
    reader = rows(src, rank=rank, world=world, cursor=cursor)
    while True:
        chunk = None  # the window taken is let go before the next one is read: memory holds one
        chunk = list(islice(reader, window))
        if not chunk:
            return
        order = np.arange(len(chunk))
        if seed is not None:
            start = cursor["row"] if cursor else 0
            order = np.random.default_rng([*seed, start, rank, world]).permutation(len(chunk))
        end = chunk[-1][2]
        for k in range(taken, len(chunk)):
            row, before, _ = chunk[order[k]]
            yield row, before, ((cursor, k + 1) if k + 1 < len(chunk) else (end, 0))
        cursor, taken = end, 0


def rows(src: EntryFiles, *, rank: int, world: int, cursor: dict | None) -> Iterator[tuple[dict[str, Any], dict, dict]]:
    """This process's rows of the entry from `cursor` (None: the start), each with the cursors before and after."""
    if src.seekable:
        return _line_rows(src, rank, world, cursor or {"file": 0, "offset": 0, "line": 0, "row": 0})
    return _library_rows(src, rank, world, cursor or {"row": 0})


def _mine(row: int, skip: int, rank: int, world: int) -> bool:
    return row >= skip and (row - skip) % world == rank


def _line_rows(src: EntryFiles, rank: int, world: int, cursor: dict):
    skip = getattr(src.entry, "skip", 0)  # pretraining_dataset entries only
    row = cursor["row"]
    for i in range(cursor["file"], len(src.files)):
        path = src.files[i]
        offset, line = (cursor["offset"], cursor["line"]) if i == cursor["file"] else (0, 0)
        with open(path, "rb") as f:
            f.seek(offset)
            for raw in f:
                offset += len(raw)
                line += 1
                row += 1
                if not _mine(row - 1, skip, rank, world):
                    continue
                before = {"file": i, "offset": offset - len(raw), "line": line - 1, "row": row - 1}
                after = {"file": i, "offset": offset, "line": line, "row": row}
                yield _parse(raw, src, path, line - 1), before, after


def _parse(raw: bytes, src: EntryFiles, path: Path, line: int) -> dict[str, Any]:
    text = raw.decode("utf-8", errors="replace")
    if src.kind == "text":
        return {"text": text.rstrip("\r\n")}
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{src.where}: {path} line {line} (counting from 0) is not valid JSON ({exc.msg}); fix "
                        "or remove that line.") from None
    if not isinstance(value, dict):
        raise DataError(f"{src.where}: {path} line {line} (counting from 0) is a JSON {type(value).__name__}, "
                        "not an object with named fields.")
    return value


def _library_rows(src: EntryFiles, rank: int, world: int, cursor: dict):
    import datasets

    entry = src.entry
    if src.hub:
        ds = datasets.load_dataset(src.hub, name=entry.name, split=entry.split, data_files=entry.data_files,
                                   streaming=True)
    else:
        ds = datasets.load_dataset(src.kind, data_files=[str(f) for f in src.files], split="train", streaming=True)
    start = cursor["row"]
    if start:
        ds = ds.skip(start)
    for row, value in enumerate(ds, start):
        if _mine(row, getattr(entry, "skip", 0), rank, world):
            yield dict(value), {"row": row}, {"row": row + 1}
