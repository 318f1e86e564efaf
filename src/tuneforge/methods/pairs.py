"""The batch layout of the pair methods (DPO/IPO, SimPO, ORPO, reward models; KTO and process reward
models reuse `layout`), per-sequence log-probs, and the data checks shared by the pair methods.

Batches. All sequences of a micro-batch go through the model in ONE forward pass. Unpacked, the rows
are [chosen_1 .. chosen_P, rejected_1 .. rejected_P], right-padded (TRL's layout). With `sample_packing`
each packed row holds whole pairs back to back (chosen_i, rejected_i, chosen_j, ...), position ids
restart at every sequence, so no sequence attends to another (see `models/losses.py`), and every
sequence log-prob is the one of the unpacked layout; rows are filled to `sequence_len` instead of being
padded to the longest sequence. `doc_ids` names the sequence of every position (-1 on padding).

Sequence log-probs. The decoder runs once; the LM head runs only at labelled positions
(`models.logprobs.token_logps`: chunked and checkpointed, no [B, T, V] logits are kept), and the
per-token log-probs are summed per sequence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from tuneforge.config.schema import Config
from tuneforge.data.collate import collate as collate_documents
from tuneforge.errors import DataError
from tuneforge.models.logprobs import token_logps as models_token_logps
from tuneforge.models.losses import IGNORE_INDEX, LogitHead, decoder_hidden_states

from .base import Batch

log = logging.getLogger("tuneforge")

PAIR_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


# ---------------------------------------------------------------- batch layout
Doc = tuple[list[int], list[int]]  # (input_ids, labels)


def layout(rows: list[list[Doc]], pad_id: int, *, pad_to: int | None = None, multiple_of: int | None = None,
           full_targets: bool = False, prefix: str = "") -> Batch:
    """Lay out rows of sequences as the SFT collate does, plus `doc_ids` [B, T] and `doc_last` [D].

    Sequences are numbered row by row. `full_targets` adds `full_target_ids`: every next token of the same
    sequence, labelled or not (ORPO's NLL over prompt + answer).
    """
    docs = [[{"input_ids": ids, "labels": labels} for ids, labels in row] for row in rows]
    batch = collate_documents(docs, pad_id, pad_to=pad_to, multiple_of=multiple_of)
    B, T = batch["input_ids"].shape
    doc_ids = torch.full((B, T), -1, dtype=torch.long)
    last = []
    d = 0
    for b, row in enumerate(rows):
        at = 0
        for ids, _ in row:
            doc_ids[b, at : at + len(ids)] = d
            at += len(ids)
            last.append(b * T + at - 1)
            d += 1
    batch["doc_ids"] = doc_ids
    batch["doc_last"] = torch.tensor(last, dtype=torch.long)
    if full_targets:
        every = [[{"input_ids": ids, "labels": ids} for ids, _ in row] for row in rows]
        batch["full_target_ids"] = collate_documents(every, pad_id, pad_to=pad_to, multiple_of=multiple_of)["target_ids"]
    return {prefix + k: v for k, v in batch.items()}


def sub_batch(batch: Batch, prefix: str) -> Batch:
    """The keys of `batch` that start with `prefix`, without it (a second layout in the same batch)."""
    return {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}


def collate_pairs(rows: list[list[dict]], pad_id: int, *, packed: bool, pad_to: int | None = None,
                  multiple_of: int | None = None, full_targets: bool = False) -> Batch:
    """One forward's worth of pairs: see the module docstring for the two layouts."""
    pairs = [doc for row in rows for doc in row]
    chosen = [(p["chosen_input_ids"], p.get("chosen_labels") or p["chosen_input_ids"]) for p in pairs]
    rejected = [(p["rejected_input_ids"], p.get("rejected_labels") or p["rejected_input_ids"]) for p in pairs]
    n = len(pairs)
    if packed:
        seq_rows, at = [], 0
        for row in rows:
            seq_rows.append([s for k in range(at, at + len(row)) for s in (chosen[k], rejected[k])])
            at += len(row)
        chosen_doc, rejected_doc = torch.arange(0, 2 * n, 2), torch.arange(1, 2 * n, 2)
    else:
        seq_rows = [[s] for s in chosen] + [[s] for s in rejected]
        chosen_doc, rejected_doc = torch.arange(n), torch.arange(n, 2 * n)
    batch = layout(seq_rows, pad_id, pad_to=pad_to, multiple_of=multiple_of, full_targets=full_targets)
    batch.update(chosen_doc=chosen_doc, rejected_doc=rejected_doc, num_pairs=n)
    for key in ("ref_chosen_logps", "ref_rejected_logps", "margin"):
        if pairs and pairs[0].get(key) is not None:
            batch[key] = torch.tensor([float(p[key]) for p in pairs], dtype=torch.float32)
    return batch


def batch_shape(cfg: Config, training: bool) -> tuple[bool, int | None]:
    """(packed, pad_to) for a micro-batch, following the same keys as the SFT collate."""
    packed = cfg.sample_packing if training else cfg.packing_for_eval
    pad = cfg.pad_to_sequence_len or (cfg.pad_to_sequence_len is None and packed)
    pad_to = (cfg.eval_sequence_len or cfg.sequence_len) if not training else cfg.sequence_len
    return packed, pad_to if pad else None


# ---------------------------------------------------------------- sequence log-probs
@dataclass
class SequenceLogps:
    logps: torch.Tensor  # [D] sum of log-probs of each sequence's labelled tokens
    counts: torch.Tensor  # [D] labelled tokens per sequence
    full_nll: torch.Tensor | None = None  # [D] sum of -log p over every next token (full_targets only)
    full_counts: torch.Tensor | None = None


def sequence_logps(network, batch: Batch, *, full: bool = False) -> SequenceLogps:
    """Per-sequence sums of token log-probs (labelled tokens; with `full` also every token) in one forward."""
    hidden = decoder_hidden_states(network, batch)
    targets = batch["full_target_ids"] if full else batch["target_ids"]
    mask = targets != IGNORE_INDEX
    doc = batch["doc_ids"][mask]
    token_logps = models_token_logps(LogitHead(network), hidden[mask], targets[mask])
    n_docs = batch["doc_last"].numel()

    def per_doc(values: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        totals = torch.zeros(n_docs, dtype=values.dtype, device=values.device)
        return totals.index_add(0, doc[which], values[which])

    if not full:
        every = torch.ones_like(doc, dtype=torch.bool)
        return SequenceLogps(per_doc(token_logps, every), per_doc(torch.ones_like(token_logps), every))
    labelled = batch["target_ids"][mask] != IGNORE_INDEX
    every = torch.ones_like(labelled)
    return SequenceLogps(per_doc(token_logps, labelled), per_doc(torch.ones_like(token_logps), labelled),
                         per_doc(-token_logps, every), per_doc(torch.ones_like(token_logps), every))


# ---------------------------------------------------------------- data preparation shared by the pair methods
def require_columns(ds, split: str, columns: tuple[str, ...], what: str, fix: str) -> None:
    """Fail with one message when a prepared split lacks the columns an objective trains on."""
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(f"{what}, but the {split} data has no {', '.join(missing)} "
                        f"(columns: {', '.join(ds.column_names)}). {fix}")


def pair_lengths(ds):
    """`length` = chosen + rejected tokens: what a pair puts through the model, and what packing fits."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def count(table: pa.Table) -> pa.Table:
        total = pc.add(pc.list_value_length(table.column("chosen_input_ids")),
                       pc.list_value_length(table.column("rejected_input_ids")))
        return table.set_column(table.schema.get_field_index("length"), "length", total.cast(pa.int64()))

    return ds.with_format("arrow").map(count, batched=True, desc="pair lengths",
                                       load_from_cache_file=False).with_format(None)


def drop_unpackable(ds, cfg: Config, split: str):
    """With sample_packing a pair must fit one packed row: drop (or reject) pairs longer than the row."""
    capacity = cfg.sequence_len if split == "train" else (cfg.eval_sequence_len or cfg.sequence_len)
    lengths = np.asarray(ds["length"])
    too_long = lengths > capacity
    if not too_long.any():
        return ds
    n = int(too_long.sum())
    if cfg.excess_length_strategy == "raise":
        raise DataError(
            f"{split}: {n} pairs have more chosen + rejected tokens than sequence_len {capacity} (longest "
            f"{int(lengths.max())}); with sample_packing a pair is packed whole into one row. Raise sequence_len, "
            "or set excess_length_strategy: drop."
        )
    log.warning("%s: dropped %d of %d pairs whose chosen + rejected tokens exceed sequence_len %d (sample_packing "
                "packs a pair whole into one row; raise sequence_len to keep them)", split, n, len(ds), capacity)
    return ds.select(np.flatnonzero(~too_long))
