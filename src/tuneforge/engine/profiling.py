"""`profiler_steps`: record a window of training steps with torch.profiler.

Steps profiler_steps_start + 1 ... profiler_steps_start + profiler_steps (1-based) are recorded, each
marked `step N`. When the window closes (or the run ends inside it) every process writes, under
output_dir: `profiler_trace.json` (rank 0; `profiler_trace_rank<r>.json` for the others), a Chrome trace
for chrome://tracing or Perfetto, and `profiler_ops.txt`, the operators ranked by total time. On CUDA the
first process also writes `snapshot.pickle`, the allocator's history over the window (for PyTorch's
memory_viz).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

log = logging.getLogger("tuneforge")


class StepProfiler:
    def __init__(self, steps: int | None, start: int, out: Path, rank: int):
        self.first, self.last = start + 1, start + (steps or 0)
        self.out, self.rank = Path(out), rank
        self.profile = None

    def step(self, step: int):
        """A context for training step `step` (1-based): starts the profiler at the window's first step,
        marks the step, and writes the results after the window's last one."""
        if self.first <= step <= self.last:
            return self._recorded(step)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _recorded(self, step: int):
        if self.profile is None:
            self._start()
        with torch.profiler.record_function(f"step {step}"):
            yield
        if step == self.last:
            self.close()

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        cuda = torch.cuda.is_available()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self.profile = profile(activities=activities, record_shapes=True, profile_memory=True)
        self.profile.__enter__()
        if cuda and self.rank == 0:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        log.info("profiler: recording steps %d-%d", self.first, self.last)

    def close(self) -> None:
        """Stop and write the results (no-op when nothing is being recorded)."""
        if self.profile is None:
            return
        profile, self.profile = self.profile, None
        profile.__exit__(None, None, None)
        suffix = "" if self.rank == 0 else f"_rank{self.rank}"
        self.out.mkdir(parents=True, exist_ok=True)
        trace = self.out / f"profiler_trace{suffix}.json"
        profile.export_chrome_trace(str(trace))
        sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        table = profile.key_averages().table(sort_by=sort, row_limit=40)
        (self.out / f"profiler_ops{suffix}.txt").write_text(table + "\n")
        if torch.cuda.is_available() and self.rank == 0:
            torch.cuda.memory._dump_snapshot(str(self.out / "snapshot.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        log.info("profiler: wrote %s and the operator table", trace)
