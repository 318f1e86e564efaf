"""FSDP2: shard the model's parameters, gradients and optimizer states over the processes.

Built on PyTorch's own `torch.distributed.fsdp.fully_shard`. Each decoder layer (or, with
SIZE_BASED_WRAP, each large module) becomes one shard group whose parameters are gathered just before
it runs and freed after (`reshard_after_forward`); the remaining parameters (embeddings, final norm,
LM head) belong to the root group, the trainer's `ObjectiveRunner`, so that whatever an objective
computes inside the runner's forward sees whole parameters.

The training contract is unchanged: gradients are reduce-scattered and averaged over the processes as
DDP averages them, so the trainer scales the loss by the process count exactly as it does for DDP.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from tuneforge.errors import TuneforgeError

log = logging.getLogger("tuneforge")


class ShardingError(TuneforgeError):
    """The model cannot be sharded as the config asks (e.g. a layer class it does not have)."""


def _inner_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (it carries `_no_split_modules`)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def layer_classes(model: nn.Module, names: list[str] | None) -> set[type]:
    """The module classes to shard one by one: `names`, else the model's `_no_split_modules`."""
    present: dict[str, type] = {}
    for module in model.modules():
        present.setdefault(type(module).__name__, type(module))
    wanted = list(names or getattr(_inner_model(model), "_no_split_modules", None) or [])
    if not wanted:
        raise ShardingError(
            "fsdp_config: this model does not name its decoder layer class; set "
            f"fsdp_config.transformer_layer_cls_to_wrap to one of: {_layer_like(present)}")
    missing = [n for n in wanted if n not in present]
    if names and missing:
        raise ShardingError(
            f"fsdp_config.transformer_layer_cls_to_wrap: {', '.join(missing)} is not a module of this model; "
            f"its layer-like classes are: {_layer_like(present)}")
    found = {present[n] for n in wanted if n in present}
    if not found:
        raise ShardingError(f"fsdp_config: none of {wanted} is in the model; set transformer_layer_cls_to_wrap to "
                            f"one of: {_layer_like(present)}")
    return found


def _layer_like(present: dict[str, type]) -> str:
    names = sorted(n for n in present if any(w in n for w in ("Layer", "Block", "layer", "block")))
    return ", ".join(names) or ", ".join(sorted(present))


def _groups(model: nn.Module, settings) -> list[nn.Module]:
    """Modules that get their own shard group, innermost first (fully_shard must see children first)."""
    if settings.auto_wrap_policy == "SIZE_BASED_WRAP":
        chosen, covered = [], set()
        for module in reversed(list(model.modules())):  # children come after parents in modules()
            own = [p for p in module.parameters() if id(p) not in covered]
            if module is not model and sum(p.numel() for p in own) >= settings.min_num_params:
                chosen.append(module)
                covered.update(id(p) for p in own)
        return chosen
    classes = layer_classes(model, settings.transformer_layer_cls_to_wrap)
    return [m for m in model.modules() if type(m) in classes]


def _policy_kwargs(settings, compute_dtype: torch.dtype | None) -> dict:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    offload = OffloadPolicy()
    if settings.offload_params:
        if torch.cuda.is_available():
            offload = CPUOffloadPolicy(pin_memory=settings.cpu_offload_pin_memory)
        else:
            log.info("fsdp_config.offload_params: the parameters already live in CPU memory (no GPU)")
    # Mixed precision is FSDP2's own: each layer is gathered in the compute dtype and its gradients reduced in
    # fp32 into the fp32 shards. Autocast would instead cache a half-precision copy of every whole weight
    # from the forward to the backward, on every process, whatever the sharding.
    mixed = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32 if compute_dtype else None)
    return {"reshard_after_forward": settings.reshard_after_forward, "offload_policy": offload, "mp_policy": mixed}


def shard(runner: nn.Module, model: nn.Module, settings, compute_dtype: torch.dtype | None = None) -> int:
    """Apply FSDP2 to `model`'s layers and to `runner` (the root, which holds `model`). Returns the number of
    shard groups. Must run before the optimizer is built: sharding replaces every parameter. `compute_dtype`
    (bf16/fp16 mixed precision, else None) is the dtype layers run in; the shards keep their own dtype."""
    from torch.distributed.fsdp import fully_shard

    _ensure_process_group()
    kwargs = _policy_kwargs(settings, compute_dtype)
    kept_whole = _nf4_on_one_process(runner)
    if kept_whole:
        kwargs["ignored_params"] = kept_whole
    groups = _groups(model, settings)
    for module in groups:
        fully_shard(module, **kwargs)
    fully_shard(runner, **kwargs)
    log.info("FSDP2: %d shard groups (%s) + the root; reshard_after_forward=%s, offload_params=%s", len(groups),
             ", ".join(sorted({type(m).__name__ for m in groups})) or "none", settings.reshard_after_forward,
             settings.offload_params)
    return len(groups) + 1


def _is_nf4(p: torch.Tensor) -> bool:
    return type(getattr(p, "_local_tensor", p)).__name__ == "NF4Tensor"  # by name: torchao is not imported here


def holds_nf4(module: nn.Module) -> bool:
    """Whether the model's frozen base is QLoRA's 4-bit NF4 (torchao; models/nf4.py)."""
    return any(_is_nf4(p) for p in module.parameters() if not p.requires_grad)


@torch.no_grad()
def _nf4_on_one_process(model: nn.Module) -> set[nn.Parameter]:
    """On a single process FSDP2 skips the all-gather and copies each parameter's one all-gather input, which
    breaks tensors that gather several (NF4: values, scales, second-level scales). There is nothing to shard
    on one process anyway: the NF4 weights stay whole (FSDP2's `ignored_params`), moved to the GPU here as
    `fully_shard` would move them."""
    import torch.distributed as dist

    if dist.get_world_size() > 1:
        return set()
    frozen = {p for p in model.parameters() if not p.requires_grad and _is_nf4(p)}
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        for p in frozen:
            torch.utils.swap_tensors(p, nn.Parameter(p.to(device), requires_grad=False))
    return frozen


def _ensure_process_group() -> None:
    """FSDP2 needs a process group even for one process (a run started without a launcher)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gradient_sync(runner: nn.Module, enabled: bool):
    """Reduce-scatter gradients in this backward (the last micro-batch of a step) or accumulate them locally."""
    runner.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        runner.set_requires_gradient_sync(True)


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a plain tensor is returned as it is)."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> float:
    """Clip sharded gradients by their global norm (every process computes the same value)."""
    grads = [p for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
    return float(local(norm))


@torch.no_grad()
def copy_whole_weights(sharded: nn.Module, whole: nn.Module) -> None:
    """Refresh `whole` (a plain copy of the model) from the sharded model's trainable parameters; every
    process must call it at the same point (each parameter is gathered with all of them). Frozen parameters
    never change, so the copy made before sharding still holds them."""
    mine = dict(whole.named_parameters())
    for name, param in sharded.named_parameters():
        if param.requires_grad:
            mine[name].copy_(local(param.detach()))
