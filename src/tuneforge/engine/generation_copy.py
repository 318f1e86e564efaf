"""The whole model that online methods and generation during evaluation generate with where training shards
the weights (FSDP2, DeepSpeed ZeRO-3): a plain copy made before sharding, refreshed from the shards before
each generation by the trainer (`Trainer._generation_model`)."""

from __future__ import annotations

import copy

from tuneforge.config.schema import Config
from tuneforge.methods.base import Objective


def generates(objective: Objective) -> bool:
    """Whether the objective generates during a step (an online method overrides the rollout_step hook)."""
    return type(objective).rollout_step is not Objective.rollout_step


def whole_copy(cfg: Config, model, objective: Objective, device):
    """A plain copy of `model` on `device`. Where an online method's fp32 weights would generate from a
    half-precision snapshot of it (rollout/snapshot.py), the copy is made in that dtype instead: 2 bytes per
    parameter, not 4 + 2."""
    from tuneforge.rollout.factory import half_precision_dtype

    half = half_precision_dtype(cfg, model, device) if generates(objective) else None
    return copy.deepcopy(model).to(device=device, dtype=half)
