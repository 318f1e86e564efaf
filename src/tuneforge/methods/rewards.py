"""Reward functions named in YAML (`trl.reward_funcs: [module.fn, ...]`) and how they are called.

Calling convention (TRL's): `fn(prompts=..., completions=..., completion_ids=..., **columns)` returns one
float (or None = "not applicable") per completion. `columns` are the extra dataset columns of each
completion's prompt row (repeated for the group), e.g. `answer`. A function without `**kwargs` receives
only the keywords it names. `async def` functions run concurrently. A function that raises, returns the
wrong number of values or a non-number stops the run with a message naming the function and the
dataset row; so does one that calls sys.exit / os._exit or raises KeyboardInterrupt (the trainer then
saves the last completed step). Values must be finite numbers within +-1e15 or None: a NaN, an infinity
or a larger value stops the run (`trl.reward_nan_policy: error`, the default) or counts as None (`skip`,
logged). With `trl.reward_num_workers: N` the functions run in N worker processes (rows split between
them); `trl.reward_timeout` bounds each call (with no workers set, one worker process runs them), and a
worker that dies is reported at once.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Sequence
from typing import Any

import torch

from tuneforge.rewards.calling import RewardError, RewardFn, call_one, locate_failure, resolve, to_floats
from tuneforge.rewards.workers import WorkerPool
from tuneforge.user_code import module_file

log = logging.getLogger("tuneforge")

# `validate` runs none of the user's code: reward modules are located as files, not imported (training imports).
_IMPORT = contextvars.ContextVar("import_reward_modules", default=True)


@contextlib.contextmanager
def without_importing():
    token = _IMPORT.set(False)
    try:
        yield
    finally:
        _IMPORT.reset(token)


def _located(spec: str, search: list[str]) -> None:
    """What validate checks: `module.function` names a module file that exists."""
    module_name = spec.rpartition(".")[0]
    if not module_name:
        raise RewardError(f"trl.reward_funcs: `{spec}` is not `module.function`; e.g. `rewards.accuracy`.")
    if module_file(module_name, search) is None:
        raise RewardError(f"trl.reward_funcs: module `{module_name}` for `{spec}` was not found. Put it next to the "
                          "config file or where you run tuneforge, or on PYTHONPATH.")

__all__ = ["RewardError", "RewardFn", "RewardSet", "resolve"]


def _not_imported(**kwargs):
    raise RewardError("reward functions are not imported by `validate`; `train` imports them.")


class RewardSet:
    """The configured reward functions with their weights; `compute` returns the [N, K] reward matrix."""

    def __init__(self, funcs: list[tuple[str, RewardFn]], weights: Sequence[float] | None = None, *,
                 num_workers: int = 0, timeout: float | None = None, specs: list[str] | None = None,
                 search: list[str] | None = None, nan_policy: str = "error"):
        if not funcs:
            raise RewardError("GRPO needs at least one reward function: set `trl.reward_funcs: [module.function]`.")
        self.names = [n for n, _ in funcs]
        # Metric names: the function name (TRL's `rewards/<name>/mean`), the full path when two clash.
        short = [n.rpartition(".")[2] for n in self.names]
        self.short_names = [s if short.count(s) == 1 else n for s, n in zip(short, self.names, strict=True)]
        self.funcs = [f for _, f in funcs]
        weights = list(weights) if weights is not None else [1.0] * len(funcs)
        if len(weights) != len(funcs):
            raise RewardError(f"trl.reward_weights has {len(weights)} values for {len(funcs)} reward functions.")
        self.weights = torch.tensor(weights, dtype=torch.float32)
        # A timeout needs a process to abandon: without workers, one worker runs the functions.
        self.num_workers = max(num_workers, 1) if timeout and specs else num_workers
        self.timeout = timeout
        self.nan_policy = nan_policy
        self.specs = specs  # importable names: what worker processes load
        self.search = search or []
        self._pool = None

    @classmethod
    def from_config(cls, cfg) -> RewardSet:
        trl = cfg.trl
        specs = list(trl.reward_funcs or []) if trl else []
        search = [str(cfg.source_dir)] if getattr(cfg, "source_dir", None) else []
        if not _IMPORT.get():
            for s in specs:
                _located(s, search)
            funcs = [(s, _not_imported) for s in specs]
        else:
            funcs = [(s, resolve(s, search)) for s in specs]
        return cls(funcs, trl.reward_weights if trl else None, num_workers=(trl.reward_num_workers or 0) if trl else 0,
                   timeout=getattr(trl, "reward_timeout", None), specs=specs, search=search,
                   nan_policy=(getattr(trl, "reward_nan_policy", None) or "error") if trl else "error")

    def compute(self, prompts: list, completions: list, completion_ids: list[list[int]], columns: dict[str, list],
                rows: Sequence[int] | None = None, extra: dict[str, Any] | None = None) -> torch.Tensor:
        n = len(completions)
        kwargs = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns,
                  **(extra or {})}
        pooled = bool(self.num_workers and self.specs)
        picklable = {k: v for k, v in kwargs.items() if not callable(v)}
        out = torch.empty(n, len(self.funcs), dtype=torch.float64)
        skipped: list[str] = []
        for k, (name, fn) in enumerate(zip(self.names, self.funcs, strict=True)):
            if pooled:
                if self._pool is None:
                    self._pool = WorkerPool(self.num_workers, self.timeout)
                values: list[float] = []
                for a, b, part in self._pool.call(name, self.specs[k], self.search, picklable, n, rows):
                    values += to_floats(name, part, b - a, rows[a:b] if rows is not None else None, self.nan_policy,
                                        skipped)
            else:
                try:
                    result = call_one(name, fn, kwargs)
                except Exception as exc:  # noqa: BLE001 - the user's code may raise anything
                    raise locate_failure(name, fn, kwargs, n, rows, exc) from None
                values = to_floats(name, result, n, rows, self.nan_policy, skipped)
            out[:, k] = torch.tensor(values, dtype=torch.float64)
        if skipped:
            log.warning("trl.reward_nan_policy skip: %d reward value(s) treated as None, e.g. %s", len(skipped),
                        skipped[0])
        if n and bool(torch.isnan(out).all()):
            log.warning("no reward function gave a value for any of the %d completions of this step: the step "
                        "learns nothing from them", n)
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __del__(self):
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()
