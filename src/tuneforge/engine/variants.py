"""Training variants that act between optimizer steps: LISA's layer draws (lisa.py) and ReLoRA's restarts
(relora.py). The trainer calls `before_step` / `after_step` around every optimizer step and `save` / `load`
with its checkpoints; with neither variant configured these do nothing."""

from __future__ import annotations

from pathlib import Path

from tuneforge.config.schema import Config

from . import lisa, relora


class StepVariants:
    def __init__(self, cfg: Config, model, optimizer):
        self.lisa = self.relora = None
        if cfg.lisa_n_layers:
            self.lisa = lisa.LayerSampler(model, n_layers=cfg.lisa_n_layers, every=cfg.lisa_step_interval,
                                          attribute=cfg.lisa_layers_attribute, seed=cfg.seed)
        if cfg.relora_every():
            self.relora = relora.Restarts(model, optimizer, every=cfg.relora_every(), ratio=cfg.relora_ratio(),
                                          method=cfg.relora_prune_method, seed=cfg.seed)

    def before_step(self, step: int) -> None:
        """Before optimizer step `step + 1` (`step` steps are done)."""
        if self.lisa is not None:
            self.lisa.before_step(step)

    def after_step(self, step: int) -> None:
        """After optimizer step `step` (its update and the schedule's step are done)."""
        if self.relora is not None:
            self.relora.after_step(step)

    def save(self, folder: Path, step: int) -> None:
        if self.relora is not None:
            self.relora.save(folder, step)

    def load(self, folder: Path) -> None:
        if self.relora is not None:
            self.relora.load(folder)


def with_jagged_schedule(cfg: Config, scheduler):
    """The learning-rate schedule with jagged restarts when jagged_restart_steps (or ReLoRA's interval) is set."""
    every = cfg.jagged_restart_steps or cfg.relora_every()
    if not every:
        return scheduler
    return relora.jagged(scheduler, every, cfg.jagged_restart_warmup_steps, cfg.jagged_restart_anneal_steps)
