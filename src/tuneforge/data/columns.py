"""Whole-column work on tokenized Arrow datasets: numpy over the flat token buffers, never row by row in
Python, so length rules, statistics and deduplication stay a small share of preprocessing at 100k+ rows."""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter
from typing import Any

import numpy as np

from .rows import IGNORE_INDEX

# Per-token list columns are cut together when a row is truncated (they stay aligned with input_ids).
TOKEN_COLUMN_SUFFIXES = ("input_ids", "labels", "mask")
_SLICE_ROWS = 16_384  # rows per slice when reading a column: bounds memory, keeps numpy work large


def slices(ds, name: str):
    """A column as contiguous pyarrow arrays of up to _SLICE_ROWS rows, honouring select/shuffle mappings.

    A selected or shuffled dataset keeps an index mapping over its Arrow table; the rows are taken with
    Arrow's vectorised `take` (datasets' own row access gathers them one Python slice at a time).
    """
    if not hasattr(ds, "_indices"):  # a datasets version without it: the public (slower) row access
        view = ds.with_format("arrow")
        for start in range(0, len(ds), _SLICE_ROWS):
            yield view[start : start + _SLICE_ROWS][name].combine_chunks()
        return
    column = ds.data.table.column(name)
    indices = ds._indices.column(0) if ds._indices is not None else None
    for start in range(0, len(ds), _SLICE_ROWS):
        if indices is None:
            part = column.slice(start, _SLICE_ROWS)
        else:
            part = column.take(indices.slice(start, _SLICE_ROWS))
        yield part.combine_chunks()


def column_numpy(ds, name: str) -> np.ndarray:
    parts = [a.to_numpy(zero_copy_only=False) for a in slices(ds, name)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def flat(chunk) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of a list array, offsets relative to the returned values."""
    offsets = chunk.offsets.to_numpy()
    values = chunk.values.to_numpy(zero_copy_only=False)
    return offsets - offsets[0], values[offsets[0] : offsets[-1]]


def label_columns(ds) -> list[str]:
    """The label columns: `labels`, or one per sequence of paired rows (`chosen_labels`, `rejected_labels`)."""
    return sorted(c for c in ds.column_names if c == "labels" or c.endswith("_labels"))


def trained_in_chunk(chunk) -> np.ndarray:
    """Per row of one list<int> Arrow chunk of labels: tokens that are a target (labels[1:] != -100)."""
    if len(chunk) == 0:
        return np.zeros(0, dtype=np.int64)
    offsets, values = flat(chunk)
    mask = values != IGNORE_INDEX
    cum = np.concatenate(([0], np.cumsum(mask, dtype=np.int64)))
    count = cum[offsets[1:]] - cum[offsets[:-1]]
    nonempty = offsets[1:] > offsets[:-1]
    first = np.zeros(len(count), dtype=np.int64)
    first[nonempty] = mask[offsets[:-1][nonempty]]
    return count - first


def trained_in(ds, name: str) -> np.ndarray:
    parts = [trained_in_chunk(chunk) for chunk in slices(ds, name) if len(chunk)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def trained_per_row(ds) -> np.ndarray:
    """Per row, how many tokens are training targets: labels[1:] != -100 (position 0 is never a target),
    summed over the label columns."""
    counts = [trained_in(ds, c) for c in label_columns(ds)]
    return np.sum(counts, axis=0) if counts else np.zeros(len(ds), dtype=np.int64)


def truncate(ds, limit: int):
    """Cut every per-token column to `limit` tokens (Arrow list slicing, batch by batch)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    token_cols = [c for c in ds.column_names if c.endswith(TOKEN_COLUMN_SUFFIXES)]

    def cut(table: pa.Table) -> pa.Table:
        if table.num_rows == 0 or pc.max(table.column("length")).as_py() <= limit:
            return table
        for name in token_cols:
            col = table.column(name)
            table = table.set_column(table.schema.get_field_index(name), name, pc.list_slice(col, 0, limit))
        length = table.column("length")
        capped = pc.min_element_wise(length, pa.scalar(limit, type=length.type))
        return table.set_column(table.schema.get_field_index("length"), "length", capped)

    cut_ds = ds.with_format("arrow").map(cut, batched=True, desc="truncating", load_from_cache_file=False,
                                         new_fingerprint=uuid.uuid4().hex)
    return cut_ds.with_format(None)


def _row_digests(ds, name: str) -> list[bytes]:
    out: list[bytes] = []
    for chunk in slices(ds, name):
        offsets, values = flat(chunk)
        size = values.itemsize
        buf = memoryview(values.tobytes())
        for a, b in zip(offsets[:-1], offsets[1:], strict=True):
            out.append(hashlib.blake2b(buf[a * size : b * size], digest_size=16).digest())
    return out


def dedup(ds) -> tuple[Any, Counter]:
    """Keep the first of rows whose token columns (input_ids, labels, chosen_input_ids, ...) are all
    identical; count removals per source."""
    columns = sorted(c for c in ds.column_names if c.endswith(TOKEN_COLUMN_SUFFIXES))
    digests = [_row_digests(ds, c) for c in columns]
    seen: set[bytes] = set()
    keep = []
    for i, parts in enumerate(zip(*digests, strict=True)):
        key = b"".join(parts)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    if len(keep) == len(ds):
        return ds, Counter()
    removed = np.ones(len(ds), dtype=bool)
    removed[keep] = False
    sources, counts = np.unique(column_numpy(ds, "_source")[removed], return_counts=True)
    return ds.select(keep), Counter({int(s): int(n) for s, n in zip(sources, counts, strict=True)})
