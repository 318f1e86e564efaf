"""Learning-rate schedules as closed-form multipliers of `learning_rate`.

The formulas are those of transformers' schedulers (tests check parity with `transformers.get_scheduler`),
so curves match what Axolotl/HF users see: a linear warmup from 0 over `warmup_steps`, then the decay.
Step `s` (0-based) trains with multiplier f(s); the scheduler advances once per optimizer step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial

import torch

from tuneforge.config.schema import Config
from tuneforge.errors import TuneforgeError

log = logging.getLogger("tuneforge")


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


def cosine_constant(step: int, warmup: int, total: int, min_ratio: float, constant_ratio: float,
                    num_cycles: float = 0.5) -> float:
    """Cosine from 1 after warmup down to `min_ratio`, reached at step C = int(constant_ratio * total) (a share of
    all steps, warmup included, as Axolotl counts it), then constant. C <= warmup: the floor right after warmup."""
    if step < warmup:
        return _warm(step, warmup)
    floor_at = int(constant_ratio * total)
    if floor_at <= warmup or step >= floor_at:
        return min_ratio
    return cosine(step, warmup, floor_at, min_ratio, num_cycles)


def cosine_with_restarts(step: int, warmup: int, total: int, num_cycles: float = 1.0) -> float:
    if step < warmup:
        return _warm(step, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))


def polynomial(step: int, warmup: int, total: int, end_ratio: float = 0.0, power: float = 1.0) -> float:
    """Decay from 1 to `end_ratio` (lr_end / learning_rate) as (1 - progress)^power."""
    if step < warmup:
        return _warm(step, warmup)
    if step > total:
        return end_ratio
    remaining = 1 - (step - warmup) / max(1, total - warmup)
    return (1 - end_ratio) * remaining**power + end_ratio


def inverse_sqrt(step: int, warmup: int, total: int, timescale: int | None = None) -> float:
    if step < warmup:
        return _warm(step, warmup)
    timescale = timescale or warmup or 10_000
    return 1.0 / math.sqrt((step + timescale - warmup) / timescale)


def rex(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """REX (Chen et al., 2021, "REX: Revisiting Budgeted Training with an Improved Schedule"): with z the share
    of the decay still ahead, the factor z / (0.1 + 0.9 z) (the constants of Axolotl's `rex`) stays high for
    longer than linear decay and drops to `min_ratio` at the end."""
    if step < warmup:
        return _warm(step, warmup)
    z = min(1.0, max(0.0, (total - step) / max(1, total - warmup)))
    return min_ratio + (1.0 - min_ratio) * z / (0.1 + 0.9 * z)


def warmup_stable_decay(step: int, warmup: int, total: int, stable: int, decay: int, decay_type: str = "cosine",
                        min_ratio: float = 0.0, num_cycles: float = 0.5, warmup_type: str = "linear") -> float:
    """Warmup, a constant phase, then a decay to `min_ratio` (Hu et al., 2024, MiniCPM), as transformers'
    get_wsd_schedule: the warmup also starts from min_ratio."""
    if step < warmup:
        progress = step / max(1, warmup)
        factor = {"linear": progress, "cosine": 0.5 * (1.0 - math.cos(math.pi * progress)),
                  "1-sqrt": 1.0 - math.sqrt(1.0 - progress)}[warmup_type]
        return max(0.0, factor * (1.0 - min_ratio) + min_ratio)
    if step < warmup + stable:
        return 1.0
    if step < warmup + stable + decay:
        progress = (step - warmup - stable) / max(1, decay)
        factor = {"linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress)),
                  "1-sqrt": 1.0 - math.sqrt(progress)}[decay_type]
        return max(0.0, factor * (1.0 - min_ratio) + min_ratio)
    return min_ratio


# lr_scheduler_kwargs each schedule reads (the names of transformers' scheduler arguments).
_OPTIONS = {
    "cosine": {"num_cycles", "min_lr", "min_lr_rate"},
    "cosine_with_min_lr": {"num_cycles", "min_lr", "min_lr_rate"},
    "linear": set(), "constant": set(), "constant_with_warmup": set(),
    "cosine_with_restarts": {"num_cycles"},
    "polynomial": {"lr_end", "power"},
    "inverse_sqrt": {"timescale"},
    "rex": {"min_lr", "min_lr_rate"},
    "warmup_stable_decay": {"num_decay_steps", "num_stable_steps", "decay_type", "warmup_type", "min_lr_ratio",
                            "num_cycles"},
}
_WSD_TYPES = ("linear", "cosine", "1-sqrt")


def _min_ratio(cfg: Config, kwargs: dict) -> float | None:
    if "min_lr_rate" in kwargs:
        return kwargs.pop("min_lr_rate")
    if "min_lr" in kwargs:
        return kwargs.pop("min_lr") / cfg.learning_rate
    return cfg.cosine_min_lr_ratio


def _wsd(cfg: Config, kwargs: dict, warmup: int, total: int) -> Callable[[int, int, int], float]:
    decay = kwargs.pop("num_decay_steps", None)
    if decay is None:  # transformers requires it; the last 10% is the usual choice
        decay = max(1, math.ceil(0.1 * (total - warmup)))
    stable = kwargs.pop("num_stable_steps", None)
    if stable is None:
        stable = max(0, total - warmup - decay)
    types = {k: kwargs.pop(k, "cosine" if k == "decay_type" else "linear") for k in ("decay_type", "warmup_type")}
    for key, value in types.items():
        if value not in _WSD_TYPES:
            raise TuneforgeError(f"lr_scheduler_kwargs.{key}: `{value}` is not one of {', '.join(_WSD_TYPES)}.")
    min_ratio = kwargs.pop("min_lr_ratio", cfg.cosine_min_lr_ratio or 0.0)
    return partial(warmup_stable_decay, stable=stable, decay=decay, min_ratio=min_ratio,
                   num_cycles=kwargs.pop("num_cycles", 0.5), **types)


def multiplier_fn(cfg: Config, total_steps: int) -> Callable[[int], float]:
    """f(step) for the configured schedule."""
    warmup = warmup_steps(cfg, total_steps)
    kwargs = dict(cfg.lr_scheduler_kwargs or {})
    name = cfg.lr_scheduler
    unknown = sorted(set(kwargs) - _OPTIONS.get(name, set()))
    if unknown:
        known = ", ".join(sorted(_OPTIONS.get(name, ()))) or "none"
        raise TuneforgeError(f"lr_scheduler_kwargs: unknown option(s) {unknown} for `{name}` (known: {known}).")
    if name in ("cosine", "cosine_with_min_lr"):
        min_ratio = _min_ratio(cfg, kwargs)
        if name == "cosine_with_min_lr" and min_ratio is None:
            raise TuneforgeError("lr_scheduler: cosine_with_min_lr needs `cosine_min_lr_ratio` (e.g. 0.1).")
        shape = {"min_ratio": min_ratio or 0.0, "num_cycles": kwargs.pop("num_cycles", 0.5)}
        fn = partial(cosine, **shape)
        if cfg.cosine_constant_lr_ratio:  # 0 means no constant phase, as in Axolotl
            fn = partial(cosine_constant, constant_ratio=cfg.cosine_constant_lr_ratio, **shape)
    elif name == "linear":
        fn = linear
    elif name in ("constant", "constant_with_warmup"):
        # transformers' `constant` has no warmup; warmup keys turn it into constant_with_warmup, as in Axolotl.
        fn = constant
    elif name == "cosine_with_restarts":
        fn = partial(cosine_with_restarts, num_cycles=kwargs.pop("num_cycles", 1.0))
    elif name == "polynomial":
        fn = partial(polynomial, end_ratio=kwargs.pop("lr_end", 1e-7) / cfg.learning_rate,
                     power=kwargs.pop("power", 1.0))
    elif name == "inverse_sqrt":
        fn = partial(inverse_sqrt, timescale=kwargs.pop("timescale", None))
    elif name == "rex":
        fn = partial(rex, min_ratio=_min_ratio(cfg, kwargs) or 0.0)
    elif name == "warmup_stable_decay":
        fn = _wsd(cfg, kwargs, warmup, total_steps)
    else:  # the config schema only admits the names above
        raise TuneforgeError(f"unknown lr_scheduler `{name}`")
    return lambda step: fn(step, warmup, total_steps)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int):
    if getattr(optimizer, "tuneforge_schedule_free", False) and cfg.lr_scheduler not in (
            "constant", "constant_with_warmup"):
        # Schedule-free methods replace the decay (Defazio et al., 2024): only the warmup is kept.
        log.info("optimizer %s is schedule-free: lr_scheduler %s is replaced by a constant rate after warmup",
                 cfg.optimizer, cfg.lr_scheduler)
        warmup = warmup_steps(cfg, total_steps)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: constant(step, warmup, total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier_fn(cfg, total_steps))
