"""Stop a run whose loss is NaN/inf (always) or stays above `loss_watchdog_threshold` for
`loss_watchdog_patience` consecutive steps, with a diagnosis instead of a silently broken model.

The check runs *before* the optimizer step, so a non-finite loss never reaches the weights, and the
run stops without writing a checkpoint or final outputs from the diverged state.
"""

from __future__ import annotations

import math

from tuneforge.errors import TuneforgeError


class TrainingDiverged(TuneforgeError):
    """The loss exploded or stayed too high; nothing was saved from the broken state."""


class LossWatchdog:
    def __init__(self, threshold: float | None, patience: int, precision: str):
        self.threshold = threshold
        self.patience = patience
        self.precision = precision
        self.strikes = 0

    def check(self, loss: float, grad_norm: float | None, step: int, lr: float, last_checkpoint: str | None) -> None:
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm} (loss {loss:.4f})"
            raise TrainingDiverged(self._diagnosis(f"non-finite {what} at step {step}", lr, last_checkpoint))
        if self.threshold is None:
            return
        self.strikes = self.strikes + 1 if loss > self.threshold else 0
        if self.strikes >= self.patience:
            raise TrainingDiverged(self._diagnosis(
                f"loss {loss:.4f} stayed above loss_watchdog_threshold {self.threshold} for {self.strikes} "
                f"consecutive steps (step {step})", lr, last_checkpoint))

    def _diagnosis(self, what: str, lr: float, last_checkpoint: str | None) -> str:
        hints = [
            f"learning rate: {lr:.3g} at this step - lower learning_rate, add warmup_steps, or lower max_grad_norm",
            f"precision: {self.precision}" + (" - fp16 overflows easily; prefer bf16" if self.precision == "fp16"
                                              else " - check torch_dtype and the model's recommended dtype"),
            "data: inspect the rows with `tuneforge preprocess <config> --debug` (labels, lengths, template)",
        ]
        saved = (f"The last good checkpoint is {last_checkpoint}." if last_checkpoint
                 else "No checkpoint was written from this run.")
        return (f"training stopped: {what}. Nothing was saved from the diverged state. {saved}\n  - "
                + "\n  - ".join(hints))

    def state_dict(self) -> dict:
        return {"strikes": self.strikes}

    def load_state_dict(self, state: dict) -> None:
        self.strikes = int(state.get("strikes", 0))
