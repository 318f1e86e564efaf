"""Running out of GPU memory during a step: a diagnosis instead of a stack trace, the last completed step
kept, and with `auto_find_batch_size` a retry of the same step in smaller micro-batches.

Why a retry can be exact: an objective's loss for a micro-batch is its sum over items divided by the item
count of the whole optimizer step (`methods.base`), so a step's gradient does not depend on how its rows
are cut into micro-batches. Halving every micro-batch (twice as many accumulated, the same rows) gives
the same update up to float summation order; the data order, the schedule and a later resume are those
of the configured run. Transformers' `auto_find_batch_size` restarts training with a smaller batch,
which changes both.

Where the out-of-memory error is raised decides what is safe:
- generation, forward or backward: the weights are those of the last completed step; the partial
  gradients are dropped, and the step can be retried or resumed from a checkpoint of that state;
- the optimizer update: some weights may already be updated, so nothing is saved from that state;
- an evaluation: it runs between steps, so the last completed step is kept as in the first case.
"""

from __future__ import annotations

import gc

import torch

from tuneforge.errors import TuneforgeError

from .plan import MicroBatch

UPDATE = "optimizer update"  # the phase after which the step's state is no longer the last completed one
EVALUATION = "evaluation"  # between steps: the weights are a completed step's


class OutOfMemory(TuneforgeError):
    """A step ran out of accelerator memory and could not be retried."""


def split(micro_batches: list[MicroBatch], pieces: int) -> list[MicroBatch]:
    """Each micro-batch cut into up to `pieces` runs of consecutive rows (as even as possible), in order."""
    out = []
    for mb in micro_batches:
        n = min(pieces, len(mb))
        bounds = [round(i * len(mb) / n) for i in range(n + 1)]
        out += [mb[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    return out


def release() -> None:
    """Free what the failed step held (its activations go with the exception's frames)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_memory() -> str:
    """'peak X of Y GiB' on CUDA (empty elsewhere), for the message."""
    if not torch.cuda.is_available():
        return ""
    peak = torch.cuda.max_memory_allocated() / 2**30
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    return f"; peak allocated {peak:.1f} of {total:.1f} GiB"


def diagnosis(cfg, *, step: int, phase: str, rows: int, tokens: int, retry_blocked: str | None,
              saved: str | None) -> str:
    """The message: where it happened, what was kept, and the settings that lower memory, leaving out those
    already in use."""
    if saved:
        kept = (f"The last completed step is saved in {saved}: resume from it with this config, changed as below "
                f"where that keeps the data plan (all but micro_batch_size and sequence_len do).")
    elif phase == UPDATE:
        kept = "Nothing was saved from the partly updated weights."
    else:
        kept = "No checkpoint was written (no step had completed since the last one)."
    if phase == EVALUATION:
        where = f"the evaluation after step {step}"
    else:
        where = f"the {phase} of step {step}" + (f" ({rows} rows, {tokens} tokens in that micro-batch)" if rows else "")
    return (f"out of accelerator memory in {where}{device_memory()}. {kept}\nTo fit:\n  - "
            + "\n  - ".join(_hints(cfg, phase, retry_blocked)))


def _hints(cfg, phase: str, retry_blocked: str | None) -> list[str]:
    if phase == EVALUATION:
        hints = [f"eval_batch_size: lower it from {cfg.eval_batch_size or cfg.micro_batch_size}"]
        if cfg.do_causal_lm_eval or cfg.generate_samples:
            hints.append(f"generation_max_new_tokens: lower it from {cfg.generation_max_new_tokens} (the KV cache "
                         "of the generated continuations)")
        return hints
    hints = []
    if phase == UPDATE:
        hints.append("optimizer: adamw_8bit or paged_adamw_8bit (optimizer states in 8 bits)")
    elif not cfg.auto_find_batch_size:
        hints.append("auto_find_batch_size: true (retry a step that runs out of memory with micro-batches half "
                     "as large and twice as many of them: the same rows per step, the same updates)")
    elif retry_blocked:
        hints.append(f"auto_find_batch_size could not retry: {retry_blocked}")
    if phase != UPDATE:
        hints.append(f"micro_batch_size: lower it from {cfg.micro_batch_size} and raise gradient_accumulation_steps "
                     f"(now {cfg.grad_accum}) by the same factor")
        if not cfg.gradient_checkpointing:
            hints.append("gradient_checkpointing: true (recompute activations in the backward pass)")
        hints.append(f"sequence_len: lower it from {cfg.sequence_len} (longer rows are truncated or dropped)")
    if not cfg.adapter:
        hints.append("adapter: lora or qlora (train a small adapter instead of every weight)")
    return hints
