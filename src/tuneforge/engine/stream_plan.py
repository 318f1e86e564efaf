"""Step accounting for streamed training data (data/streaming.py): the step plan's interface over a stream.

A stream has no length known in advance, so the run is `max_steps` optimizer steps of
`gradient_accumulation_steps` micro-batches read from this process's stream, and the whole run counts as one
"epoch" for the `*_per_epoch` cadences. The data position is the stream's `state_dict()`, which the trainer
stores in every checkpoint (one per process) and gives back on resume (on another number of processes, the
stream restarts where the slowest process was: data/streaming.py); `Position.index` counts the micro-batches
trained and `Position.epoch` the passes over the data completed (for the logs).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tuneforge.config.schema import Config
from tuneforge.errors import TuneforgeError

from .plan import Cadence, MicroBatch, Position, StepPlan

if TYPE_CHECKING:
    from tuneforge.methods.base import StepShape

log = logging.getLogger("tuneforge")


class StreamPlan:
    def __init__(self, cfg: Config, stream, *, shape: StepShape | None = None):
        self.cfg, self.stream = cfg, stream
        self.micro_batch_size = shape.rows_per_micro_batch if shape else cfg.micro_batch_size
        self.accum = shape.micro_batches_per_step if shape else cfg.grad_accum
        self.total_steps = cfg.max_steps

    def next_step(self, pos: Position) -> tuple[list[MicroBatch], Position, bool]:
        """The next step's micro-batches read from the stream (`pos` is where the stream already is)."""
        mbs = [self.stream.micro_batch(self.micro_batch_size) for _ in range(self.accum)]
        return mbs, Position(self.stream.passes, pos.index + len(mbs)), False

    def steps_in_epoch(self, e: int) -> int:
        return self.total_steps

    def steps_done_in_epoch(self, after: Position, epoch_end: bool, epoch: int) -> int:
        return after.index // self.accum

    def epoch_progress(self, pos: Position) -> float:
        return float(pos.epoch)

    def cadence(self, every: int | float | None, per_epoch: int | None) -> Cadence | None:
        return StepPlan.cadence(self, every, per_epoch)  # it only reads total_steps

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, saved: list[dict] | None, path) -> None:
        """This process's stream position from the positions a checkpoint holds (one per process)."""
        if not saved:
            raise TuneforgeError(f"{path} holds no stream position (it was not saved by a streamed run): resume it "
                                 "with the data settings it was trained with.")
        if len(saved) == self.stream.world:
            self.stream.load_state_dict(saved[self.stream.rank])
            return
        if any("restart" not in s for s in saved):
            raise TuneforgeError(f"{path} was saved by {len(saved)} process(es) by a tuneforge version that did not "
                                 f"record where to restart the stream: resume it on {len(saved)} process(es), not "
                                 f"{self.stream.world}.")
        passes, entry, row = self.stream.restart(saved)
        log.warning("%s was saved by %d process(es), this run has %d: the stream restarts at source row %d of "
                    "entry %d (pass %d), the earliest row one of them had not finished; rows after it that the "
                    "others had trained are trained again (docs/dataset-formats.md).", path, len(saved),
                    self.stream.world, row, entry, passes)


class StreamRows:
    """The row source of streamed micro-batches, which already hold their documents (not dataset indices).

    `lengths[doc]` is the document's token count, so the code that sums `lengths[i] for row in mb for i in row`
    for indexed rows (device batches, out-of-memory reports) works unchanged on streamed ones."""

    class _Lengths:
        def __getitem__(self, doc: dict) -> int:
            return len(doc["input_ids"])

        def __len__(self) -> int:
            return 0  # unknown in advance (the plan signature's row count)

    def __init__(self):
        self.lengths = self._Lengths()

    def rows(self, mb: MicroBatch) -> list[list[dict]]:
        return mb
