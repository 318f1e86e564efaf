"""The accelerate setup of a training run: devices, mixed precision, DDP settings and trackers."""

from __future__ import annotations

from pathlib import Path

import torch

from tuneforge.config.schema import Config

from . import trackers


def build_accelerator(cfg: Config, precision: str, trackers_: list[str], output_dir: Path):
    """The accelerate Accelerator of a run: its mixed precision, trackers, DDP settings and device."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and current != precision and hasattr(AcceleratorState, "_reset_state"):
        # accelerate keeps its state in a process-wide singleton that refuses a new precision; one process
        # may train several times (tests, notebooks), so start it afresh (accelerate's own tests do this).
        AcceleratorState._reset_state(reset_partial_state=False)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.ddp_find_unused_parameters,
                                        **({"bucket_cap_mb": cfg.ddp_bucket_cap_mb} if cfg.ddp_bucket_cap_mb else {}))
    return Accelerator(mixed_precision=precision, log_with=trackers.log_with(cfg, trackers_, output_dir) or None,
                       project_dir=str(output_dir / "runs"), kwargs_handlers=[ddp],
                       cpu=not torch.cuda.is_available())  # several CPU processes: gloo data parallelism
