"""Asynchronous generation: the next rollout is sampled while the current batch trains.

The training loop hands the objective one prompt batch per step and wants completions at once, so the
overlap is built with a lag (Axolotl's async GRPO works the same way):

    step k:  submit prompts b_k to the background thread (sampler weights synced to the policy now)
             train on the completions of b_{k-depth}, generated during the previous steps

The first `depth` steps have nothing in flight yet and generate their own batch synchronously (those
prompts are then seen twice, once on-policy and once from the queue; the last `depth` prompt batches of
the run are never trained on). Completions used at step k were sampled with weights up to `depth`
optimizer steps old: the objective recomputes pi_old with the current weights and corrects the gap
with the truncated importance weight pi_old / pi_sampler (see `methods/grpo/loss.py`, `importance_weights`).

The background sampler generates with a *snapshot* of the policy (a deep copy refreshed in place before
each submission), so the optimizer may update the live weights while generation runs. This costs one
extra copy of the weights; torch ops release the GIL, so the thread overlaps with training.

With a generation server (`trl.use_vllm`, `vllm_mode: server`) the server's weights are the snapshot:
`RemotePrefetcher` waits for the rollout in flight, pushes the current weights to the idle server, and
submits the next prompts, whose generation on the server overlaps with this step's training. One rollout
is in flight at a time (depth 1), since the server holds one copy of the weights.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .base import Sampler, SamplingParams
from .snapshot import WeightSnapshot


class _Queue:
    """Rollouts in flight on one background thread, with their tags; checkpointed finished."""

    def __init__(self, device: torch.device | None = None):
        self.submitted = 0
        self.queue: deque[tuple[Future, object]] = deque()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuneforge-rollout", initializer=_use_device,
                                       initargs=(device,))

    def _submit(self, sampler: Sampler, prompt_ids, n: int, params: SamplingParams, tag) -> None:
        self.queue.append((self.pool.submit(sampler.generate, prompt_ids, n, params), tag))
        self.submitted += 1

    def state_dict(self) -> dict:
        """The submitted rollouts, finished (this waits for them), with their tags: what the next `depth`
        steps train on. A checkpoint keeps them so that a resumed run trains on the same completions."""
        return {"done": [(future.result(), tag) for future, tag in self.queue], "submitted": self.submitted}

    def load_state_dict(self, state: dict) -> None:
        for rollout, tag in state["done"]:
            future = Future()
            future.set_result(rollout)
            self.queue.append((future, tag))
        self.submitted = state["submitted"]

    def close(self) -> None:
        for f, _ in self.queue:
            f.cancel()
        self.queue.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)


def _use_device(device: torch.device | None) -> None:
    """Make the model's GPU the background thread's current device. A new thread starts on GPU 0, and the
    decode step's CUDA graph, its side stream and Triton's kernels use the current device: on any other
    process's GPU (data parallelism, FSDP2) they would run on the wrong one."""
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)


class Prefetcher(_Queue):
    """Keeps up to `depth` rollouts in flight on one background thread, each with its own weight snapshot.

    Snapshots rotate: the job submitted at step k uses snapshot k % depth, which belonged to the job
    popped at the same step (already finished), so a snapshot is never refreshed while in use.
    """

    def __init__(self, model, make_sampler, foreground: Sampler, *, depth: int = 1, dtype=None):
        self.snapshots = [WeightSnapshot(model, dtype) for _ in range(depth)]
        self.samplers = [make_sampler(s.copy) for s in self.snapshots]
        self.foreground = foreground  # generates with the live weights (the synchronous first steps)
        self.depth = depth
        super().__init__(next(model.parameters()).device)

    def step(self, model, prompt_ids: list[list[int]], n: int, params: SamplingParams, tag=None):
        """Submit this batch; return (rollout to train on now, whether it came from the queue, its tag).

        `tag` travels with the submission (the objective passes the prompt batch, whose reward columns
        belong to the rollout that comes back steps later). Runs on the training thread between
        optimizer steps, so snapshots never copy half-updated weights.
        """
        ready = self.queue.popleft() if len(self.queue) >= self.depth else None
        if ready is not None:
            result = ready[0].result(), True, ready[1]
        else:  # before the submission: the two generations never draw from the random generator at once
            self.foreground.sync_weights(model)
            result = self.foreground.generate(prompt_ids, n, params), False, tag
        slot = self.submitted % self.depth
        self.snapshots[slot].refresh(model)
        self._submit(self.samplers[slot], prompt_ids, n, params, tag)
        return result


class RemotePrefetcher(_Queue):
    """`trl.async_prefetch` with a generation server: one rollout in flight, generated by the server with
    the weights pushed when it was submitted (every `sync_interval`-th submission pushes)."""

    depth = 1

    def __init__(self, sampler: Sampler, sync_interval: int = 1):
        self.sampler = sampler
        self.sync_interval = max(1, sync_interval)
        super().__init__()

    def step(self, model, prompt_ids: list[list[int]], n: int, params: SamplingParams, tag=None):
        """As `Prefetcher.step`; the first step generates its own batch from freshly pushed weights."""
        if self.queue:
            future, ready_tag = self.queue.popleft()
            result = (future.result(), True, ready_tag)  # the server is idle from here on
            if self.submitted % self.sync_interval == 0:
                self.sampler.sync_weights(model)
        else:
            self.sampler.sync_weights(model)
            result = (self.sampler.generate(prompt_ids, n, params), False, tag)
        self._submit(self.sampler, prompt_ids, n, params, tag)
        return result
