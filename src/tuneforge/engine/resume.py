"""Which checkpoint a run resumes from, and whether the data plan it was saved with still holds.

The data position in a checkpoint (epoch, next micro-batch) only points at the same rows when the plan is
rebuilt from the same settings; `plan_signature` lists them, and a resume that changes any is warned about.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tuneforge import outputs_guard
from tuneforge.config.schema import Config
from tuneforge.errors import TuneforgeError

log = logging.getLogger("tuneforge")


def resume_path(cfg: Config, output_dir: Path) -> Path | None:
    """resume_from_checkpoint, else the latest checkpoint with auto_resume_from_checkpoints, else None."""
    if cfg.resume_from_checkpoint:
        path = Path(cfg.resolve_path(cfg.resume_from_checkpoint) or cfg.resume_from_checkpoint)
        if not path.is_dir():
            raise TuneforgeError(f"resume_from_checkpoint: {cfg.resume_from_checkpoint} does not exist.")
        return path
    if cfg.auto_resume_from_checkpoints:
        return outputs_guard.newest_intact_checkpoint(output_dir)  # a damaged newest one is skipped, named
    return None


def plan_signature(cfg: Config, rows: int, world_size: int) -> dict:
    """The settings the step plan is built from (saved with every checkpoint)."""
    return {"rows": rows, "seed": cfg.seed, "micro_batch_size": cfg.micro_batch_size,
            "grad_accum": cfg.grad_accum, "sample_packing": cfg.sample_packing, "sequence_len": cfg.sequence_len,
            "group_by_length": cfg.group_by_length, "curriculum_sampling": cfg.curriculum_sampling,
            "batch_flattening": cfg.batch_flattening, "world_size": world_size}


def warn_if_plan_changed(saved: dict, now: dict) -> None:
    changed = {k: (v, saved.get(k)) for k, v in now.items() if saved.get(k) != v}
    if saved.get("grad_accum", 0) * saved.get("world_size", 0) == now["grad_accum"] * now["world_size"]:
        changed.pop("grad_accum", None)  # another process count, the same micro-batches per step
        changed.pop("world_size", None)
    if changed:
        log.warning("resuming with different data settings %s (now, then): the data order after resume will "
                    "not match the original run", changed)


def check_steps_left(path: Path, step: int, total_steps: int) -> None:
    if step >= total_steps:
        raise TuneforgeError(
            f"{path} is at step {step}, and this config trains {total_steps} steps in all: "
            "nothing left to train. Raise num_epochs or max_steps to continue training from it.")


def index_for_world(saved: dict, world: int) -> int:
    """The data position's micro-batch index for `world` processes. Each process trains every world-th
    micro-batch of an epoch's plan, so a checkpoint of `then` processes at index i has consumed the plan's
    first i * then micro-batches; with another count, the run continues after exactly those."""
    then, index = int(saved.get("world_size", world)), int(saved.get("index", 0))
    if then == world:
        return index
    consumed = index * then
    if consumed % world:
        raise TuneforgeError(
            f"the checkpoint was written by {then} processes after {consumed} micro-batches of its epoch, which {world} "
            f"processes cannot split evenly; resume on a process count that divides {consumed}.")
    log.info("resuming a %d-process checkpoint on %d processes: the same data position (%d micro-batches of the "
             "epoch done); keep micro_batch_size x gradient_accumulation_steps x processes as before for the same "
             "updates", then, world, consumed)
    return consumed // world
