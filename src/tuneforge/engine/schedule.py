"""Learning-rate schedules as closed-form multipliers of `learning_rate`.

The formulas are those of transformers' schedulers (tests check parity with `transformers.get_scheduler`),
so curves match what Axolotl/HF users see: a linear warmup from 0 over `warmup_steps`, then the decay.
Step `s` (0-based) trains with multiplier f(s); the scheduler advances once per optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch

from tuneforge.config.schema import Config
from tuneforge.errors import TuneforgeError


def warmup_steps(cfg: Config, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    if cfg.warmup_ratio:
        return math.ceil(cfg.warmup_ratio * total_steps)
    return 0


def _warm(step: int, warmup: int) -> float:
    return step / max(1, warmup)


def constant(step: int, warmup: int, total: int) -> float:
    return 1.0 if step >= warmup else _warm(step, warmup)


def linear(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return _warm(step, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0, num_cycles: float = 0.5) -> float:
    if step < warmup:
        return _warm(step, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    factor = max(0.0, 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress)))
    return factor * (1.0 - min_ratio) + min_ratio


def multiplier_fn(cfg: Config, total_steps: int) -> Callable[[int], float]:
    """f(step) for the configured schedule."""
    warmup = warmup_steps(cfg, total_steps)
    kwargs = dict(cfg.lr_scheduler_kwargs or {})
    name = cfg.lr_scheduler
    min_ratio = cfg.cosine_min_lr_ratio
    if "min_lr_rate" in kwargs:
        min_ratio = kwargs.pop("min_lr_rate")
    if "min_lr" in kwargs:
        min_ratio = kwargs.pop("min_lr") / cfg.learning_rate
    num_cycles = kwargs.pop("num_cycles", 0.5)
    if kwargs:
        raise TuneforgeError(f"lr_scheduler_kwargs: unknown option(s) {sorted(kwargs)} for `{name}` "
                             "(known: num_cycles, min_lr, min_lr_rate).")
    if name in ("cosine", "cosine_with_min_lr"):
        if name == "cosine_with_min_lr" and min_ratio is None:
            raise TuneforgeError("lr_scheduler: cosine_with_min_lr needs `cosine_min_lr_ratio` (e.g. 0.1).")
        fn = partial(cosine, min_ratio=min_ratio or 0.0, num_cycles=num_cycles)
    elif name == "linear":
        fn = linear
    elif name == "constant":
        # transformers' `constant` has no warmup; warmup keys turn it into constant_with_warmup, as in Axolotl.
        fn = constant
    elif name == "constant_with_warmup":
        fn = constant
    else:  # the config schema only admits the names above
        raise TuneforgeError(f"unknown lr_scheduler `{name}`")
    return lambda step: fn(step, warmup, total_steps)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier_fn(cfg, total_steps))
