"""The best evaluation so far (`metric_for_best_model`), for early stopping, `load_best_model_at_end` and
`save_strategy: best`."""

from __future__ import annotations

import logging
from pathlib import Path

from tuneforge.config.schema import Config
from tuneforge.errors import TuneforgeError

log = logging.getLogger("tuneforge")


class BestEvaluation:
    """Follows one metric over the evaluations: its best value, where that was (step, checkpoint), and how
    many evaluations since then failed to improve it by more than `threshold`."""

    def __init__(self, cfg: Config):
        name = cfg.metric_for_best_model
        self.metric = name if name.startswith("eval_") else f"eval_{name}"
        lower = self.metric.endswith(("loss", "perplexity")) or self.metric == "eval_ter"  # an error rate
        self.greater = (not lower) if cfg.greater_is_better is None else cfg.greater_is_better
        self.patience = cfg.early_stopping_patience
        self.threshold = cfg.early_stopping_threshold
        self.value: float | None = None
        self.record: dict | None = None  # the best evaluation's record
        self.checkpoint: str | None = None  # a checkpoint saved at that evaluation, if any
        self.since = 0  # evaluations since the best
        # a checkpoint at every new best: for load_best_model_at_end, or as the only checkpoints
        # (`save_strategy: best`, as in transformers' Trainer)
        self.saves = cfg.load_best_model_at_end or cfg.save_strategy == "best"
        # only a run that asks for early stopping or a checkpoint at the best must have the metric
        self.required = self.patience is not None or self.saves

    def update(self, record: dict) -> bool:
        """Take an evaluation record; True when it is the new best."""
        if self.metric not in record:
            if not self.required:
                return False
            found = ", ".join(k for k in record if k.startswith("eval_"))
            raise TuneforgeError(f"metric_for_best_model: {self.metric} is not among this run's evaluation metrics "
                                 f"({found}); set it to one of them.")
        value = float(record[self.metric])
        if self.value is None:
            better = True
        else:
            gain = value - self.value if self.greater else self.value - value
            better = gain > self.threshold
        if better:
            self.value, self.record, self.checkpoint, self.since = value, dict(record), None, 0
            return True
        self.since += 1
        return False

    @property
    def patience_ran_out(self) -> bool:
        return self.patience is not None and self.since >= self.patience

    def stop_message(self) -> str:
        return (f"early stopping: {self.metric} has not improved for {self.since} evaluations "
                f"(early_stopping_patience {self.patience}); best {self.value:.4g} at step {self.record['step']}")

    def state_dict(self) -> dict:
        return {"value": self.value, "record": self.record, "checkpoint": self.checkpoint, "since": self.since}

    def load_state_dict(self, state: dict) -> None:
        for key in ("value", "record", "checkpoint", "since"):
            if key in state:
                setattr(self, key, state[key])

    def checkpoint_path(self) -> Path | None:
        return Path(self.checkpoint) if self.checkpoint and Path(self.checkpoint).is_dir() else None
