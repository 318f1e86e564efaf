"""Step accounting: which micro-batches each optimizer step trains on.

Every epoch's micro-batches are planned by `tuneforge.data.batches.plan_epoch`, deterministically from
(seed, epoch). An optimizer step takes the next `gradient_accumulation_steps` micro-batches of the
current epoch; the last step of an epoch may take fewer (its loss is normalised by its own trained
tokens, so it is still an exact mean). A fractional `num_epochs` trains the first part of the last
epoch. `max_steps` overrides `num_epochs` and keeps planning new epochs until it is reached.

The data position is (epoch, index of the next micro-batch in that epoch): with the deterministic
plans, that pair is all a checkpoint needs to continue on exactly the same rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tuneforge.config.schema import Config
from tuneforge.data.batches import plan_epoch
from tuneforge.errors import DataError

if TYPE_CHECKING:
    from tuneforge.methods.base import StepShape

MicroBatch = list[list[int]]  # rows, each a list of dataset indices (several when packed)


@dataclass
class Position:
    epoch: int = 0
    index: int = 0  # next micro-batch of the epoch


class StepPlan:
    def __init__(self, cfg: Config, lengths: list[int], *, world_size: int = 1, rank: int = 0,
                 shape: StepShape | None = None):
        self.cfg = cfg
        # The objective's step shape (methods/base.py); without one, the config's micro-batches.
        self.micro_batch_size = shape.rows_per_micro_batch if shape else cfg.micro_batch_size
        self.lengths = lengths
        self.world = world_size
        self.rank = rank
        self.accum = shape.micro_batches_per_step if shape else cfg.grad_accum
        self._epochs: dict[int, list[MicroBatch]] = {}
        if cfg.max_steps:
            self.num_epochs = None
            self.total_steps = cfg.max_steps
        else:
            self.num_epochs = math.ceil(cfg.num_epochs)
            self.total_steps = sum(self.steps_in_epoch(e) for e in range(self.num_epochs))
        if self.total_steps == 0:
            raise DataError("the training data gives zero optimizer steps; add rows or lower micro_batch_size.")

    def epoch(self, e: int) -> list[MicroBatch]:
        """This rank's micro-batches of epoch e (truncated for a fractional last epoch)."""
        if e not in self._epochs:
            cfg = self.cfg
            planned = plan_epoch(
                self.lengths, epoch=e, seed=cfg.seed, micro_batch_size=self.micro_batch_size,
                packed=cfg.sample_packing, capacity=cfg.sequence_len, group_size=cfg.sample_packing_group_size,
                max_docs=cfg.sample_packing_bin_size,
                sequential=cfg.sample_packing_sequentially or cfg.curriculum_sampling, by_length=cfg.group_by_length,
                flatten=bool(cfg.batch_flattening),
            )
            per_rank = len(planned) // self.world  # ranks stay in lockstep; the remainder is dropped
            if per_rank == 0:
                raise DataError(f"epoch {e} has {len(planned)} micro-batches for {self.world} processes; "
                                "add rows or lower micro_batch_size.")
            mine = planned[self.rank :: self.world][:per_rank]
            if self.num_epochs is not None and e == self.num_epochs - 1:
                fraction = self.cfg.num_epochs - e
                if fraction < 1:
                    mine = mine[: max(1, math.ceil(fraction * len(mine)))]
            self._epochs[e] = mine
        return self._epochs[e]

    def steps_in_epoch(self, e: int) -> int:
        return math.ceil(len(self.epoch(e)) / self.accum)

    def next_step(self, pos: Position) -> tuple[list[MicroBatch], Position, bool]:
        """Micro-batches of the step at `pos`, the position after it, and whether it ends an epoch."""
        mbs = self.epoch(pos.epoch)
        take = mbs[pos.index : pos.index + self.accum]
        end = pos.index + len(take)
        if end >= len(mbs):
            return take, Position(pos.epoch + 1, 0), True
        return take, Position(pos.epoch, end), False

    def epoch_progress(self, pos: Position) -> float:
        """Fractional epoch count at `pos` (for logs)."""
        n = len(self.epoch(pos.epoch)) if pos.index else 1
        return pos.epoch + pos.index / n

    def steps_done_in_epoch(self, after: Position, epoch_end: bool, epoch: int) -> int:
        """Optimizer steps of `epoch` completed once the data position is `after`."""
        return self.steps_in_epoch(epoch) if epoch_end else math.ceil(after.index / self.accum)

    def cadence(self, every: int | float | None, per_epoch: int | None) -> Cadence | None:
        """When to evaluate/save: every N steps (`*_steps`; a value < 1 is a fraction of the total steps),
        or at N evenly spaced points of each epoch (`*s_per_epoch`), the last one at the epoch's end."""
        if every:
            return Cadence(every=max(1, math.ceil(every * self.total_steps)) if every < 1 else int(every))
        if per_epoch:
            return Cadence(per_epoch=per_epoch)
        return None


@dataclass
class Cadence:
    every: int | None = None
    per_epoch: int | None = None

    def due(self, step: int, epoch_step: int, steps_in_epoch: int) -> bool:
        if self.every:
            return step % self.every == 0
        points = {max(1, round(steps_in_epoch * k / self.per_epoch)) for k in range(1, self.per_epoch + 1)}
        return epoch_step in points


DEFAULT_EVERY = 500  # transformers' default save_steps/eval_steps when only the strategy is given


def eval_cadence(plan: StepPlan, cfg: Config) -> Cadence:
    """When to evaluate (given evaluation data): eval_steps / evals_per_epoch, else every DEFAULT_EVERY steps
    with `eval_strategy: steps`, else at the end of every epoch."""
    chosen = plan.cadence(cfg.eval_steps, cfg.evals_per_epoch)
    if chosen is None and cfg.eval_strategy == "steps":
        return Cadence(every=DEFAULT_EVERY)
    return chosen or Cadence(per_epoch=1)


def save_cadence(plan: StepPlan, cfg: Config) -> Cadence | None:
    """When to save: save_steps / saves_per_epoch, else every epoch with `save_strategy: epoch`, else every
    DEFAULT_EVERY steps; None with `save_strategy: no` or `best` (best: engine/best.py saves at evaluations)."""
    if cfg.save_strategy in ("no", "best"):
        return None
    chosen = plan.cadence(cfg.save_steps, cfg.saves_per_epoch)
    if chosen is None and cfg.save_strategy == "epoch":
        return Cadence(per_epoch=1)
    return chosen or Cadence(every=DEFAULT_EVERY)
