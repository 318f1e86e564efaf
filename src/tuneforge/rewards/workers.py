"""Reward functions in worker processes: bounded by `trl.reward_timeout`, and a worker that dies is reported
at once as dead (concurrent.futures marks the pool broken the moment a worker exits) instead of waiting.

Workers ignore SIGINT: a Ctrl-C to the process group reaches the trainer, which finishes the step (the
rewards included) and saves, instead of killing a worker in the middle of a call.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import signal
from collections.abc import Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from .calling import RewardError, failure_error, worker_call


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _rows_note(rows: Sequence[int] | None) -> str:
    return f" (dataset rows {sorted(set(rows))})" if rows is not None else ""


class WorkerPool:
    def __init__(self, num_workers: int, timeout: float | None):
        self.num_workers = num_workers
        self.timeout = timeout
        self._pool: cf.ProcessPoolExecutor | None = None

    def _executor(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(self.num_workers, mp_context=mp.get_context("spawn"),
                                                initializer=_ignore_sigint)
        return self._pool

    def call(self, name: str, spec: str, search: list[str], kwargs: dict[str, Any], n: int,
             rows: Sequence[int] | None) -> list:
        """The function's values for all `n` completions, the rows split between the workers."""
        bounds = [(n * w // self.num_workers, n * (w + 1) // self.num_workers) for w in range(self.num_workers)]
        bounds = [(a, b) for a, b in bounds if b > a]
        parts = [{k: (v[a:b] if isinstance(v, list) and len(v) == n else v) for k, v in kwargs.items()}
                 for a, b in bounds]
        pool = self._executor()
        jobs = [pool.submit(worker_call, spec, search, part, b - a) for part, (a, b) in zip(parts, bounds, strict=True)]
        values: list = []
        for job, part, (a, b) in zip(jobs, parts, bounds, strict=True):
            try:
                status, result = job.result(timeout=self.timeout)
            except cf.TimeoutError:
                self.close()
                raise RewardError(f"reward function `{name}` did not finish within trl.reward_timeout "
                                  f"({self.timeout} s) on completions {a}..{b - 1}.") from None
            except BrokenProcessPool:
                self.close()
                raise RewardError(
                    f"reward function `{name}`: a worker process died while running it on completions 0..{n - 1}"
                    f"{_rows_note(rows)} (a signal such as an out-of-memory kill, or a crash in native code).") from None
            if status == "error":
                found, what = result
                raise failure_error(name, found, what, part, b - a, rows[a:b] if rows is not None else None, a)
            values.append((a, b, result))
        return values

    def close(self) -> None:
        """Stop the workers now, a hung one included (shutdown alone would wait for it)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            if proc.is_alive():
                proc.kill()
        pool.shutdown(wait=True, cancel_futures=True)
