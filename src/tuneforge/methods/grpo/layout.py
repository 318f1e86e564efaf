"""GRPO's batch layout: prompt+completion rows for the training forward, the completion view of them,
per-token completion log-probs, and the split of one generation into micro-batches."""

from __future__ import annotations

import torch

from tuneforge.data.collate import collate as collate_documents
from tuneforge.models.logprobs import token_logps
from tuneforge.models.losses import IGNORE_INDEX, LogitHead, decoder_hidden_states

from ..base import Batch


def completion_logps(model, batch: Batch, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of each completion token, [N, C] (0 outside `token_valid`).

    One decoder pass over the prompt+completion rows; the LM head runs only at completion tokens
    (`models.logprobs.token_logps`: chunked and checkpointed, no [N, T, V] logits tensor).
    """
    hidden = decoder_hidden_states(model, batch)
    valid = batch["token_valid"]
    rows, cols = valid.nonzero(as_tuple=True)
    positions = batch["token_pos"][rows, cols]
    flat = token_logps(LogitHead(model), hidden[rows, positions], batch["completion_ids"][rows, cols],
                       temperature=temperature)
    per_token = torch.zeros(valid.shape, dtype=flat.dtype, device=flat.device)
    return per_token.index_put((rows, cols), flat)


def training_layout(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> Batch:
    """Rows prompt+completion in the collate contract, plus the completion view [N, C]:
    `completion_ids`, `token_valid` (real completion tokens) and `token_pos` (the position whose
    next-token prediction is that token), and the sizes the trainer's throughput metrics read
    (`row_lengths`, `num_tokens`, `sum_sq_lengths`)."""
    docs = [[{"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c}] for p, c in zip(prompts, completions, strict=True)]
    batch = collate_documents(docs, pad_id)
    N, C = len(completions), max(1, max(len(c) for c in completions))
    comp = torch.full((N, C), pad_id, dtype=torch.long)
    valid = torch.zeros((N, C), dtype=torch.bool)
    pos = torch.zeros((N, C), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        comp[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        valid[i, : len(c)] = True
        pos[i] = torch.arange(C) + len(p) - 1
    row_lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    batch.update(completion_ids=comp, token_valid=valid, token_pos=pos.clamp(max=batch["input_ids"].shape[1] - 1),
                 row_lengths=row_lengths, num_tokens=sum(row_lengths), sum_sq_lengths=sum(n * n for n in row_lengths))
    return batch


def split_rollout(batch: Batch, size: int) -> list[Batch]:
    """Micro-batches of `size` completion rows from one scored rollout (advantages already set).

    Per-row tensors and lists are sliced; the varlen boundaries are rebuilt (one padded document per
    row); generation time and tokens stay with the first chunk so they are counted once.
    """
    n_rows, width = batch["input_ids"].shape
    if n_rows <= size:
        return [batch]
    chunks = []
    for start in range(0, n_rows, size):
        end = min(n_rows, start + size)
        chunk = {}
        for key, value in batch.items():
            per_row = (torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n_rows) or (
                isinstance(value, list) and len(value) == n_rows)
            chunk[key] = value[start:end] if per_row and key != "cu_seqlens" else value
        rows = end - start
        lengths = batch["row_lengths"][start:end]
        chunk.update(cu_seqlens=torch.arange(rows + 1, dtype=torch.int32, device=batch["cu_seqlens"].device) * width,
                     max_seqlen=width, num_target_tokens=int((chunk["target_ids"] != IGNORE_INDEX).sum()),
                     num_tokens=sum(lengths), sum_sq_lengths=sum(n * n for n in lengths))
        if start:
            chunk.update(gen_seconds=0.0, gen_tokens=0)
        chunks.append(chunk)
    return chunks
