"""The prepared-data cache: `dataset_prepared_path/<key>/`, keyed on everything that changes tokens.

The key is a hash over
  - the content of every local data file (streamed; size and mtime are not trusted), or, for hub
    datasets, the id + revision + split + name + data_files;
  - the tokenizer as it is used: its serialized vocabulary/merges/added tokens, special tokens, the
    chat template in force, and the contents of its files when it was loaded from a folder;
  - each dataset entry's fields and its format's `version` (for `module.function` formats that
    version hashes the module source), and the contents of per-dataset `.jinja` template files;
  - the config keys listed in TOKEN_KEYS;
  - the source of tuneforge's token-producing modules, the versions of the libraries that render and
    tokenize, and CACHE_FORMAT.
Nothing else enters it: output_dir, optimizer, batch sizes and the packing keys (packing happens at
batch time) leave the cache valid. Every data-key of the schema must be classified in TOKEN_KEYS or
BATCH_TIME_KEYS; a test enforces it, so a new key cannot silently be left out of the hash.

Writes are atomic: an entry is built in a `.partial-*` folder, gets a completion marker listing its
files and row counts, and only then is renamed to its key. A reader trusts an entry only if the
marker is there and agrees with the files, so a killed run never leaves a cache that is later reused.
The marker also holds a content hash (BLAKE2b) of every file, checked on every load: token ids changed
in place (same size) are detected and the entry rebuilt, never trained on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tuneforge.config.data import DatasetEntry
from tuneforge.config.schema import Config

from .chunked import PARTIAL_PREFIX  # .partial.<key>.<pid>.<random>.<host> while written

log = logging.getLogger("tuneforge")

CACHE_FORMAT = "3"  # bump when the layout or the meaning of the stored rows changes
DEFAULT_DIR = "last_run_prepared"
MARKER = "COMPLETE.json"
ROWS_FILE = "rows.arrow"  # each split's rows: <entry>/<split>/rows.arrow, an Arrow stream
_STALE_PARTIAL_S = 24 * 3600

# Top-level keys that change the prepared rows. Dataset entries (datasets, test_datasets) are hashed
# field by field on their own, together with their files.
TOKEN_KEYS = (
    "sequence_len", "eval_sequence_len", "excess_length_strategy", "min_sample_len", "train_on_inputs",
    "eot_tokens", "chat_template", "chat_template_jinja", "chat_template_kwargs", "default_system_message",
    "special_tokens", "tokens", "dataset_exact_deduplication", "shuffle_merged_datasets", "seed",
    "shuffle_before_merging_datasets",
    "val_set_size", "max_prompt_len", "extra", "rl", "reward_model", "process_reward_model",
    "tokenizer_type", "tokenizer_use_fast", "tokenizer_legacy",
)
# trl.* keys that shape prompt/completion rows of preference and RL data.
TRL_TOKEN_KEYS = ("max_prompt_length", "max_completion_length", "chat_template_kwargs")
# Data keys that do not change the stored rows (packing and padding happen when batches are built).
BATCH_TIME_KEYS = (
    "dataset_prepared_path", "dataset_num_proc", "skip_prepare_dataset", "sample_packing",
    "eval_sample_packing", "pad_to_sequence_len", "pad_to_multiple_of", "sample_packing_group_size",
    "sample_packing_bin_size", "sample_packing_sequentially", "remove_unused_columns", "group_by_length",
    "curriculum_sampling", "batch_flattening",
    # Streamed data is never prepared beforehand (data/streaming.py).
    "pretraining_dataset", "streaming", "pretrain_multipack_attn", "pretraining_sample_concatenation",
    "streaming_multipack_buffer_size",
)
ENTRY_LIST_KEYS = ("datasets", "test_datasets")

# tuneforge modules whose code decides the tokens of a prepared row (relative to the package root).
_CODE = ("data/pipeline.py", "data/chunked.py", "data/columns.py", "data/rows.py", "data/sources.py", "data/masking.py", "data/formats",
         "data/templates", "chat_templates", "models/tokenizer.py")
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)


# ---------------------------------------------------------------- the key
def cache_root(cfg: Config) -> Path:
    """dataset_prepared_path (relative paths as every other path of the config), default ./last_run_prepared."""
    value = cfg.dataset_prepared_path or DEFAULT_DIR
    return Path(cfg.resolve_path(value) or value).expanduser().absolute()


def cache_key(cfg: Config, tokenizer) -> tuple[str, dict[str, Any]]:
    """(hex key, the material it hashes). The material is stored next to the data as key.json."""
    material = {
        "cache_format": CACHE_FORMAT,
        "libraries": _library_versions(),
        "code": _code_hash(),
        "config": _config_material(cfg),
        "tokenizer": tokenizer_material(tokenizer),
        "datasets": [entry_material(e, cfg, f"datasets[{i}]") for i, e in enumerate(cfg.datasets or [])],
        "test_datasets": [
            entry_material(e, cfg, f"test_datasets[{i}]") for i, e in enumerate(cfg.test_datasets or [])
        ],
    }
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32], material


def _plain(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return value


def _config_material(cfg: Config) -> dict[str, Any]:
    out = {k: _plain(getattr(cfg, k)) for k in TOKEN_KEYS}
    trl = cfg.trl
    out["trl"] = {k: _plain(getattr(trl, k)) for k in TRL_TOKEN_KEYS} if trl else None
    jinja = _file_digest_if_path(cfg, cfg.chat_template_jinja)
    if jinja:
        out["chat_template_jinja_file"] = jinja
    return out


def entry_material(entry: DatasetEntry, cfg: Config, where: str) -> dict[str, Any]:
    """One dataset entry: its fields, its format's version, and its data (file contents or hub coordinates)."""
    from . import formats

    fmt, style = formats.resolve(entry.type, where, [str(cfg.source_dir)])
    fields = entry.model_dump(mode="json")
    resolved = cfg.resolve_path(entry.path)
    local = Path(resolved).expanduser()
    if local.exists():
        # The location does not change tokens, the contents do: a moved project keeps its cache.
        fields.pop("path")
        source = {"kind": "local", "files": _tree_digest(local, entry)}
    else:
        source = {"kind": "hub", "id": entry.path, "revision": entry.revision, "split": entry.split,
                  "name": entry.name, "data_files": entry.data_files}
    out = {"fields": fields, "format": {"name": fmt.name, "version": fmt.version, "style": style},
           "source": source}
    jinja = _file_digest_if_path(cfg, entry.chat_template_jinja)
    if jinja:
        out["chat_template_jinja_file"] = jinja
    return out


def _tree_digest(path: Path, entry: DatasetEntry) -> list[list[Any]]:
    if path.is_file():
        return [[path.name, file_digest(path)]]
    if entry.data_files:
        names = [entry.data_files] if isinstance(entry.data_files, str) else list(entry.data_files)
        files = [path / n for n in names]
    else:
        files = sorted(f for f in path.rglob("*") if f.is_file())
    return [[str(f.relative_to(path)), file_digest(f) if f.exists() else None] for f in files]


def file_digest(path: Path) -> str:
    """sha256 of a file's contents, read in blocks so large files never sit in memory."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _file_digest_if_path(cfg: Config, value: str | None) -> str | None:
    """Digest of a `.jinja` template file; inline templates are already part of the config fields."""
    if not value or "{" in value or "\n" in value:
        return None
    p = Path(cfg.resolve_path(value) or value).expanduser()
    return file_digest(p) if p.is_file() else None


def tokenizer_material(tokenizer) -> dict[str, Any]:
    """The tokenizer as it will be used, after special tokens, added tokens and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    serialized = backend.to_str() if backend is not None else repr(tokenizer.get_vocab())
    out: dict[str, Any] = {
        "class": type(tokenizer).__name__,
        "backend": hashlib.sha256(serialized.encode()).hexdigest(),
        "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "all_special_tokens": list(getattr(tokenizer, "all_special_tokens", [])),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "flags": {k: getattr(tokenizer, k, None) for k in ("add_bos_token", "add_eos_token", "clean_up_tokenization_spaces")},
    }
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    if folder.is_dir():
        out["files"] = {n: file_digest(folder / n) for n in _TOKENIZER_FILES if (folder / n).is_file()}
    return out


def _library_versions() -> dict[str, str]:
    import jinja2
    import tokenizers
    import transformers

    import tuneforge

    return {"tuneforge": tuneforge.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "jinja2": jinja2.__version__}


def _code_hash() -> str:
    """Hash of the source of the modules that produce tokens, so an edited format or template can never
    be served from a cache built by the old code (even if nobody bumped a version)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in _CODE:
        p = root / rel
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        for f in files:
            if f.is_file() and f.suffix in (".py", ".jinja", ".json"):
                h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------- reading and writing
@dataclass
class Entry:
    path: Path
    splits: dict[str, Any]  # split name -> datasets.Dataset (memory-mapped from path)
    stats: dict[str, Any]


@contextlib.contextmanager
def lock(root: Path, key: str) -> Iterator[None]:
    """An inter-process lock per key; released by the OS if the holder dies."""
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{key}.lock")):
        yield


def load(root: Path, key: str) -> Entry | None:
    """The complete, intact entry for `key`, or None (missing, incomplete or corrupted: rebuild)."""
    import datasets

    path = root / key
    if not path.exists():
        return None
    marker = path / MARKER
    if not marker.is_file():
        log.warning("prepared data at %s is incomplete (no completion marker); rebuilding it", path)
        return None
    try:
        info = json.loads(marker.read_text())
        if info.get("key") != key or info.get("cache_format") != CACHE_FORMAT:
            raise ValueError("the marker belongs to another key or cache format")
        digests = info["digests"]
        for rel, size in info["files"].items():
            actual = (path / rel).stat().st_size
            if actual != size:
                raise ValueError(f"{rel} has {actual} bytes, {size} were written")
            if content_digest(path / rel) != digests[rel]:
                raise ValueError(f"{rel} does not hold the bytes that were written (changed in place)")
        splits = {}
        for name, rows in info["rows"].items():
            ds = datasets.Dataset.from_file(str(path / name / ROWS_FILE))
            if len(ds) != rows:
                raise ValueError(f"split {name} has {len(ds)} rows, {rows} were written")
            splits[name] = ds
        stats = json.loads((path / "stats.json").read_text())
    except Exception as exc:  # any damage means the entry cannot be trusted
        log.warning("prepared data at %s is damaged (%s: %s); rebuilding it", path, type(exc).__name__, exc)
        return None
    return Entry(path, splits, stats)


def save(root: Path, key: str, material: dict, splits: dict[str, Any], stats: dict) -> Entry:
    """Write an entry atomically and return it, loaded back from disk (memory-mapped)."""
    from .chunked import write_rows

    root.mkdir(parents=True, exist_ok=True)
    sweep_partials(root)
    tmp = root / f"{PARTIAL_PREFIX}{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{socket.gethostname()}"
    try:
        tmp.mkdir()
        rows = {}
        for name, ds in splits.items():
            (tmp / name).mkdir()
            rows[name] = write_rows(ds, tmp / name / ROWS_FILE)  # no memory map kept: data/chunked.py
        (tmp / "key.json").write_text(json.dumps(material, indent=1, sort_keys=True, default=str))
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
        written = [f for f in sorted(tmp.rglob("*")) if f.is_file()]
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in written}
        digests = {str(f.relative_to(tmp)): content_digest(f) for f in written}
        _write_synced(tmp / MARKER, json.dumps(
            {"key": key, "cache_format": CACHE_FORMAT, "created": time.time(), "rows": rows, "files": files,
             "digests": digests}, indent=1,
        ))
        _publish(tmp, root / key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    entry = load(root, key)
    if entry is None:
        raise OSError(f"the prepared data just written to {root / key} cannot be read back")
    return entry


def content_digest(path: Path) -> str:
    """BLAKE2b of a file's bytes, streamed (the token arrays are checked on every load)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished entry into place; an older entry of the same key is replaced."""
    old = None
    if final.exists():
        old = final.with_name(f"{PARTIAL_PREFIX}old.{final.name}.{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def publish_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write one file of a cache entry atomically: `write(f)` fills a uniquely named partial file beside
    `path` (process id and a uuid, no RNG state is touched), which then replaces `path` in one rename."""
    tmp = path.with_name(f"{PARTIAL_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sweep_partials(root: Path) -> None:
    """Delete leftovers of killed writers: partial folders of dead local processes, or older than a day."""
    host = socket.gethostname()
    for p in root.glob(f"{PARTIAL_PREFIX}*"):
        if not p.is_dir():
            continue
        key, pid, _, owner = ([*p.name[len(PARTIAL_PREFIX):].split(".", 3), "", "", ""])[:4]
        dead_here = owner == host and pid.isdigit() and not _alive(int(pid))
        if key == "old" or dead_here or time.time() - p.stat().st_mtime > _STALE_PARTIAL_S:
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
