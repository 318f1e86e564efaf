"""The few cross-process operations the engine and the objectives need, in one place.

Every function is a no-op (returns its input) when there is one process, so callers never test for
distribution themselves. Tensors travel on the device the backend needs (CUDA for NCCL, CPU for gloo)
and come back on the CPU (or as Python values).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over every process (a new CPU tensor; `t` is not changed)."""
    if world_size() == 1:
        return t
    out = t.detach().to(_device(), copy=True)
    dist.all_reduce(out)
    return out.cpu()


def mean_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` averaged over every process."""
    n = world_size()
    return t if n == 1 else sum_tensor(t) / n


def sum_floats(values: list[float]) -> list[float]:
    """Element-wise sums over every process, in float64 (metric totals)."""
    if world_size() == 1:
        return list(values)
    return sum_tensor(torch.tensor(values, dtype=torch.float64)).tolist()


def max_float(value: float) -> float:
    """The largest `value` of any process."""
    if world_size() == 1:
        return value
    out = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return float(out.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj` (picklable), in rank order, on every process."""
    n = world_size()
    if n == 1:
        return [obj]
    gathered: list[Any] = [None] * n
    dist.all_gather_object(gathered, obj)
    return gathered


def union_keys(keys: Iterable[str]) -> list[str]:
    """The sorted union of every process's names, so that vectors summed by position line up."""
    return sorted(set().union(*(set(part) for part in gather_objects(sorted(keys)))))


def barrier() -> None:
    """Wait until every process gets here."""
    if world_size() > 1:
        dist.barrier()
