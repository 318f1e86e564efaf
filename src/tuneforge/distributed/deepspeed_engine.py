"""Training through DeepSpeed ZeRO (`deepspeed: zero{1,2,3}*.json`): the engine behind the one loop.

The loop keeps its step contract. Every micro-batch's loss is already divided by the items of the whole
optimizer step over all processes, so the step's gradient is the sum of the micro-batch gradients. DeepSpeed
differs from that in two places, both undone here:
  - `engine.backward` divides the loss by gradient_accumulation_steps unless told `scale_wrt_gas=False`;
  - data-parallel gradients are averaged over the processes (as DDP does), hence the `* world_size` the
    loop applies for DDP and FSDP2 alike.
The loop, not DeepSpeed's micro-step counter, decides where a step ends (a step may hold fewer
micro-batches, e.g. the last of an epoch): the boundary is set before every micro-batch and
`engine.step()` runs once per optimizer step; it clips (gradient_clipping), updates and zeroes gradients.

Checkpoints: every process writes its part with `engine.save_checkpoint` into `<checkpoint>.tmp/deepspeed/`,
which the engine's checkpoint writer then publishes atomically like any checkpoint. Final weights: one tensor
at a time, the trained ones from the optimizer's fp32 master copy (`safe_get_full_fp32_param`), frozen
ZeRO-3 ones gathered (`GatheredParameters`), written into safetensors shards by the first process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from tuneforge.config.distributed import zero_offloads, zero_stage
from tuneforge.errors import TuneforgeError

from . import deepspeed_config as dsc
from .fsdp import _ensure_process_group

log = logging.getLogger("tuneforge")

FOLDER = "deepspeed"
TAG = "state"


class ZeroEngine:
    """The DeepSpeed engine and what the loop asks of it (one per run)."""

    def __init__(self, engine, settings: dict, scheduler=None):
        self.engine = engine
        self.settings = settings
        self.stage = zero_stage(settings)
        self.scheduler = scheduler  # DeepSpeed's own (a scheduler section), stepped inside engine.step()

    # -------------------------------------------------------------- the step
    def micro_batch(self, last: bool):
        """Around one micro-batch: gradients are reduced (and the update allowed) on the step's last one."""
        self.engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """`loss` is the loop's, per step already and times the process count (DeepSpeed averages over the
        processes, as DDP does): no 1/gas."""
        self.engine.backward(loss, scale_wrt_gas=False)

    def grad_norm(self) -> float:
        """The gradient norm before clipping of the last engine.step() (nan where DeepSpeed gives none)."""
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # -------------------------------------------------------------- checkpoints
    def save(self, folder: Path) -> None:
        """Every process writes its part of the model and optimizer states under folder/deepspeed."""
        self.engine.save_checkpoint(str(Path(folder) / FOLDER), tag=TAG)

    def load(self, folder: Path, *, with_optimizer: bool) -> None:
        written = processes_that_wrote(folder)
        world = self.engine.dp_world_size
        if with_optimizer and self.stage > 0 and written and written != world:
            raise TuneforgeError(
                f"{folder} holds DeepSpeed ZeRO state of {written} processes; resume it on {written} processes "
                f"(this run has {world}), or switch to FSDP2 (fsdp_version: 2), whose checkpoints resume on any "
                "process count")
        try:
            path, _ = self.engine.load_checkpoint(
                str(Path(folder) / FOLDER), tag=TAG, load_optimizer_states=with_optimizer,
                load_lr_scheduler_states=with_optimizer, load_module_only=not with_optimizer)
        except (RuntimeError, KeyError, ValueError, AssertionError) as exc:
            raise TuneforgeError(f"{folder}: its DeepSpeed state does not fit this run ({str(exc)[:300]}). Resume "
                                 "with the config that wrote it (same base model, adapter and ZeRO stage).") from None
        if path is None:
            raise TuneforgeError(f"{folder}: DeepSpeed found no checkpoint under {FOLDER}/{TAG}")

    # -------------------------------------------------------------- weights
    def full_tensors(self, *, trainable_only: bool):
        """(name in the model, whole CPU tensor) one at a time, on every process (the gathers are collective).
        Trained parameters come from the optimizer's fp32 master copy (with bf16/fp16 the model itself holds a
        rounded copy), as the plain and FSDP2 runs save them; frozen ones as they are. Tied parameters are
        yielded once, under their first name, as save_pretrained does."""
        from deepspeed.utils import safe_get_full_fp32_param

        model = self.engine.module.model
        seen: set[int] = set()
        for name, param in model.named_parameters(remove_duplicate=False):
            if id(param) in seen or (trainable_only and not param.requires_grad):
                continue
            seen.add(id(param))
            master = safe_get_full_fp32_param(param) if param.requires_grad else None
            if master is not None:
                tensor = master.detach().cpu().clone()
            else:
                with _gathered([param], self.stage):
                    tensor = param.detach().cpu().clone()
            yield name, tensor
        if not trainable_only:
            stored = set(model.state_dict())
            for name, buf in model.named_buffers():
                if name in stored:
                    yield name, buf.detach().cpu()

    @torch.no_grad()
    def copy_whole_weights(self, whole: nn.Module) -> None:
        """Refresh `whole` (a plain copy of the model made before ZeRO-3 partitioned it) from the trained
        parameters, gathered one at a time as the forward uses them; every process must call it at the same
        point (the gathers are collective). Frozen parameters never change, so the copy still holds them."""
        mine = dict(whole.named_parameters())
        for name, param in self.engine.module.model.named_parameters():
            if param.requires_grad:
                with _gathered([param], self.stage):
                    mine[name].copy_(param.detach())

    def save_final(self, model, tokenizer, folder: Path, *, main: bool, safe: bool = True) -> None:
        """The trained model as a Hugging Face folder: the PEFT adapter, or safetensors (shards)."""
        from .sharded_checkpoint import write_hf_folder

        write_hf_folder(lambda trainable_only: self.full_tensors(trainable_only=trainable_only), model, tokenizer,
                        folder, main=main, safe=safe)


def _gathered(params: list, stage: int):
    if stage < 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def exists(folder: Path) -> bool:
    return (Path(folder) / FOLDER / TAG).is_dir()


def processes_that_wrote(folder: Path) -> int:
    """How many processes wrote a checkpoint's ZeRO state (one optimizer partition file each; 0: none)."""
    names = [p.name for p in (Path(folder) / FOLDER / TAG).glob("*optim_states.pt")]
    ranks = {m.group(1) for n in names if (m := re.search(r"zero_pp_rank_(\d+)_", n))}
    return len(ranks)


def initialize(cfg, runner: nn.Module, model: nn.Module, *, optimizer, world_size: int, precision: str,
               total_steps: int, warmup: int) -> ZeroEngine:
    """`deepspeed.initialize` on the runner with the filled JSON. `optimizer` is tuneforge's (used unless the
    JSON has an optimizer section). Returns the ZeroEngine; the caller builds its schedule on `base_optimizer`."""
    from tuneforge.config.distributed import deepspeed_settings

    dsc.select_accelerator(torch.cuda.is_available())
    import deepspeed

    raw = deepspeed_settings(cfg)
    settings = dsc.fill(raw, micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum,
                        world_size=world_size, max_grad_norm=cfg.max_grad_norm, precision=precision,
                        optimizer=dsc.optimizer_values(cfg), scheduler=dsc.scheduler_values(cfg, warmup, total_steps),
                        hidden_size=_hidden_size(model))
    own = "optimizer" not in settings
    settings = dsc.run_settings(settings, own_optimizer=own)
    if not own:
        log.info("deepspeed: the JSON's optimizer section (%s) replaces optimizer: %s",
                 settings["optimizer"].get("type"), cfg.optimizer)
    if zero_stage(settings) >= 3:
        _register_head(runner, model)
    _ensure_process_group()  # DeepSpeed then uses it (one process without a launcher included)
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists on it; launchers set it, one plain process is 0
    engine, _, _, scheduler = deepspeed.initialize(model=runner, optimizer=optimizer if own else None,
                                                   config=settings)
    offloaded = zero_offloads(settings)
    log.info("DeepSpeed ZeRO stage %d on %d process(es)%s", zero_stage(settings), world_size,
             f"; offloaded to host memory: {', '.join(offloaded)}" if offloaded else "")
    return ZeroEngine(engine, settings, scheduler if "scheduler" in settings else None)


def _hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "hidden_size", None)


def _register_head(runner: nn.Module, model: nn.Module) -> None:
    """The loss multiplies hidden states by the LM head's weight itself (chunked cross-entropy), outside the
    head's forward, where ZeRO-3 would not have gathered it: gather it for the runner's whole forward."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    for param in (head.parameters() if head is not None else []):
        register_external_parameter(runner, param)


def base_optimizer(zero: ZeroEngine):
    """The torch optimizer inside DeepSpeed's wrapper (its param_groups carry the learning rate)."""
    engine = zero.engine
    return getattr(engine, "basic_optimizer", None) or engine.optimizer


class EngineOptimizer:
    """The loop's optimizer for a DeepSpeed run: `step` is engine.step() (clip, update, zero the gradients)."""

    def __init__(self, zero: ZeroEngine):
        self.zero = zero

    def step(self) -> None:
        self.zero.engine.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.zero.engine.optimizer.zero_grad()  # after engine.step() a no-op; dropping a failed step's otherwise


class DeepSpeedSchedule:
    """A scheduler section's DeepSpeed scheduler seen as the loop's schedule: DeepSpeed steps it inside
    engine.step(), so the loop's own step is a no-op."""

    def __init__(self, scheduler):
        self.inner = scheduler

    def step(self) -> None:
        pass

    def get_last_lr(self) -> list[float]:
        return list(self.inner.get_last_lr())

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
