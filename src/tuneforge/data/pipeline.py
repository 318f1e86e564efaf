"""Turn the config's `datasets:` into tokenized, masked, length-checked training rows.

Each output row has `input_ids` and `labels` (aligned, unshifted; -100 = not trained), `length`, and
`_source`/`_row` (which dataset entry and source row it came from, for error messages and `--debug`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tuneforge.config.data import DatasetEntry
from tuneforge.config.schema import Config
from tuneforge.errors import DataError

from . import formats
from .formats import IGNORE_INDEX, FormatContext, RowError
from .sources import load_source


@dataclass
class Stats:
    rows_in: int = 0
    rows_out: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> rows
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0

    def add(self, other: Stats) -> None:
        self.rows_in += other.rows_in
        self.rows_out += other.rows_out
        self.dropped.update(other.dropped)
        self.truncated += other.truncated
        self.tokens += other.tokens
        self.trained_tokens += other.trained_tokens

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "dropped": dict(self.dropped),
            "truncated": self.truncated,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
        }


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset
    eval: Any | None
    stats: dict[str, Stats]  # "train", "eval"
    cache_dir: Any = None
    reused_cache: bool = False


def format_entry(entry: DatasetEntry, index: int, cfg: Config, tokenizer, where: str):
    """Load one dataset entry and run its format over every row."""
    fmt, style = formats.resolve(entry.type, where)
    ds = load_source(entry, cfg, where)
    if len(ds) == 0:
        raise DataError(f"{where}: {entry.path} has no rows.")
    row_fn = fmt.builder(FormatContext(cfg=cfg, entry=entry, tokenizer=tokenizer, style=style))

    def run(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {}
        keys = list(batch)
        for i, idx in enumerate(indices):
            row = {k: batch[k][i] for k in keys}
            try:
                produced = row_fn(row)
            except RowError as exc:
                raise DataError(f"{where} ({entry.path}) row {idx}: {exc}") from None
            except DataError:
                raise
            except Exception as exc:  # a bug or an unexpected value shape in the row
                raise DataError(
                    f"{where} ({entry.path}) row {idx}: format `{fmt.name}` failed with "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            for r in produced:
                r["length"] = len(r["input_ids"])
                r["_source"] = index
                r["_row"] = idx
                for k, v in r.items():
                    out.setdefault(k, []).append(v)
        return out

    return ds.map(
        run,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        num_proc=cfg.dataset_num_proc if cfg.dataset_num_proc and len(ds) > 1000 else None,
        desc=f"formatting {where}",
        load_from_cache_file=False,
    ), len(ds)


def apply_length_rules(ds, cfg: Config, where: str, seq_len: int | None = None):
    """Drop, truncate or reject rows by length; drop rows with no trained token. Returns (ds, stats)."""
    limit = seq_len or cfg.sequence_len
    stats = Stats()
    lengths = ds["length"]
    too_long = [i for i, n in enumerate(lengths) if n > limit]
    if too_long and cfg.excess_length_strategy == "raise":
        first = ds[too_long[0]]
        raise DataError(
            f"{where} row {first['_row']}: {first['length']} tokens exceeds sequence_len {limit} "
            f"({len(too_long)} rows do). Raise sequence_len, or set excess_length_strategy: drop or truncate."
        )
    if too_long and cfg.excess_length_strategy == "truncate":
        stats.truncated = len(too_long)

        def cut(row):
            if row["length"] > limit:
                row["input_ids"] = row["input_ids"][:limit]
                if "labels" in row:
                    row["labels"] = row["labels"][:limit]
                row["length"] = limit
            return row

        ds = ds.map(cut, desc="truncating", load_from_cache_file=False)
    has_labels = "labels" in ds.column_names

    def reason(row) -> str | None:
        if row["length"] > limit:
            return f"longer than sequence_len ({limit})"
        if cfg.min_sample_len and row["length"] < cfg.min_sample_len:
            return f"shorter than min_sample_len ({cfg.min_sample_len})"
        if has_labels and all(t == IGNORE_INDEX for t in row["labels"][1:]):
            return "no trained tokens"
        return None

    keep = []
    for i in range(len(ds)):
        row = ds[i]
        why = reason(row)
        if why:
            stats.dropped[why] += 1
        else:
            keep.append(i)
    if len(keep) != len(ds):
        ds = ds.select(keep)
    stats.rows_out = len(ds)
    stats.tokens = int(sum(ds["length"])) if len(ds) else 0
    if has_labels and len(ds):
        stats.trained_tokens = sum(sum(1 for t in lab[1:] if t != IGNORE_INDEX) for lab in ds["labels"])
    return ds, stats


def prepare_split(entries: list[DatasetEntry], cfg: Config, tokenizer, key: str, seq_len: int | None = None):
    import datasets

    parts, total = [], Stats()
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]"
        ds, n_in = format_entry(entry, i, cfg, tokenizer, where)
        ds, stats = apply_length_rules(ds, cfg, where, seq_len)
        stats.rows_in = n_in
        total.add(stats)
        parts.append(ds)
    merged = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if cfg.dataset_exact_deduplication:
        merged, removed = _dedup(merged)
        total.dropped["exact duplicate"] += removed
        total.rows_out -= removed
    if len(merged) == 0:
        raise DataError(f"{key}: no rows left after length rules ({dict(total.dropped)}).")
    return merged, total


def _dedup(ds):
    seen, keep = set(), []
    for i, (ids, labels) in enumerate(zip(ds["input_ids"], ds["labels"], strict=True)):
        key = (tuple(ids), tuple(labels))
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return ds.select(keep), len(ds) - len(keep)


def prepare(cfg: Config, tokenizer) -> PreparedData:
    """Build the train (and eval) datasets described by the config."""
    if not cfg.datasets:
        raise DataError("no `datasets:` in the config; add at least one entry with `path` and `type`.")
    train, train_stats = prepare_split(cfg.datasets, cfg, tokenizer, "datasets")
    if cfg.shuffle_merged_datasets:
        train = train.shuffle(seed=cfg.seed)
    eval_ds, eval_stats = None, None
    if cfg.test_datasets:
        eval_ds, eval_stats = prepare_split(
            cfg.test_datasets, cfg, tokenizer, "test_datasets", cfg.eval_sequence_len
        )
    elif cfg.val_set_size:
        n_eval = int(cfg.val_set_size) if cfg.val_set_size >= 1 else max(1, round(cfg.val_set_size * len(train)))
        if n_eval >= len(train):
            raise DataError(f"val_set_size {cfg.val_set_size} leaves no training rows ({len(train)} rows in all).")
        split = train.train_test_split(test_size=n_eval, seed=cfg.seed, shuffle=True)
        train, eval_ds = split["train"], split["test"]
        eval_stats = Stats(rows_in=n_eval, rows_out=n_eval, tokens=int(sum(eval_ds["length"])))
    stats = {"train": train_stats}
    if eval_stats is not None:
        stats["eval"] = eval_stats
    return PreparedData(train=train, eval=eval_ds, stats=stats)
