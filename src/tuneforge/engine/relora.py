"""ReLoRA (Lialin et al., 2023): high-rank training from a sequence of low-rank adapters.

Every `jagged_restart_steps` optimizer steps (a restart):
  1. each LoRA layer's update B A x scaling is added to its base weight (the model's function is unchanged);
  2. the adapter starts afresh: A random (PEFT's own initialisation), B zero, so it adds nothing yet;
  3. the optimizer state of the adapter's parameters is pruned: `relora_prune_ratio` of the values of each
     state tensor are zeroed, the smallest in magnitude or a random subset, so that the next adapter does not
     follow the old one's momentum;
  4. the learning rate restarts: the jagged schedule (`jagged_multiplier`) warms up again from 0.1%.

The base weights then differ from the checkpoint the run started from, so every checkpoint carries them
(`relora_base.safetensors`, the LoRA-wrapped layers' weights only), and the final output is the merged model.
The random draws (A, random pruning) come from a generator seeded by (seed, restart), so a resumed run
restarts exactly as the uninterrupted one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("tuneforge")

MIN_SCALE = 0.001  # the jagged schedule's floor, as a fraction of the wrapped schedule's rate
BASE_FILE = "relora_base.safetensors"


def jagged_multiplier(step: int, every: int, warmup: int, anneal: int) -> float:
    """Factor on the schedule's learning rate at `step` (steps done): 1 until the first restart; then, in each
    interval, a linear warmup from MIN_SCALE over `warmup` steps and a decay to MIN_SCALE over the last `anneal`."""
    if step < every - anneal:
        return 1.0
    progress = step % every
    if progress < warmup:
        t = progress / warmup
    elif progress > every - anneal:
        t = min(1.0, (every - progress) / anneal)
    else:
        t = 1.0
    return t * (1 - MIN_SCALE) + MIN_SCALE


def jagged(scheduler, every: int, warmup: int | None, anneal: int | None):
    """`scheduler` (a LambdaLR) with every group's multiplier times the jagged one."""
    warmup, anneal = warmup or 10, anneal or 1

    def wrap(inner):
        def multiplier(step: int) -> float:
            return inner(step) * jagged_multiplier(step, every, warmup, anneal)
        return multiplier

    scheduler.lr_lambdas = [wrap(fn) for fn in scheduler.lr_lambdas]
    return scheduler


def lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def adapter_parameters(model) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]


@torch.no_grad()
def merge_and_reinit(model, generator: torch.Generator) -> int:
    """Steps 1 and 2 for every LoRA layer of `model` (a PEFT model); returns the number of layers merged."""
    layers = lora_layers(model)
    for layer in layers:
        for name in layer.active_adapters:
            if name not in layer.lora_A and name not in getattr(layer, "lora_embedding_A", {}):
                continue
            weight = layer.get_base_layer().weight
            weight.add_(layer.get_delta_weight(name).to(weight.dtype))
            # PEFT draws A from the global generator (the CUDA one for a CUDA weight): seed it, restore it after
            with torch.random.fork_rng(devices=[weight.device] if weight.is_cuda else []):
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
                layer.reset_lora_parameters(name, init_lora_weights=True)
    return len(layers)


@torch.no_grad()
def prune_state(optimizer, params: list[torch.nn.Parameter], ratio: float, method: str,
                generator: torch.Generator) -> tuple[int, int]:
    """Step 3: zero `ratio` of every floating-point state tensor of `params`; (zeroed, total) values."""
    zeroed = total = 0
    for p in params:
        for key, value in optimizer.state.get(p, {}).items():
            if key == "step" or not torch.is_tensor(value) or not value.is_floating_point() or value.numel() < 2:
                continue
            if method == "magnitude":
                keep = value.abs() > torch.quantile(value.abs().flatten().float(), ratio).to(value.dtype)
            else:  # random, reset
                keep = torch.rand(value.shape, generator=generator).to(value.device) > ratio
            value.mul_(keep.to(value.dtype))
            zeroed += int((value == 0).sum())
            total += value.numel()
    return zeroed, total


class Restarts:
    """The restart after every `every`-th optimizer step, and the merged base weights in checkpoints."""

    def __init__(self, model, optimizer, *, every: int, ratio: float, method: str, seed: int):
        self.model, self.optimizer = model, optimizer
        self.every, self.ratio, self.method, self.seed = every, ratio, method, seed
        log.info("ReLoRA: the adapter merges into the base weights every %d steps (optimizer state pruned: %s, %g)",
                 every, method, ratio)

    def after_step(self, step: int) -> None:
        if step % self.every:
            return
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        layers = merge_and_reinit(self.model, generator)
        zeroed, total = prune_state(self.optimizer, adapter_parameters(self.model), self.ratio, self.method, generator)
        log.info("ReLoRA restart after step %d: %d adapter layers merged, %.1f%% of their optimizer state zeroed",
                 step, layers, 100 * zeroed / max(total, 1))

    def base_weights(self) -> dict[str, torch.Tensor]:
        """The weights of the LoRA-wrapped layers, which restarts change, by their name in the model."""
        wrapped = {id(layer.get_base_layer().weight) for layer in lora_layers(self.model)}
        return {n: p for n, p in self.model.named_parameters() if id(p) in wrapped}

    def save(self, folder: Path, step: int) -> None:
        from safetensors.torch import save_file

        if step < self.every:  # no restart yet: the base weights are the ones the run loads
            return
        save_file({n: p.detach().cpu().contiguous() for n, p in self.base_weights().items()}, str(folder / BASE_FILE))

    @torch.no_grad()
    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        path = folder / BASE_FILE
        if not path.exists():  # a checkpoint from before the first restart carries none, and needs none
            return
        saved = load_file(str(path))
        for name, p in self.base_weights().items():
            p.copy_(saved[name].to(p.device, p.dtype))


def merged_model(model):
    """The final model: the last adapter merged into the base weights, without PEFT's wrappers."""
    return model.merge_and_unload()
