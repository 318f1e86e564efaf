"""Streamed training data (`pretraining_dataset:`, `streaming: true`): rows read, tokenized and packed while
training, so memory holds one partial row and a few rows read ahead, whatever the corpus size.

Documents:
  - pretraining_dataset: the text of `text_column`, as BOS (when the tokenizer adds one) + tokens + EOS, every
    token trained (as `type: completion`); empty texts are skipped.
  - streaming `datasets:`: each row through its `type:` format, then the length rules of prepared data
    (excess_length_strategy, min_sample_len, no trained token -> dropped).
Rows of sequence_len tokens are filled in stream order (next-fit): a document that does not fit starts the next
row; with pretraining_sample_concatenation it is cut instead, its rest opening the next row, so every row is
full. Documents of one row do not attend to each other (positions restart; data/collate.py) unless
pretrain_multipack_attn is false, which makes the row one sequence. Streaming `datasets:` pack only with
sample_packing (otherwise one document per row). The entries follow each other; after the last the stream
starts again (a new pass), so `max_steps` decides the length of the run.

With shuffle_merged_datasets (default on) the source rows are taken in a seeded random order within windows of
streaming_multipack_buffer_size rows (data/stream_sources.window_rows).

The position (entry, pass, the cursor of the current window's start and the rows of it taken, the documents or
document pieces waiting for the next row) is `state_dict()`: a checkpoint stores it and a resumed run continues
with exactly the rows the uninterrupted run would have trained on. Each process reads its own shard
(data/stream_sources.py). On another number of processes, `restart` continues from the earliest source row
some process had not finished (`restart` in the state): nothing is skipped, and rows after it that other
processes had trained are trained again.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from typing import Any

from tuneforge.config.schema import Config
from tuneforge.errors import DataError

from .formats.alpaca import bos_ids, eos_ids
from .rows import IGNORE_INDEX, RowError
from .stream_sources import EntryFiles, window_rows

log = logging.getLogger("tuneforge")

READ_AHEAD = 64  # source rows tokenized together (one tokenizer call); re-read after a resume, never re-trained


class StreamSpec:
    """Streamed training data as `prepare` returns it: the sources checked, nothing read yet."""

    def __init__(self, cfg: Config, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.pretrain = bool(cfg.pretraining_dataset)
        entries = cfg.pretraining_dataset if self.pretrain else cfg.datasets
        key = "pretraining_dataset" if self.pretrain else "datasets"
        self.sources = [EntryFiles(e, cfg, f"{key}[{i}]") for i, e in enumerate(entries)]
        self.prefix = bos_ids(tokenizer) if self.pretrain else []
        self.suffix = eos_ids(tokenizer, key) if self.pretrain else []

    def open(self, rank: int = 0, world: int = 1) -> Stream:
        """Process `rank` of `world`'s stream, from the start (`load_state_dict` moves it)."""
        return Stream(self, rank, world)


class Stream:
    def __init__(self, spec: StreamSpec, rank: int, world: int):
        cfg = spec.cfg
        self.spec, self.rank, self.world = spec, rank, world
        self.capacity = cfg.sequence_len
        self.packing = spec.pretrain or cfg.sample_packing
        self.concatenate = spec.pretrain and bool(cfg.pretraining_sample_concatenation)
        self.max_docs = cfg.sample_packing_bin_size if self.packing else 1
        self.separate = cfg.pretrain_multipack_attn  # documents of a row attend only to themselves
        self.shuffle = cfg.shuffle_merged_datasets
        self.window = cfg.streaming_multipack_buffer_size if self.shuffle else 1
        self.entry, self.cursor, self.taken, self.passes = 0, None, 0, 0
        self.pending: deque[dict[str, list[int]]] = deque()  # documents (pieces) read, not yet in a row
        self._origins: deque[list] = deque()  # [pass, entry, cursor before its row] of each pending document
        self.rows_out = 0
        self._docs_this_pass = 0
        self._reader: Iterator | None = None
        self._fns: dict[int, Any] | None = None  # each entry's format function, built on first use

    # ------------------------------------------------------------------ position
    def state_dict(self) -> dict[str, Any]:
        return {"entry": self.entry, "cursor": self.cursor, "taken": self.taken, "passes": self.passes,
                "rows_out": self.rows_out, "docs_this_pass": self._docs_this_pass,
                "pending": [dict(d) for d in self.pending], "origins": [list(o) for o in self._origins],
                "restart": self._restart_point(), "window": self.window, "rank": self.rank, "world": self.world}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state.get("rank"), state.get("world")) != (self.rank, self.world):
            raise DataError(f"the checkpoint's stream position is process {state.get('rank')} of {state.get('world')}'s, "
                            f"but this is process {self.rank} of {self.world}: give `restart` every process's position.")
        if state.get("window", 1) != self.window:  # checkpoints of earlier versions read in order
            raise DataError(f"the checkpoint's stream was {_order(state.get('window', 1))}, this run's is "
                            f"{_order(self.window)}: resume with the checkpoint's shuffle_merged_datasets and "
                            "streaming_multipack_buffer_size.")
        self.entry, self.cursor, self.passes = state["entry"], state["cursor"], state["passes"]
        self.taken = state.get("taken", 0)
        self.rows_out, self._docs_this_pass = state["rows_out"], state["docs_this_pass"]
        self.pending = deque(state["pending"])
        self._origins = deque(state.get("origins", [[self.passes, self.entry, self.cursor]] * len(self.pending)))
        self._reader = None  # reopened at the cursor

    def restart(self, states: list[dict[str, Any]]) -> tuple[int, int, int]:
        """Continue, on this number of processes, the run whose processes saved `states` (another number): from
        the earliest source row any of them had not finished, in this process's new shard. Returns that
        position (pass, entry, source row)."""
        passes, entry, cursor = min((s["restart"] for s in states), key=_order_key)
        self.passes, self.entry, self.cursor, self.taken = passes, entry, cursor, 0
        self.pending, self._origins = deque(), deque()
        self.rows_out = sum(s["rows_out"] for s in states) // self.world
        self._docs_this_pass = int(cursor is not None)  # rows of this pass were read before: not an empty shard
        self._reader = None
        return passes, entry, cursor["row"] if cursor else 0

    def _restart_point(self) -> list:
        """[pass, entry, cursor]: every row of this process's shard before it has all its documents in rows."""
        return min([[self.passes, self.entry, self.cursor], *self._origins], key=_order_key)

    # ------------------------------------------------------------------ rows
    def micro_batch(self, size: int) -> list[list[dict[str, list[int]]]]:
        return [self.next_row() for _ in range(size)]

    def next_row(self) -> list[dict[str, list[int]]]:
        """The documents of the next row (total <= sequence_len tokens)."""
        row: list[dict[str, list[int]]] = []
        used = 0
        while used < self.capacity and len(row) < self.max_docs:
            if not self.pending:
                self._pull()
            doc = self.pending[0]
            n = len(doc["input_ids"])
            if used + n <= self.capacity:
                row.append(self.pending.popleft())
                self._origins.popleft()
                used += n
            elif self.concatenate:
                take = self.capacity - used
                row.append({k: v[:take] for k, v in doc.items()})
                self.pending[0] = {k: v[take:] for k, v in doc.items()}
                used += take
            else:
                break
        self.rows_out += 1
        if not self.separate and len(row) > 1:  # one sequence: attention crosses the documents
            row = [{k: [t for d in row for t in d[k]] for k in row[0]}]
        return row

    def _pull(self) -> None:
        """Read until at least one document waits; a pass that gives none for this process is an error."""
        while not self.pending:
            if self._reader is None:
                self._reader = self._read()
            item = next(self._reader, None)
            if item is None:  # the end of the last entry: the next pass starts at the beginning
                if self._docs_this_pass == 0:
                    raise DataError(f"the stream gave no document to process {self.rank} of {self.world} in a whole "
                                    "pass over the data: add rows (each process reads every world-th row).")
                self.entry, self.cursor, self.taken, self._docs_this_pass = 0, None, 0, 0
                self.passes += 1
                self._reader = None
                continue
            docs, self.entry, before, (self.cursor, self.taken) = item
            self._docs_this_pass += len(docs)
            self.pending.extend(docs)
            self._origins.extend([[self.passes, self.entry, before]] * len(docs))

    def _read(self) -> Iterator[tuple[list[dict], int, dict, tuple[dict | None, int]]]:
        """(documents of one source row, entry index, cursor before the row, position after taking it), from the
        saved position on."""
        spec = self.spec
        for e in range(self.entry, len(spec.sources)):
            src = spec.sources[e]
            first = e == self.entry
            seed = [spec.cfg.seed, self.passes, e] if self.shuffle else None
            batch: list[tuple[dict, dict, Any]] = []
            for item in window_rows(src, rank=self.rank, world=self.world, cursor=self.cursor if first else None,
                                    taken=self.taken if first else 0, window=self.window, seed=seed):
                batch.append(item)
                if len(batch) >= READ_AHEAD:
                    yield from ((docs, e, before, after) for docs, before, after in self._documents(src, batch))
                    batch = []
            yield from ((docs, e, before, after) for docs, before, after in self._documents(src, batch))

    def _documents(self, src: EntryFiles, batch: list[tuple[dict, dict, Any]]):
        if self.spec.pretrain:
            return self._texts(src, batch)
        return ((self._formatted(src, row, before), before, after) for row, before, after in batch)

    # ------------------------------------------------------------------ documents
    def _texts(self, src: EntryFiles, batch: list[tuple[dict, dict, Any]]):
        column = src.entry.text_column
        texts = []
        for row, before, _ in batch:
            value = row.get(column)
            if not isinstance(value, str):
                found = f"a {type(value).__name__}" if column in row else f"no such column (the row has {sorted(row)})"
                raise DataError(f"{src.where} ({src.entry.path}) row {before['row']}: text_column `{column}` must "
                                f"hold text, found {found}; set text_column to the column with the documents.")
            texts.append(value)
        spec = self.spec
        encoded = spec.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
        for (_, before, after), text, ids in zip(batch, texts, encoded, strict=True):
            if not text.strip():
                yield [], before, after
                continue
            ids = spec.prefix + list(ids) + spec.suffix
            if self.concatenate:
                yield [{"input_ids": ids, "labels": ids}], before, after
            else:  # a text longer than a row: consecutive pieces of sequence_len tokens
                yield [{"input_ids": ids[i:i + self.capacity], "labels": ids[i:i + self.capacity]}
                       for i in range(0, len(ids), self.capacity)], before, after

    def _formatted(self, src: EntryFiles, row: dict, before: dict) -> list[dict[str, list[int]]]:
        fn = self._format_fns()[id(src)]
        where = f"{src.where} ({src.entry.path}) row {before['row']}"
        try:
            produced = fn(row)
        except RowError as exc:
            raise DataError(f"{where}: {exc}") from None
        return [d for d in (self._length_rules(p, where) for p in produced) if d is not None]

    def _format_fns(self) -> dict[int, Any]:
        if self._fns is None:
            from . import formats
            from .formats import FormatContext

            cfg = self.spec.cfg
            self._fns = {}
            for src in self.spec.sources:
                fmt, style = formats.resolve(src.entry.type, src.where, [str(cfg.source_dir)])
                self._fns[id(src)] = fmt.builder(FormatContext(cfg=cfg, entry=src.entry, tokenizer=self.spec.tokenizer,
                                                               style=style))
        return self._fns

    def _length_rules(self, doc: dict, where: str) -> dict[str, list[int]] | None:
        """The rules `apply_length_rules` gives prepared rows, one streamed document at a time."""
        cfg = self.spec.cfg
        ids = list(doc["input_ids"])
        labels = list(doc.get("labels", ids))
        if len(ids) > self.capacity:
            if cfg.excess_length_strategy == "raise":
                raise DataError(f"{where}: {len(ids)} tokens exceeds sequence_len {self.capacity}. Raise sequence_len, "
                                "or set excess_length_strategy: drop or truncate.")
            if cfg.excess_length_strategy == "drop":
                return None
            ids, labels = ids[: self.capacity], labels[: self.capacity]
        if cfg.min_sample_len and len(ids) < cfg.min_sample_len:
            return None
        if all(x == IGNORE_INDEX for x in labels[1:]):
            return None
        return {"input_ids": ids, "labels": labels}


def _order_key(position: list) -> tuple[int, int, int]:
    """Stream order of [pass, entry, cursor] positions (a cursor's `row` counts the entry's source rows)."""
    passes, entry, cursor = position
    return passes, entry, cursor["row"] if cursor else 0


def _order(window: int) -> str:
    return f"shuffled in windows of {window} rows" if window > 1 else "read in order"
