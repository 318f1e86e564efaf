"""Format a dataset entry in bounded chunks written to Arrow as they go, so memory does not grow with the data.

`write_formatted` reads the source `CHUNK_ROWS` rows at a time (from its Arrow file with plain reads, not a
memory map whose touched pages would stay resident), runs the format and the length rules on the chunk, and
appends the result to an Arrow file in tuneforge's own work folder (`work_dir`), which is deleted once the
prepared data is written to its cache entry: nothing is left in the datasets library's cache. With
`dataset_num_proc` > 1 the chunks go to worker processes, at most two per worker in flight, and come back in
order, so the output is the same for any number of processes.

Each output row also gets `_trained`, its count of trained tokens, so the statistics of the final (shuffled,
split) data are read from small integer columns instead of the token lists.

`write_rows` writes a final split (shuffled, selected or plain) into the cache entry the same way: its rows are
gathered `CHUNK_ROWS` at a time through memory maps that are closed after each chunk, so the pages read do not
stay resident in the process (a memory map held for the whole write keeps every page it read).
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import shutil
import socket
import tempfile
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

CHUNK_ROWS = 2_000  # source rows formatted together: bounds memory, keeps Arrow writes large
_IN_FLIGHT_PER_WORKER = 2


@contextlib.contextmanager
def work_dir(root: Path, key: str) -> Iterator[Path]:
    """A fresh folder for intermediate Arrow files under the cache root, removed at the end (named like the
    cache's partial folders, so a killed run's folder is swept by the next one: cache.sweep_partials)."""
    from .cache import PARTIAL_PREFIX

    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{PARTIAL_PREFIX}build-{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{socket.gethostname()}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def lasting_work_dir() -> Path:
    """skip_prepare_dataset: the prepared rows live in a temporary folder until the process exits."""
    path = Path(tempfile.mkdtemp(prefix="tuneforge-prepared-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def default_num_proc(rows: int, cores: int | None = None) -> int:
    """Worker processes for formatting when dataset_num_proc is unset: the usable cores, or fewer when
    OMP_NUM_THREADS says so (the cli lowers it on a machine that other work keeps busy, so preprocessing does
    not oversubscribe it either); 1 below 2 * CHUNK_ROWS rows, where starting processes costs more than it saves."""
    if rows < 2 * CHUNK_ROWS:
        return 1
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(cores, int(threads))) if threads.isdigit() else cores


def source_batches(ds, rows: int = CHUNK_ROWS) -> Iterator[tuple[int, dict[str, list]]]:
    """(index of the first row, the rows as columns) of `ds`, `rows` at a time, decoded as `ds[a:b]` is."""
    import pyarrow as pa

    files = [f["filename"] for f in ds.cache_files]
    plain = files and getattr(ds, "_indices", "?") is None and len(ds) == ds.data.num_rows
    if not plain:  # a selection, shard or in-memory table: datasets' own slicing
        for start in range(0, len(ds), rows):
            yield start, ds[start : start + rows]
        return
    features, start = ds.features, 0
    for name in files:  # the table is these files' rows, in order (several when the source was large)
        with pa.OSFile(name) as f:
            for batch in pa.ipc.open_stream(f):
                for at in range(0, batch.num_rows, rows):
                    part = batch.slice(at, rows)
                    yield start, features.decode_batch(part.to_pydict())
                    start += part.num_rows
    if start != len(ds):
        raise RuntimeError(f"read {start} rows from {files}, but the dataset has {len(ds)}")


_JOB: tuple | None = None  # the formatting function of the pool's workers (inherited through fork)


def _format_chunk(job: tuple, start: int, columns: dict[str, list]) -> tuple[Any, Any, int]:
    """(formatted Arrow table after the length rules, their Stats, source rows that produced any row)."""
    run, finish = job
    n = len(next(iter(columns.values()))) if columns else 0
    out = run(columns, list(range(start, start + n)))
    return finish(out)


def _pool_chunk(start: int, columns: dict[str, list]):
    table, stats, produced = _format_chunk(_JOB, start, columns)
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue(), stats, produced


def _from_ipc(buf):
    import pyarrow as pa

    return pa.ipc.open_stream(buf).read_all()


def write_formatted(ds, run: Callable, finish: Callable, path: Path, num_proc: int) -> tuple[Any, int]:
    """Format `ds` chunk by chunk into the Arrow file `path`. `run(columns, indices)` formats a chunk,
    `finish(columns)` applies the length rules -> (table, Stats, rows that produced any). Returns the summed
    Stats and the number of source rows that produced at least one row."""
    from datasets.arrow_writer import ArrowWriter

    from .stats import Stats

    total, produced = Stats(), 0
    writer = None
    try:
        for table, stats, n in _chunks(ds, (run, finish), num_proc):
            if writer is None:
                writer = ArrowWriter(path=str(path), schema=table.schema)
            if table.num_rows:
                writer.write_table(table.cast(writer.schema) if table.schema != writer.schema else table)
            total.add(stats)
            produced += n
        if writer is not None:
            writer.finalize()
    finally:
        if writer is not None:
            writer.close()
    return total, produced


def _chunks(ds, job: tuple, num_proc: int):
    batches = source_batches(ds)
    if num_proc <= 1:
        for start, columns in batches:
            yield _format_chunk(job, start, columns)
        return
    global _JOB
    _JOB = job
    try:
        with multiprocessing.get_context("fork").Pool(num_proc) as pool:
            pending: deque = deque()
            for start, columns in batches:
                pending.append(pool.apply_async(_pool_chunk, (start, columns)))
                if len(pending) >= num_proc * _IN_FLIGHT_PER_WORKER:
                    buf, stats, n = pending.popleft().get()
                    yield _from_ipc(buf), stats, n
            while pending:
                buf, stats, n = pending.popleft().get()
                yield _from_ipc(buf), stats, n
    finally:
        _JOB = None


def write_rows(ds, path: Path) -> int:
    """Write the rows of `ds`, in its order, to the Arrow file `path` (read back by `Dataset.from_file`).
    Returns the number of rows written."""
    import pyarrow as pa

    schema = ds.features.arrow_schema  # with the features as metadata, so from_file restores them
    order = _row_order(ds)
    indices_file = getattr(getattr(ds, "_indices", None), "path", None)  # a shuffle's order, in a file of its own
    files = [f["filename"] for f in ds.cache_files if f["filename"] != indices_file]
    # The table is these files' rows, in order, unless part of it is in memory (then it is small).
    mapped = bool(files) and _rows_in(files) == ds.data.num_rows
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for start in range(0, len(order), CHUNK_ROWS):
            ids = order[start : start + CHUNK_ROWS]
            part = (_gather(files, ids) if mapped else ds.data.table.take(ids)).select(schema.names)
            writer.write(part.cast(schema) if part.schema != schema else part)
    return len(order)


def _row_order(ds) -> np.ndarray:
    """The rows of the underlying table that `ds` shows, in order (a shuffle or select is an indices table)."""
    indices = getattr(ds, "_indices", None)
    if indices is None:
        return np.arange(len(ds), dtype=np.int64)
    return indices.column(0).to_numpy().astype(np.int64, copy=False)


def _rows_in(files: list[str]) -> int:
    import pyarrow as pa

    total = 0
    for name in files:
        with pa.memory_map(name) as f:
            total += sum(b.num_rows for b in pa.ipc.open_stream(f))
    return total


def _gather(files: list[str], ids: np.ndarray):
    """Rows `ids` of the files' rows (concatenated in order), copied out of maps that are closed on return."""
    import pyarrow as pa

    maps = [pa.memory_map(name) for name in files]
    try:
        batches = [b for m in maps for b in pa.ipc.open_stream(m)]
        starts = np.cumsum([0] + [b.num_rows for b in batches])
        which = np.searchsorted(starts, ids, side="right") - 1
        rows = [batches[w].slice(i - starts[w], 1) for i, w in zip(ids.tolist(), which.tolist(), strict=True)]
        # Concatenating copies the rows out of the maps, which can then be closed (their pages released).
        return pa.concat_batches(rows) if rows else batches[0].slice(0, 0)
    finally:
        for m in maps:
            m.close()


def trained_counts(labels) -> np.ndarray:
    """Per row of a list<int> Arrow column: tokens that are a target (labels[1:] != -100)."""
    from .columns import trained_in_chunk

    return trained_in_chunk(labels.combine_chunks() if hasattr(labels, "combine_chunks") else labels)
