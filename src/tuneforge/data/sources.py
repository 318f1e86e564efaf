"""Load one `datasets:` entry into a `datasets.Dataset`: local files and folders, or hub ids.

Local paths are looked up next to the config file first, then in the working directory. Supported:
json/jsonl, parquet, csv, arrow (a plain Arrow file or a `save_to_disk` folder) and text files, each
optionally compressed (.gz, .bz2, .xz, .zst); a folder loads all its files of one format, or the
`data_files` inside it (names or glob patterns). `split` selects a split and accepts slices
(`train[:10%]`). Anything that is not a local path is a hub id and goes to `datasets.load_dataset`
with `name`, `split`, `data_files` and `revision`.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import os
from pathlib import Path

from tuneforge.config.data import DatasetEntry
from tuneforge.config.schema import Config
from tuneforge.errors import DataError

_EXTENSIONS = {
    ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow", ".txt": "text",
}
# The datasets library decompresses these transparently; the format is the suffix before them.
_COMPRESSION = {".gz", ".bz2", ".xz", ".zst", ".zstd"}


def load_source(entry: DatasetEntry, cfg: Config, where: str, cache_dir: Path | None = None):
    """Load the entry's rows. `where` names the entry in error messages (e.g. "datasets[0]"); local files are
    converted to Arrow in `cache_dir` when given (a folder the caller deletes), else in datasets' cache."""
    import datasets

    datasets.disable_progress_bars()
    resolved = cfg.resolve_path(entry.path)
    local = Path(resolved).expanduser()
    if local.exists():
        ds = _load_local(entry, local, where, cache_dir)
    elif _looks_local(entry.path):
        folders = dict.fromkeys(str(Path(d).resolve()) for d in (cfg.source_dir, Path.cwd()) if d)  # config's first
        looked = entry.path if Path(entry.path).expanduser().is_absolute() else " and ".join(folders)
        raise DataError(
            f"{where}: dataset file not found: {entry.path} (looked in {looked}). "
            "Check the path, or give a hub dataset id (owner/name)."
        )
    else:
        ds = _load_hub(entry, where)
    return _shard(ds, entry, where)


def _shard(ds, entry: DatasetEntry, where: str):
    # The config rules already reject shards_idx >= shards.
    if not entry.shards:
        return ds
    return ds.shard(num_shards=entry.shards, index=entry.shards_idx or 0)


def _looks_local(path: str) -> bool:
    # A hub id is exactly `owner/name`; anything else (a suffix, ./ or /, deeper paths) is meant as a file.
    return path.startswith((".", "/", "~")) or _suffix(Path(path)) in _EXTENSIONS or path.count("/") != 1


def _suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _file_type(entry: DatasetEntry, files: list[Path], where: str) -> str:
    if entry.ds_type:
        return "json" if entry.ds_type == "jsonl" else entry.ds_type
    kinds = {_EXTENSIONS.get(_suffix(f)) for f in files}
    if len(kinds) != 1 or None in kinds:
        found = ", ".join(sorted({"".join(f.suffixes) or "<none>" for f in files})) or "no files"
        raise DataError(
            f"{where}: cannot tell the file format of {entry.path} ({found}); "
            "set `ds_type:` (json, parquet, csv, arrow, text), or give files of one format."
        )
    return kinds.pop()


def _folder_files(entry: DatasetEntry, path: Path, where: str) -> list[Path]:
    if not entry.data_files:
        files = sorted(f for f in path.rglob("*") if f.is_file() and _suffix(f) in _EXTENSIONS)
        if not files:
            raise DataError(f"{where}: folder {path} holds no json/jsonl/parquet/csv/arrow/txt files.")
        return files
    names = [entry.data_files] if isinstance(entry.data_files, str) else entry.data_files
    files: list[Path] = []
    for name in names:
        matched = sorted(path.glob(name)) if any(c in name for c in "*?[") else [path / name]
        missing = [m for m in matched if not m.is_file()]
        if not matched or missing:
            raise DataError(f"{where}: data_files entry `{name}` matches no file in {path}.")
        files += matched
    return files


def _load_local(entry: DatasetEntry, path: Path, where: str, cache_dir: Path | None = None):
    import datasets

    split = entry.split or "train"
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        return _load_saved(path, split, where)
    files = _folder_files(entry, path, where) if path.is_dir() else [path]
    kind = _file_type(entry, files, where)
    empty = [f for f in files if f.stat().st_size == 0]
    if empty:
        raise DataError(f"{where}: {empty[0]} is empty.")
    if kind in ("json", "csv", "text"):
        for f in files:
            _check_utf8(f, where)
    try:
        with _quiet_datasets_errors():
            return datasets.load_dataset(kind, data_files=[str(f) for f in files], split=split,
                                         cache_dir=str(cache_dir) if cache_dir else None)
    except Exception as exc:  # the datasets library raises many kinds; the user needs the file and the cause
        raise DataError(f"{where}: could not read {path} as {kind}: {_explain(files, kind, exc)}") from None


def _check_utf8(path: Path, where: str) -> None:
    """Text data must be UTF-8. The datasets library stores invalid bytes and fails only when the row is
    read, deep in formatting and without its number: check first, naming the line (row = line - 1 in JSON
    lines without blank lines)."""
    if path.suffix.lower() in _COMPRESSION:
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                line += chunk[: exc.start].count(b"\n")
                raise DataError(f"{where}: {path.name} line {line} is not UTF-8 text (byte {chunk[exc.start]:#04x}); "
                                "save the file as UTF-8.") from None
            line += chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"{where}: {path.name} ends in the middle of a UTF-8 character; save the file as UTF-8."
                        ) from None


@contextlib.contextmanager
def _quiet_datasets_errors():
    """The datasets library logs a parse failure before raising; we raise one clearer message instead."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load_saved(path: Path, split: str, where: str):
    """A folder written by `save_to_disk`: a Dataset, or a DatasetDict from which `split` is taken."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    if split not in loaded:
        raise DataError(f"{where}: {path} has no split `{split}`; it has: {', '.join(loaded)}. Set `split:`.")
    return loaded[split]


def _explain(files: list[Path], kind: str, exc: Exception) -> str:
    if kind == "json":
        for f in files:
            bad = _first_bad_json_line(f)
            if bad:
                return bad
    cause = exc.__cause__ or exc
    return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"


def _first_bad_json_line(path: Path) -> str | None:
    if path.suffix.lower() in _COMPRESSION:
        return None  # compressed: leave the explanation to the datasets library
    text = path.read_text(errors="replace")
    if text.lstrip().startswith("["):
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as exc:
            return f"{path.name}: invalid JSON at line {exc.lineno}: {exc.msg}"
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"{path.name} line {n}: invalid JSON ({exc.msg})"
        if not isinstance(value, dict):
            return f"{path.name} line {n}: each line must be a JSON object, got {type(value).__name__}"
    return None


def _load_hub(entry: DatasetEntry, where: str):
    import datasets

    kwargs = {"name": entry.name, "split": entry.split or "train", "data_files": entry.data_files,
              "revision": entry.revision}
    if entry.trust_remote_code:
        kwargs["trust_remote_code"] = True
    try:
        return datasets.load_dataset(entry.path, **kwargs)
    except Exception as exc:
        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
        hint = " Offline mode is on (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE), so only cached hub datasets load." if offline else ""
        raise DataError(
            f"{where}: could not load `{entry.path}` from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}).{hint} If it is a local file, check the path."
        ) from None
