"""The tokenized rows a run trains or evaluates on, and the device batches made from them."""

from __future__ import annotations

import torch

from tuneforge.methods.base import Batch, Objective

from .plan import MicroBatch


class RowSource:
    """The documents of a tokenized dataset, fetched by index (only the objective's `row_columns`), and
    every document's length in tokens (what the step plan packs)."""

    def __init__(self, ds, columns: tuple[str, ...]):
        self.columns = tuple(c for c in columns if c in ds.column_names)
        self.ds = ds.select_columns(list(self.columns))
        self.lengths = [int(n) for n in ds["length"]]

    def rows(self, mb: MicroBatch) -> list[list[dict]]:
        """The documents of each row of `mb` (several per row when packed)."""
        from tuneforge.data.batches import gather

        return gather(self.ds, mb, self.columns)


def device_batch(objective: Objective, source: RowSource, mb: MicroBatch, *, pad_id: int, device,
                 training: bool) -> Batch:
    """The objective's collated batch of `mb` on `device`, with its token counts (for throughput and FLOPs)."""
    batch = objective.collate(source.rows(mb), pad_id, training=training)
    lengths = [source.lengths[i] for row in mb for i in row]
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    batch["num_tokens"] = sum(lengths)
    batch["sum_sq_lengths"] = sum(n * n for n in lengths)
    return batch
