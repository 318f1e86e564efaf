"""Reward functions named in YAML (`trl.reward_funcs: [module.fn, ...]`) and how they are called.

Calling convention (TRL's): `fn(prompts=..., completions=..., completion_ids=..., **columns)` returns one
float (or None = "not applicable") per completion. `columns` are the extra dataset columns of each
completion's prompt row (repeated for the group), e.g. `answer`. A function without `**kwargs` receives
only the keywords it names. `async def` functions run concurrently. A function that raises, returns the
wrong number of values or a non-number stops the run with a message naming the function and the
dataset row. With `trl.reward_num_workers: N` the functions run in N worker processes (rows split
between them), each call bounded by `trl.reward_timeout` seconds, for checkers that use signals or
may hang (math verifiers).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from collections.abc import Sequence
from typing import Any

import torch

from tuneforge.rewards.calling import (
    RewardError,
    RewardFn,
    call_one,
    locate_failure,
    resolve,
    to_floats,
    worker_call,
)

__all__ = ["RewardError", "RewardFn", "RewardSet", "resolve"]


class RewardSet:
    """The configured reward functions with their weights; `compute` returns the [N, K] reward matrix."""

    def __init__(self, funcs: list[tuple[str, RewardFn]], weights: Sequence[float] | None = None, *,
                 num_workers: int = 0, timeout: float | None = None, specs: list[str] | None = None,
                 search: list[str] | None = None):
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
        self.num_workers = num_workers
        self.timeout = timeout
        self.specs = specs  # importable names: what worker processes load
        self.search = search or []
        self._pool = None

    @classmethod
    def from_config(cls, cfg) -> RewardSet:
        trl = cfg.trl
        specs = list(trl.reward_funcs or []) if trl else []
        search = [str(cfg.source_dir)] if getattr(cfg, "source_dir", None) else []
        funcs = [(s, resolve(s, search)) for s in specs]
        return cls(funcs, trl.reward_weights if trl else None, num_workers=(trl.reward_num_workers or 0) if trl else 0,
                   timeout=getattr(trl, "reward_timeout", None), specs=specs, search=search)

    def compute(self, prompts: list, completions: list, completion_ids: list[list[int]], columns: dict[str, list],
                rows: Sequence[int] | None = None, extra: dict[str, Any] | None = None) -> torch.Tensor:
        n = len(completions)
        kwargs = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns,
                  **(extra or {})}
        if self.num_workers and self.specs:
            return self._compute_in_workers(kwargs, n, rows)
        out = torch.empty(n, len(self.funcs), dtype=torch.float64)
        for k, (name, fn) in enumerate(zip(self.names, self.funcs, strict=True)):
            try:
                values = call_one(name, fn, kwargs)
            except RewardError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise locate_failure(name, fn, kwargs, n, rows, exc) from None
            out[:, k] = torch.tensor(to_floats(name, values, n, rows), dtype=torch.float64)
        return out

    # ---------------------------------------------------------------- worker processes
    def _compute_in_workers(self, kwargs: dict[str, Any], n: int, rows) -> torch.Tensor:
        if self._pool is None:
            self._pool = mp.get_context("spawn").Pool(self.num_workers)
        bounds = [(n * w // self.num_workers, n * (w + 1) // self.num_workers) for w in range(self.num_workers)]
        bounds = [(a, b) for a, b in bounds if b > a]
        out = torch.empty(n, len(self.funcs), dtype=torch.float64)
        picklable = {k: v for k, v in kwargs.items() if not callable(v)}
        for k, (name, spec) in enumerate(zip(self.names, self.specs, strict=True)):
            jobs = []
            for a, b in bounds:
                part = {key: (v[a:b] if isinstance(v, list) and len(v) == n else v) for key, v in picklable.items()}
                jobs.append(self._pool.apply_async(worker_call, (spec, self.search, part)))
            values: list = []
            for job, (a, b) in zip(jobs, bounds, strict=True):
                try:
                    status, result = job.get(timeout=self.timeout)
                except mp.TimeoutError:
                    self.close()
                    raise RewardError(f"reward function `{name}` did not finish within trl.reward_timeout "
                                      f"({self.timeout} s) on completions {a}..{b - 1}.") from None
                if status == "error":
                    part = {key: (v[a:b] if isinstance(v, list) and len(v) == n else v) for key, v in picklable.items()}
                    sub_rows = rows[a:b] if rows is not None else None
                    raise locate_failure(name, resolve(spec, self.search), part, b - a, sub_rows,
                                          RuntimeError(result)) from None
                values.extend(to_floats(name, result, b - a, rows[a:b] if rows is not None else None))
            out[:, k] = torch.tensor(values, dtype=torch.float64)
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __del__(self):
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()
