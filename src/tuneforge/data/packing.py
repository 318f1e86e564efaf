"""Bin packing of documents into rows of at most `capacity` tokens."""

from __future__ import annotations

import bisect


def pack(lengths: list[int], capacity: int, max_docs: int | None = None) -> list[list[int]]:
    """Best-fit-decreasing: returns bins as lists of indices into `lengths`.

    Each bin's total length is <= capacity. Documents longer than capacity must be removed beforehand.
    Within a bin, indices keep ascending order so packed rows are reproducible.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # Sorted list of (remaining capacity, bin id) for bins that can still take documents.
    free: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"document {i} has {n} tokens, more than the packing capacity {capacity}")
        pos = bisect.bisect_left(free, (n, -1))
        if pos < len(free):
            remaining, b = free.pop(pos)
            bins[b].append(i)
            remaining -= n
        else:
            b = len(bins)
            bins.append([i])
            remaining = capacity - n
        if remaining > 0 and (max_docs is None or len(bins[b]) < max_docs):
            bisect.insort(free, (remaining, b))
    return [sorted(b) for b in bins]


def pack_sequential(lengths: list[int], capacity: int, max_docs: int | None = None) -> list[list[int]]:
    """Next-fit in the given order (keeps dataset order; lower efficiency)."""
    bins: list[list[int]] = []
    used = capacity + 1
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"document {i} has {n} tokens, more than the packing capacity {capacity}")
        if used + n > capacity or (max_docs and len(bins[-1]) >= max_docs):
            bins.append([])
            used = 0
        bins[-1].append(i)
        used += n
    return bins
