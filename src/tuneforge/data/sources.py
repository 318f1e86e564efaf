"""Load one `datasets:` entry into a `datasets.Dataset`: local files and folders, or hub ids."""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.config.data import DatasetEntry
from tuneforge.config.schema import Config
from tuneforge.errors import DataError

_EXTENSIONS = {
    ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow", ".txt": "text",
}


def load_source(entry: DatasetEntry, cfg: Config, where: str):
    """Load the entry's rows. `where` names the entry in error messages (e.g. "datasets[0]")."""
    import datasets

    datasets.disable_progress_bars()
    resolved = cfg.resolve_path(entry.path)
    local = Path(resolved)
    if local.exists():
        ds = _load_local(entry, local, where)
    elif _looks_local(entry.path):
        raise DataError(
            f"{where}: dataset file not found: {entry.path} (looked in {Path.cwd()} and {cfg.source_dir}). "
            "Check the path, or give a hub dataset id."
        )
    else:
        ds = _load_hub(entry, where)
    if entry.shards:
        ds = ds.shard(num_shards=entry.shards, index=entry.shards_idx or 0)
    return ds


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix in _EXTENSIONS or path.count("/") != 1


def _file_type(entry: DatasetEntry, files: list[Path], where: str) -> str:
    if entry.ds_type:
        return "json" if entry.ds_type == "jsonl" else entry.ds_type
    kinds = {_EXTENSIONS.get(f.suffix) for f in files}
    kinds.discard(None)
    if len(kinds) != 1:
        found = ", ".join(sorted({f.suffix or "<none>" for f in files})) or "no files"
        raise DataError(f"{where}: cannot tell the file format of {entry.path} ({found}); set `ds_type:` (json, parquet, csv, arrow, text).")
    return kinds.pop()


def _load_local(entry: DatasetEntry, path: Path, where: str):
    import datasets

    split = entry.split or "train"
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    if path.is_dir():
        if entry.data_files:
            names = [entry.data_files] if isinstance(entry.data_files, str) else entry.data_files
            files = [path / n for n in names]
        else:
            files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in _EXTENSIONS)
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise DataError(f"{where}: data file not found: {', '.join(missing)}")
        if not files:
            raise DataError(f"{where}: folder {path} holds no json/jsonl/parquet/csv/arrow/txt files.")
    else:
        files = [path]
    kind = _file_type(entry, files, where)
    try:
        dd = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    except Exception as exc:  # the datasets library raises many kinds; the user needs the file and the cause
        raise DataError(f"{where}: could not read {path} as {kind}: {_explain(files, kind, exc)}") from None
    return dd


def _explain(files: list[Path], kind: str, exc: Exception) -> str:
    if kind == "json":
        for f in files:
            bad = _first_bad_json_line(f)
            if bad:
                return bad
    cause = exc.__cause__ or exc
    return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"


def _first_bad_json_line(path: Path) -> str | None:
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
        raise DataError(
            f"{where}: could not load `{entry.path}` from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). If it is a local file, check the path."
        ) from None
