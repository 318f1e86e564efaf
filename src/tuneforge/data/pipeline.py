"""Turn the config's `datasets:` into tokenized, masked, length-checked training rows.

Each output row has `input_ids` and `labels` (aligned, unshifted; -100 = not trained), `length`, and
`_source`/`_row` (which dataset entry and source row it came from, for error messages and `--debug`).

`prepare()` is the entry point: it reuses the prepared-data cache (`cache.py`) when every input that
changes tokens is unchanged, and otherwise builds the rows and stores them atomically.
Length rules and statistics work on whole Arrow columns (numpy over the flat token buffers), never
row by row in Python, so they stay a small share of preprocessing time at 100k+ rows.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import numpy as np

from tuneforge.config.data import DatasetEntry
from tuneforge.config.schema import Config
from tuneforge.errors import DataError

from . import chunked, formats
from .columns import column_numpy, dedup, label_columns, trained_in, trained_per_row, truncate
from .formats import FormatContext
from .rows import RowError
from .sources import load_source
from .stats import PreparedData, Stats, sum_stats

__all__ = ["PreparedData", "Stats", "apply_length_rules", "build", "format_entry", "label_columns", "prepare",
           "prepare_split", "split_stats", "trained_per_row"]

log = logging.getLogger("tuneforge")


# ---------------------------------------------------------------- formatting
def _row_length(r: dict[str, Any]) -> int:
    if "input_ids" in r:
        return len(r["input_ids"])
    # Paired rows (e.g. chosen_input_ids / rejected_input_ids): the longest sequence counts.
    lengths = [len(v) for k, v in r.items() if k.endswith("input_ids")]
    if not lengths:
        raise RowError("the format produced a row without input_ids")
    return max(lengths)


def format_entry(entry: DatasetEntry, index: int, cfg: Config, tokenizer, where: str, work=None, seq_len=None):
    """Load one dataset entry, run its format over every row and apply the length rules.

    Returns (dataset, Stats, source rows, source rows that produced any row). With a `work` folder the rows
    are formatted in bounded chunks written there as they go (data/chunked.py); without one, by `map`.
    """
    fmt, style = formats.resolve(entry.type, where, [str(cfg.source_dir)])
    ds = load_source(entry, cfg, where, cache_dir=work)
    if len(ds) == 0:
        raise DataError(f"{where}: {entry.path} has no rows.")
    row_fn = fmt.builder(FormatContext(cfg=cfg, entry=entry, tokenizer=tokenizer, style=style))

    def call(row: dict[str, Any], idx: int) -> list[dict[str, Any]]:
        """The format's rows for one source row, with length and provenance; errors name the row."""
        try:
            produced = row_fn(row)
            for r in produced:
                r["length"] = _row_length(r)
        except RowError as exc:
            raise DataError(f"{where} ({entry.path}) row {idx}: {exc}") from None
        except DataError:
            raise
        except Exception as exc:  # a bug or an unexpected value shape in the row
            raise DataError(
                f"{where} ({entry.path}) row {idx}: format `{fmt.name}` failed with {type(exc).__name__}: {exc}"
            ) from exc
        for r in produced:
            r["_source"] = index
            r["_row"] = idx
        return produced

    features = _output_features(ds, call, where, entry.path)
    columns = list(features) if features is not None else None

    def run(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {c: [] for c in columns} if columns else {}
        keys = list(batch)
        for i, idx in enumerate(indices):
            for r in call({k: batch[k][i] for k in keys}, idx):
                if columns and r.keys() != out.keys():
                    raise DataError(
                        f"{where} ({entry.path}) row {idx}: the format produced the columns {sorted(r)}, "
                        f"but {sorted(columns)} for earlier rows; every row must have the same columns."
                    )
                for k, v in r.items():
                    out.setdefault(k, []).append(v)
        return out

    num_proc = cfg.dataset_num_proc or chunked.default_num_proc(len(ds))
    if work is not None and features is not None:
        out = work / f"formatted-{index}.arrow"
        finish = _chunk_rules(features, cfg, where, seq_len)
        stats, produced = chunked.write_formatted(ds, run, finish, out, num_proc)
        import datasets

        return datasets.Dataset.from_file(str(out)), stats, len(ds), produced
    # Several processes only pay off once the rows outnumber the cost of starting them.
    num_proc = num_proc if num_proc > 1 and len(ds) > 1000 else None
    formatted = ds.map(
        run,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        num_proc=num_proc,
        desc=f"formatting {where}",
        load_from_cache_file=False,
        # Our own cache decides reuse; a fixed fingerprint spares datasets from hashing the closure
        # (tokenizer included) with dill, and rows of token lists need no mixed-type JSON fallback.
        new_fingerprint=uuid.uuid4().hex,
        on_mixed_types=None,
        features=features,
        **({"cache_file_name": str(work / f"formatted-{index}.arrow")} if work is not None else {}),
    )
    produced = len(np.unique(column_numpy(formatted, "_row"))) if len(formatted) else 0
    formatted, stats = apply_length_rules(formatted, cfg, where, seq_len)
    return formatted, stats, len(ds), produced


def _chunk_rules(features, cfg: Config, where: str, seq_len: int | None):
    """The length rules of one formatted chunk: (Arrow table with `_trained`, Stats, rows that produced any)."""
    import datasets
    import pyarrow as pa

    def finish(out: dict[str, list]):
        part = datasets.Dataset.from_dict(out, features=features)
        produced = len(np.unique(column_numpy(part, "_row"))) if len(part) else 0
        part, stats = apply_length_rules(part, cfg, where, seq_len)
        table = part.with_format("arrow")[:] if len(part) else part.data.table.slice(0, 0)
        counts = [chunked.trained_counts(table.column(c)) for c in label_columns(part)]
        trained = np.sum(counts, axis=0) if counts else np.zeros(table.num_rows, dtype=np.int64)
        return table.append_column("_trained", pa.array(trained, type=pa.int64())), stats, produced

    return finish


def _output_features(ds, call, where: str, path: str):
    """The Arrow types of the format's output, from the first source row that produces any.

    Passing them to `map` fixes one schema for every batch: a batch in which the format skips every row
    still has the columns, and the writer does not infer types batch by batch.
    """
    import datasets

    for idx in range(len(ds)):
        produced = call(ds[idx], idx)
        if produced:
            features = datasets.Dataset.from_list(produced).features
            # A null-typed column (a None in this row) cannot be fixed yet: let map infer the types then.
            return None if "Value('null')" in repr(features) else features
    raise DataError(f"{where}: the format produced no rows from any of the {len(ds)} rows of {path}.")


# ---------------------------------------------------------------- length rules
def apply_length_rules(ds, cfg: Config, where: str, seq_len: int | None = None):
    """Drop, truncate or reject rows by length; drop rows with no trained token. Returns (ds, stats)."""
    limit = seq_len or cfg.sequence_len
    stats = Stats()
    lengths = column_numpy(ds, "length")
    too_long = lengths > limit
    n_long = int(too_long.sum())
    if n_long and cfg.excess_length_strategy == "raise":
        i = int(np.argmax(too_long))
        row = int(column_numpy(ds, "_row")[i])
        raise DataError(
            f"{where} row {row}: {int(lengths[i])} tokens exceeds sequence_len {limit} "
            f"({n_long} rows do). Raise sequence_len, or set excess_length_strategy: drop or truncate."
        )
    if n_long and cfg.excess_length_strategy == "truncate":
        ds = truncate(ds, limit)
        stats.truncated = n_long
        lengths = np.minimum(lengths, limit)
        too_long = lengths > limit
    per_column = [trained_in(ds, c) for c in label_columns(ds)]
    trained = np.sum(per_column, axis=0) if per_column else np.zeros(len(ds), dtype=np.int64)
    short = np.zeros(len(ds), dtype=bool)
    if cfg.min_sample_len:
        short = lengths < cfg.min_sample_len
    # A row (or either side of a pair) that trains no token teaches nothing.
    untrained = np.minimum.reduce(per_column) == 0 if per_column else np.zeros(len(ds), dtype=bool)
    # Each dropped row is counted once, under the first reason that applies.
    reasons = [
        (too_long, f"longer than sequence_len ({limit})"),
        (short & ~too_long, f"shorter than min_sample_len ({cfg.min_sample_len})"),
        (untrained & ~too_long & ~short, "no trained tokens"),
    ]
    for mask, why in reasons:
        if mask.any():
            stats.dropped[why] += int(mask.sum())
    drop = too_long | short | untrained
    if drop.any():
        ds = ds.select(np.flatnonzero(~drop))
    stats.rows_out = len(ds)
    stats.tokens = int(lengths[~drop].sum())
    stats.trained_tokens = int(trained[~drop].sum())
    return ds, stats


# ---------------------------------------------------------------- splits
def prepare_split(entries: list[DatasetEntry], cfg: Config, tokenizer, key: str, seq_len: int | None = None,
                  work=None):
    """Format, length-check, merge and deduplicate one split. Returns (dataset, total stats, per-entry stats)."""
    import datasets

    parts, per_entry = [], []
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]"
        folder = None
        if work is not None:  # each split's files apart: datasets names derived files after the first one's
            folder = work / key
            folder.mkdir(exist_ok=True)
        ds, stats, n_in, n_produced = format_entry(entry, i, cfg, tokenizer, where, folder, seq_len)
        stats.rows_in = n_in
        stats.name = f"{where} {_short_path(entry.path)}"
        if n_produced < n_in:
            stats.dropped["format produced no row"] += n_in - n_produced
        per_entry.append(stats)
        if len(ds):
            parts.append(ds.shuffle(seed=cfg.seed) if cfg.shuffle_before_merging_datasets else ds)
    total = sum_stats(per_entry)
    if not parts:
        raise DataError(f"{key}: no rows left after length rules ({dict(total.dropped)}).")
    merged = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if cfg.dataset_exact_deduplication:
        merged, removed_from = dedup(merged)
        for src, n in removed_from.items():
            per_entry[src].dropped["exact duplicate"] += n
            per_entry[src].rows_out -= n
        total = sum_stats(per_entry)
    return merged, total, per_entry


def _short_path(path: str, limit: int = 40) -> str:
    """The path as the config gives it, shortened to its last parts when long (for tables)."""
    if len(path) <= limit:
        return path
    parts = path.replace("\\", "/").split("/")
    return ".../" + "/".join(parts[-2:])


def split_stats(ds, names: list[str]) -> list[Stats]:
    """Rows, tokens and trained tokens of a final split, per dataset entry (from the `_source` column)."""
    n = len(names)
    if len(ds) == 0:
        return [Stats(name=x) for x in names]
    # `_trained` (data/chunked.py) spares reading the token lists of a shuffled split again; those small
    # columns are read without a memory map when the split is in files (no page of them stays resident).
    small = chunked.columns_in_order(ds, ["_source", "length", "_trained"]) if "_trained" in ds.column_names else None
    source = small["_source"] if small else column_numpy(ds, "_source")
    rows = np.bincount(source, minlength=n)
    tokens = np.bincount(source, weights=small["length"] if small else column_numpy(ds, "length"), minlength=n)
    per_row = small["_trained"] if small else (
        column_numpy(ds, "_trained") if "_trained" in ds.column_names else trained_per_row(ds))
    trained = np.bincount(source, weights=per_row, minlength=n)
    return [
        Stats(name=names[i], rows_out=int(rows[i]), tokens=int(tokens[i]), trained_tokens=int(trained[i]))
        for i in range(n)
    ]


def _counts_of_final_split(per_entry: list[Stats], ds) -> list[Stats]:
    """Overwrite the output numbers of each entry with those of the final split (after dedup/split)."""
    final = split_stats(ds, [s.name for s in per_entry])
    for s, f in zip(per_entry, final, strict=True):
        s.held_out = s.rows_out - f.rows_out  # rows the val split took; 0 otherwise
        s.rows_out, s.tokens, s.trained_tokens = f.rows_out, f.tokens, f.trained_tokens
    return per_entry


def build(cfg: Config, tokenizer, work=None) -> PreparedData:
    """Build the train (and eval) datasets described by the config, without any caching. With a `work`
    folder, in bounded chunks whose Arrow files go there (the caller deletes it once the data is saved)."""
    if not cfg.datasets:
        raise DataError("no `datasets:` in the config; add at least one entry with `path` and `type`.")
    train, _, train_parts = prepare_split(cfg.datasets, cfg, tokenizer, "datasets", work=work)
    if cfg.shuffle_merged_datasets:
        train = train.shuffle(seed=cfg.seed)
    eval_ds, eval_parts = None, None
    if cfg.test_datasets:
        eval_ds, _, eval_parts = prepare_split(
            cfg.test_datasets, cfg, tokenizer, "test_datasets", cfg.eval_sequence_len, work=work
        )
        eval_parts = _counts_of_final_split(eval_parts, eval_ds)
    elif cfg.val_set_size:
        n_eval = int(cfg.val_set_size) if cfg.val_set_size >= 1 else max(1, round(cfg.val_set_size * len(train)))
        if n_eval >= len(train):
            raise DataError(
                f"val_set_size {cfg.val_set_size} leaves no training rows ({len(train)} rows in all). "
                "Lower val_set_size or add data."
            )
        split = train.train_test_split(test_size=n_eval, seed=cfg.seed, shuffle=True)
        train, eval_ds = split["train"], split["test"]
        eval_parts = split_stats(eval_ds, [s.name for s in train_parts])
        for s in eval_parts:
            s.rows_in = s.rows_out
    train_parts = _counts_of_final_split(train_parts, train)
    by_dataset = {"train": train_parts}
    stats = {"train": sum_stats(train_parts)}
    if eval_ds is not None:
        by_dataset["eval"] = eval_parts
        stats["eval"] = sum_stats(eval_parts)
    return PreparedData(train=train, eval=eval_ds, stats=stats, by_dataset=by_dataset)


# ---------------------------------------------------------------- with the cache
def prepare(cfg: Config, tokenizer, *, rebuild: bool = False) -> PreparedData:
    """Prepared train/eval data: reused from the cache when nothing that changes tokens changed.

    `rebuild=True` (the `preprocess` command) always builds and replaces the cache entry.
    `skip_prepare_dataset: true` builds in memory and writes nothing.
    """
    from . import cache

    if cfg.pretraining_dataset or cfg.streaming:
        return _prepare_stream(cfg, tokenizer)
    if cfg.skip_prepare_dataset:
        return build(cfg, tokenizer, chunked.lasting_work_dir())
    key, material = cache.cache_key(cfg, tokenizer)
    root = cache.cache_root(cfg)
    # The lock lets one process (e.g. rank 0 of a multi-GPU launch) build while the others wait and reuse.
    with cache.lock(root, key):
        if not rebuild:
            hit = cache.load(root, key)
            if hit is not None:
                log.info("reusing prepared data from %s", hit.path)
                return _from_cache(hit, reused=True)
        with chunked.work_dir(root, key) as work:  # intermediate files, deleted once the entry is saved
            data = build(cfg, tokenizer, work)
            splits = {"train": data.train} if data.eval is None else {"train": data.train, "eval": data.eval}
            payload = {
                "splits": {k: v.as_dict() for k, v in data.stats.items()},
                "by_dataset": {k: [s.as_dict() for s in v] for k, v in data.by_dataset.items()},
            }
            saved = cache.save(root, key, material, splits, payload)
            del data, splits  # their memory maps point into `work`
        log.info("prepared data saved to %s", saved.path)
        return _from_cache(saved, reused=False)


def _prepare_stream(cfg: Config, tokenizer) -> PreparedData:
    """Streamed training data (read while training), and test_datasets prepared in memory if given."""
    from .streaming import StreamSpec

    stream = StreamSpec(cfg, tokenizer)  # checks the sources now, before the model loads
    log.info("train data: streamed from %s, tokenized and packed while training",
             ", ".join(s.entry.path for s in stream.sources))
    data = PreparedData(train=None, eval=None, stats={}, stream=stream)
    if cfg.test_datasets:
        data.eval, data.stats["eval"], parts = prepare_split(
            cfg.test_datasets, cfg, tokenizer, "test_datasets", cfg.eval_sequence_len, chunked.lasting_work_dir())
        data.by_dataset["eval"] = _counts_of_final_split(parts, data.eval)
    return data


def _from_cache(entry, reused: bool) -> PreparedData:
    """PreparedData backed by the memory-mapped Arrow files of a cache entry."""
    p = entry.stats
    return PreparedData(
        train=entry.splits["train"],
        eval=entry.splits.get("eval"),
        stats={k: Stats.from_dict(v) for k, v in p["splits"].items()},
        cache_dir=entry.path,
        reused_cache=reused,
        by_dataset={k: [Stats.from_dict(s) for s in v] for k, v in p["by_dataset"].items()},
    )
