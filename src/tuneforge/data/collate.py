"""Build model-ready tensors from rows of documents (a packed row holds several documents).

The batch contract every objective relies on:
  input_ids     [B, T] long
  position_ids  [B, T] long; restart at 0 for every document, so attention never crosses documents
  target_ids    [B, T] long; the label of the *next* token of the same document, -100 where nothing
                is trained, at each document's last token, and on padding. Labels never cross a
                document boundary because the shift happens per document.
  cu_seqlens    [D+1] int32; cumulative document lengths over the flattened batch (varlen kernels)
  max_seqlen    int; longest document
  num_target_tokens  int; tokens that contribute to the loss
  real_tokens   [B, T] bool; False on padding (which the other tensors treat as part of the last document)

Padding sits at the end of each row and continues the last document's positions, so an unpacked row
is an ordinary causal sequence and padding never changes a real token's output.
"""

from __future__ import annotations

from typing import Any

import torch

from .formats import IGNORE_INDEX


def collate(
    rows: list[list[dict[str, Any]]],
    pad_id: int,
    pad_to: int | None = None,
    multiple_of: int | None = None,
) -> dict[str, Any]:
    width = max(sum(len(d["input_ids"]) for d in row) for row in rows)
    if pad_to:
        width = max(width, pad_to)
    if multiple_of:
        width = -(-width // multiple_of) * multiple_of
    B = len(rows)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, width), dtype=torch.long)
    target_ids = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    real = torch.zeros((B, width), dtype=torch.bool)
    doc_lens: list[int] = []
    for b, row in enumerate(rows):
        at = 0
        for doc in row:
            ids, labels = doc["input_ids"], doc.get("labels", doc["input_ids"])
            n = len(ids)
            if len(labels) != n:
                raise ValueError(f"a document has {n} input_ids but {len(labels)} labels; they must be aligned")
            input_ids[b, at : at + n] = torch.as_tensor(ids, dtype=torch.long)
            position_ids[b, at : at + n] = torch.arange(n)
            if n > 1:
                target_ids[b, at : at + n - 1] = torch.as_tensor(labels[1:], dtype=torch.long)
            doc_lens.append(n)
            at += n
        real[b, :at] = True
        if at < width:  # padding continues the last document's positions
            last = int(position_ids[b, at - 1]) + 1 if at else 0
            position_ids[b, at:] = torch.arange(last, last + width - at)
            doc_lens[-1] += width - at
    cu = torch.zeros(len(doc_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(doc_lens, dtype=torch.int32), 0)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "target_ids": target_ids,
        "cu_seqlens": cu,
        "max_seqlen": max(doc_lens),
        "num_target_tokens": int((target_ids != IGNORE_INDEX).sum()),
        "real_tokens": real,
    }
