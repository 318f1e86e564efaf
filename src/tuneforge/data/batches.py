"""The order of training rows for an epoch: deterministic from (seed, epoch), so resume is exact."""

from __future__ import annotations

import random
from typing import Any

from tuneforge.errors import DataError

from .packing import pack, pack_sequential


def epoch_rng(seed: int, epoch: int) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, so the stream is the same in every process
    # and Python version (unlike hash() of objects, which may be salted).
    return random.Random(f"tuneforge-epoch:{seed}:{epoch}")


def plan_epoch(
    lengths: list[int],
    *,
    epoch: int,
    seed: int,
    micro_batch_size: int,
    packed: bool,
    capacity: int,
    shuffle: bool = True,
    group_size: int = 100_000,
    max_docs: int | None = None,
    sequential: bool = False,
    by_length: bool = False,
    flatten: bool = False,
) -> list[list[list[int]]]:
    """Micro-batches for one epoch. Each micro-batch is a list of rows; each row a list of dataset indices.

    Unpacked: every row holds one document. Packed: documents are packed into rows of `capacity`
    tokens, group by group (groups of `group_size` shuffled documents), and the rows shuffled.
    With `sequential`, documents keep dataset order and are packed next-fit. With `by_length` (unpacked),
    micro-batches hold rows of similar length (`_length_grouped`). With `flatten` (unpacked), each
    micro-batch's documents go into one row, back to back, so the batch holds no padding.
    """
    rng = epoch_rng(seed, epoch)
    order = list(range(len(lengths)))
    if shuffle and not sequential:
        rng.shuffle(order)
    if packed:
        longest = max(lengths, default=0)
        if longest > capacity:
            raise DataError(
                f"a row has {longest} tokens, more than the packed row length {capacity}. Packed rows hold "
                "sequence_len tokens: keep eval_sequence_len <= sequence_len, or set eval_sample_packing: false."
            )
        rows: list[list[int]] = []
        packer = pack_sequential if sequential else pack
        for start in range(0, len(order), group_size):
            group = order[start : start + group_size]
            glens = [lengths[i] for i in group]
            rows.extend([group[j] for j in b] for b in packer(glens, capacity, max_docs))
        if shuffle and not sequential:
            rng.shuffle(rows)
        return _chunks(rows, micro_batch_size)
    if by_length:
        batches = _length_grouped(order, lengths, micro_batch_size, rng)
    else:
        batches = _chunks([[i] for i in order], micro_batch_size)
    if flatten:
        return [[[row[0] for row in batch]] for batch in batches]
    return batches


def _chunks(rows: list[list[int]], size: int) -> list[list[list[int]]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def gather(ds, micro_batch: list[list[int]], columns: tuple[str, ...] = ("input_ids", "labels")) -> list[list[dict[str, Any]]]:
    """Fetch the documents of one micro-batch with a single columnar read, as `collate` expects them."""
    flat = [i for row in micro_batch for i in row]
    data = ds[flat]
    keep = [c for c in columns if c in data]
    docs = [{k: data[k][j] for k in keep} for j in range(len(flat))]
    out, at = [], 0
    for row in micro_batch:
        out.append(docs[at : at + len(row)])
        at += len(row)
    return out


LENGTH_SPAN = 50  # micro-batches whose rows group_by_length sorts together


def _length_grouped(order: list[int], lengths: list[int], size: int, rng: random.Random) -> list[list[list[int]]]:
    """Micro-batches of rows of similar length, so little of each is padding: the shuffled order is cut into
    spans of LENGTH_SPAN micro-batches, each span sorted longest first and cut into micro-batches, which are
    then shuffled, except that the one holding the longest row goes first (a batch too large for memory
    fails at the first step rather than hours in)."""
    span = size * LENGTH_SPAN
    batches = []
    for start in range(0, len(order), span):
        ranked = sorted(order[start : start + span], key=lambda i: -lengths[i])
        batches += [ranked[j : j + size] for j in range(0, len(ranked), size)]
    rng.shuffle(batches)
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    batches.insert(0, batches.pop(longest))
    return [[[i] for i in batch] for batch in batches]
