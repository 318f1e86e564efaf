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
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from tuneforge.errors import TuneforgeError

from .plan import MicroBatch

log = logging.getLogger("tuneforge")

# The phases of an optimizer step, as the trainer enters them (named in the diagnosis).
GENERATION = "generation"
FORWARD_BACKWARD = "forward/backward pass"
UPDATE = "optimizer update"  # the phase after which the step's state is no longer the last completed one
EVALUATION = "evaluation"  # between steps: the weights are a completed step's

T = TypeVar("T")


class OutOfMemory(TuneforgeError):
    """A step ran out of accelerator memory and could not be retried."""


class OutOfMemoryPolicy:
    """What the trainer does when a step or an evaluation runs out of accelerator memory.

    The trainer sets `phase` as its step goes on; `run_step` runs a step (retrying it in smaller pieces
    where allowed) and `run_evaluation` an evaluation, and both stop the run with `OutOfMemory` otherwise.
    `drop_gradients` zeroes the accumulated gradients of a failed step; `checkpoint_last_step` returns the
    checkpoint of the last completed step, saving it unless it exists.
    """

    def __init__(self, cfg, objective, *, processes: int, lengths: list[int], drop_gradients: Callable[[], None],
                 checkpoint_last_step: Callable[[], Path]):
        self.cfg = cfg
        self.objective = objective
        self.processes = processes
        self.lengths = lengths
        self.drop_gradients = drop_gradients
        self.checkpoint_last_step = checkpoint_last_step
        self.phase = FORWARD_BACKWARD
        if cfg.auto_find_batch_size and processes > 1:
            log.warning("auto_find_batch_size retries single-process runs only; with %d processes a step that runs "
                        "out of memory stops the run with what to change", processes)

    def run_step(self, micro_batches: list[MicroBatch], state, step_fn: Callable[[list[MicroBatch]], T]) -> T:
        """`step_fn` over `micro_batches`, each cut into `state.micro_batch_splits` pieces; after running out of
        memory, the same step again in pieces half as large where auto_find_batch_size allows."""
        while True:
            pieces = split(micro_batches, state.micro_batch_splits)
            self.phase = FORWARD_BACKWARD  # moving the batches to the device counts as its start
            try:
                return step_fn(pieces)
            except torch.OutOfMemoryError:
                phase = self.phase
            # Out of the except clause: the exception's frames, which hold the step's activations, are gone.
            state.micro_batch_splits = self._after_failed_step(phase, pieces, state)

    def run_evaluation(self, evaluate: Callable[[], T], step: int) -> T:
        """`evaluate()`; out of memory there, the last completed step is kept and the run stops."""
        try:
            return evaluate()
        except torch.OutOfMemoryError:
            pass
        release()
        raise OutOfMemory(diagnosis(self.cfg, step=step, phase=EVALUATION, rows=0, tokens=0, retry_blocked=None,
                                    saved=self._keep_completed_step(step)))

    def _after_failed_step(self, phase: str, pieces: list[MicroBatch], state) -> int:
        """Drop the failed step's gradients; then the number of pieces to retry it with, or stop with a
        diagnosis, keeping the last completed step in a checkpoint where that state is intact."""
        self.drop_gradients()
        release()
        blocked = self._retry_blocked(pieces)
        step = state.global_step + 1
        if phase != UPDATE and self.cfg.auto_find_batch_size and blocked is None:
            splits = state.micro_batch_splits * 2
            log.warning("step %d ran out of memory in its %s; auto_find_batch_size: retrying it with each micro-batch "
                        "in %d pieces (the same rows per step, so the same update)", step, phase, splits)
            return splits
        saved = self._keep_completed_step(state.global_step) if phase != UPDATE else None
        largest = max(pieces, key=len)
        raise OutOfMemory(diagnosis(
            self.cfg, step=step, phase=phase, rows=len(largest),
            tokens=sum(self.lengths[i] for row in largest for i in row), retry_blocked=blocked, saved=saved))

    def _keep_completed_step(self, completed: int) -> str | None:
        """The checkpoint of the last completed step. Single-process runs only: the other processes of a
        data-parallel run are blocked in a collective and would not join the save."""
        if self.processes > 1 or completed == 0:
            return None
        return str(self.checkpoint_last_step())

    def _retry_blocked(self, pieces: list[MicroBatch]) -> str | None:
        """Why auto_find_batch_size cannot retry this step in smaller micro-batches (None: it can)."""
        if self.processes > 1:
            return "it retries single-process runs only (the other processes would wait in the gradient all-reduce)"
        if not self.objective.splits_micro_batches:
            return f"{self.objective.name}'s loss depends on which rows share a micro-batch"
        if max(len(p) for p in pieces) == 1:
            return "the micro-batches are down to one row each"
        return None


def split(micro_batches: list[MicroBatch], pieces: int) -> list[MicroBatch]:
    """Each micro-batch cut into up to `pieces` runs of consecutive rows (as even as possible), in order."""
    cut: list[MicroBatch] = []
    for mb in micro_batches:
        n = min(pieces, len(mb))
        bounds = [round(i * len(mb) / n) for i in range(n + 1)]
        cut += [mb[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    return cut


def release() -> None:
    """Free what the failed step held (its activations go with the exception's frames)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- memory released on a schedule
def collect_garbage() -> None:
    gc.collect()


def empty_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def release_after_step(cfg, step: int, epoch_end: bool) -> None:
    """gc_collect_steps / torch_empty_cache_steps (or gc_steps for both) after `step`; a gc_collect_steps of
    -1 collects at the end of every epoch (and before every evaluation: `release_before_evaluation`)."""
    collect = cfg.gc_collect_steps if cfg.gc_collect_steps is not None else cfg.gc_steps
    empty = cfg.torch_empty_cache_steps if cfg.torch_empty_cache_steps is not None else cfg.gc_steps
    if collect and (step % collect == 0 if collect > 0 else epoch_end):
        collect_garbage()
    if empty and step % empty == 0:
        empty_cuda_cache()


def release_before_evaluation(cfg) -> None:
    if cfg.gc_collect_steps == -1:
        collect_garbage()


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
