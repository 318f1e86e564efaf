"""Format a dataset entry in bounded chunks written to Arrow as they go, so memory does not grow with the data.

`write_formatted` reads the source `CHUNK_ROWS` rows at a time (from its Arrow file with plain reads, not a
memory map whose touched pages would stay resident), runs the format and the length rules on the chunk, and
appends the result to an Arrow file in tuneforge's own work folder (`work_dir`), which is deleted once the
prepared data is written to its cache entry: nothing is left in the datasets library's cache. With
`dataset_num_proc` > 1 the chunks go to worker processes, at most two per worker in flight, and come back in
order, so the output is the same for any number of processes.

Each output row also gets `_trained`, its count of trained tokens, so the statistics of the final (shuffled,
split) data are read from small integer columns instead of the token lists.

`write_rows` writes a final split (shuffled, selected or plain) into the cache entry without a memory map either:
gathering shuffled rows through one keeps every page it touched resident (and the kernel maps whole
neighbourhoods of each page touched), so VmRSS grew with the data. It permutes externally instead: rows are
routed to bucket files by their destination, then each bucket is ordered in memory (~BUCKET_BYTES).
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
BUCKET_BYTES = 16 << 20  # a final split is put in order this much at a time (write_rows)
_MAX_BUCKETS = 256  # files open at once while write_rows routes rows (larger splits get larger buckets)
_IN_FLIGHT_PER_WORKER = 2

# Folders still being written: `.partial.<key>.<pid>.<random>.<host>`; cache.sweep_partials removes those of
# dead runs. Defined here, below the cache, which imports this module.
PARTIAL_PREFIX = ".partial."


@contextlib.contextmanager
def work_dir(root: Path, key: str) -> Iterator[Path]:
    """A fresh folder for intermediate Arrow files under the cache root, removed at the end (named like the
    cache's partial folders, so a killed run's folder is swept by the next one: cache.sweep_partials)."""
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
    """Write the rows of `ds`, in its order (a shuffle or selection too), to the Arrow file `path` (read back by
    `Dataset.from_file`), reading its files with plain reads, never through a memory map. Returns the rows."""
    import pyarrow as pa

    schema = ds.features.arrow_schema  # with the features as metadata, so from_file restores them
    order = _row_order(ds)
    files = _data_files(ds)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        if files is None or not _permute(files, order, schema, writer, path.parent / f"{path.name}.buckets"):
            for start in range(0, len(order), CHUNK_ROWS):  # partly in memory (small), or rows repeated
                writer.write(_conform(ds.data.table.take(order[start : start + CHUNK_ROWS]), schema))
    return len(order)


def columns_in_order(ds, names: list[str]) -> dict[str, np.ndarray] | None:
    """Small columns of `ds` in its order, read with plain reads; None when part of its table is in memory."""
    files = _data_files(ds)
    if files is None:
        return None
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for batch in _plain_batches(files):
        for name in names:  # copied: a view would keep the whole batch (token lists too) in memory
            parts[name].append(batch.column(name).to_numpy(zero_copy_only=False).copy())
    order = _row_order(ds)
    return {name: np.concatenate(arrays)[order] if arrays else np.zeros(0, np.int64) for name, arrays in parts.items()}


def _row_order(ds) -> np.ndarray:
    """The rows of the underlying table that `ds` shows, in order (a shuffle or select is an indices table)."""
    indices = getattr(ds, "_indices", None)
    if indices is None:
        return np.arange(len(ds), dtype=np.int64)
    return indices.column(0).to_numpy().astype(np.int64, copy=False)


def _data_files(ds) -> list[str] | None:
    """The Arrow files whose rows, in order, are the table under `ds`; None when part of it is in memory."""
    indices_file = getattr(getattr(ds, "_indices", None), "path", None)  # a shuffle's order, in a file of its own
    files = [f["filename"] for f in ds.cache_files if f["filename"] != indices_file]
    return files if files and sum(_rows_of(files)) == ds.data.num_rows else None


def _conform(part, schema):
    part = part.select(schema.names)
    return part.cast(schema) if part.schema != schema else part


def _permute(files: list[str], order: np.ndarray, schema, writer, folder: Path) -> bool:
    """An external permutation: each row goes to the bucket file of its destination (sequential reads and
    writes), then each bucket (~BUCKET_BYTES) is read back, put in order in memory and appended to `writer`.
    False (nothing written) when `order` repeats a row."""
    import pyarrow as pa

    total = sum(os.path.getsize(f) for f in files)
    dest = np.full(sum(_rows_of(files)), -1, dtype=np.int64)  # the output position of every source row
    dest[order] = np.arange(len(order))
    if np.count_nonzero(dest >= 0) != len(order):
        return False
    per_bucket = max(1, int(len(dest) * BUCKET_BYTES / max(total, 1)), -(-len(order) // _MAX_BUCKETS))
    names = [folder / f"{b}.arrow" for b in range(-(-len(order) // per_bucket))]
    folder.mkdir()
    try:
        with contextlib.ExitStack() as stack:
            bucket_schema = schema.append(pa.field("_dest", pa.int64()))
            writers = [stack.enter_context(pa.ipc.new_stream(stack.enter_context(pa.OSFile(str(n), "wb")),
                                                              bucket_schema)) for n in names]
            start = 0
            for batch in _plain_batches(files):
                pos = dest[start : start + batch.num_rows]
                start += batch.num_rows
                part = _conform(batch, schema).append_column("_dest", pa.array(pos))
                bucket = np.where(pos >= 0, pos // per_bucket, -1)
                for b in np.unique(bucket[bucket >= 0]).tolist():
                    writers[b].write(part.filter(pa.array(bucket == b)))
        for name in names:
            with pa.OSFile(str(name)) as f:
                table = pa.ipc.open_stream(f).read_all()
            table = table.take(np.argsort(table.column("_dest").to_numpy())).drop_columns(["_dest"])
            writer.write_table(table, max_chunksize=CHUNK_ROWS)
            del table
            name.unlink()
            pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed memory otherwise
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return True


def _rows_of(files: list[str]) -> list[int]:
    import pyarrow as pa

    out = []
    for name in files:  # the batch headers only, through a map closed right away
        with pa.memory_map(name) as f:
            out.append(sum(b.num_rows for b in pa.ipc.open_stream(f)))
    return out


def _plain_batches(files: list[str]):
    import pyarrow as pa

    for name in files:
        with pa.OSFile(name) as f:
            yield from pa.ipc.open_stream(f)


def trained_counts(labels) -> np.ndarray:
    """Per row of a list<int> Arrow column: tokens that are a target (labels[1:] != -100)."""
    from .columns import trained_in_chunk

    return trained_in_chunk(labels.combine_chunks() if hasattr(labels, "combine_chunks") else labels)
