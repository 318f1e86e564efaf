"""fp16 loss scaling (`fp16: true`), beyond what accelerate does for one process or DDP.

accelerate scales the loss and, through the optimizer it prepared, unscales, skips steps whose gradients
overflowed and adapts the scale. Two things are ours:
- FSDP2: each process holds a shard of the gradients, so "did any gradient overflow" must be agreed by all
  processes, or some would skip a step that others take and the shards would drift apart. torch's
  ShardedGradScaler all-reduces that flag; it replaces accelerate's scaler before the optimizer is prepared.
  The gradients are unscaled before clipping, so max_grad_norm applies to the true gradient norm.
- exact resume: the scale and its growth counter are part of the training state, saved in every checkpoint;
  a resumed run restarting at the initial scale would skip steps the uninterrupted run took.
"""

from __future__ import annotations


def shard_aware(accelerator) -> None:
    """Under FSDP2: swap accelerate's GradScaler for torch's ShardedGradScaler (same settings)."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None:
        return
    import torch.distributed as dist
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    # The process group is passed explicitly: the constructor's default is the group that existed when torch
    # first imported the module, stale for a second run in the same Python process.
    accelerator.scaler = ShardedGradScaler(
        device=getattr(scaler, "_device", "cuda"), init_scale=scaler.get_scale(), growth_factor=scaler.get_growth_factor(),
        backoff_factor=scaler.get_backoff_factor(), growth_interval=scaler.get_growth_interval(),
        enabled=scaler.is_enabled(), process_group=dist.group.WORLD)


def unscale(accelerator) -> None:
    """Divide the gradients by the scale before clipping (a no-op without fp16)."""
    if getattr(accelerator, "scaler", None) is not None:
        accelerator.unscale_gradients()


def state_dict(accelerator) -> dict | None:
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    return {k: float(v) if isinstance(v, float) else v for k, v in scaler.state_dict().items()}


def load_state_dict(accelerator, state: dict | None) -> None:
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and state:
        scaler.load_state_dict(state)
