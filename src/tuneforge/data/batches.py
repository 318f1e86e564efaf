"""The order of training rows for an epoch: deterministic from (seed, epoch), so resume is exact."""

from __future__ import annotations

import random

from .packing import pack, pack_sequential


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
) -> list[list[list[int]]]:
    """Micro-batches for one epoch. Each micro-batch is a list of rows; each row a list of dataset indices.

    Unpacked: every row holds one document. Packed: documents are packed into rows of `capacity`
    tokens, group by group (groups of `group_size` shuffled documents), and the rows shuffled.
    """
    rng = random.Random(hash((seed, epoch)) & 0xFFFFFFFF)
    order = list(range(len(lengths)))
    if shuffle and not sequential:
        rng.shuffle(order)
    if packed:
        rows: list[list[int]] = []
        for start in range(0, len(order), group_size):
            group = order[start : start + group_size]
            glens = [lengths[i] for i in group]
            packer = pack_sequential if sequential else pack
            rows.extend([group[j] for j in b] for b in packer(glens, capacity, max_docs))
        if shuffle and not sequential:
            rng.shuffle(rows)
    else:
        rows = [[i] for i in order]
    return [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
