"""The memory planner: per-GPU memory of a training run, by part, before anything loads; whether it fits;
and the settings that make it fit. `tuneforge plan config.yaml` prints it, `tuneforge train` logs it.

    from tuneforge.planner import plan
    report = plan(cfg, gpus=4, gpu_memory=80 * 2**30)
    print(report.text())
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tuneforge.config.schema import Config
from tuneforge.errors import TuneforgeError

from .coefficients import GiB
from .estimate import Estimate, estimate
from .model import ModelFacts, count, model_config, shape_names
from .settings import Settings, from_config
from .suggest import Suggestion, suggestions

DEFAULT_GPU_MEMORY = 80 * GiB

__all__ = ["DEFAULT_GPU_MEMORY", "Plan", "PlanError", "fewest_checkpointed_layers", "parse_size", "plan", "shape_names"]


class PlanError(TuneforgeError):
    """A planner argument is not understood (e.g. --gpu-memory 80XB)."""


@dataclass
class Plan:
    estimate: Estimate
    suggestions: list[Suggestion]
    source: str
    spare_layers: Estimate | None = None  # fewer checkpointed layers that still fit, when memory is to spare
    layers: int = 0  # the model's decoder layers

    def text(self) -> str:
        from .report import render

        return render(self)

    def lines(self) -> list[str]:
        from .report import compact

        return compact(self.estimate)


class _Facts:
    """Counts per (adapter, quantization, weights dtype, upcast): the meta model is built once per variant."""

    def __init__(self, cfg: Config, config):
        self.cfg, self.config, self.cache = cfg, config, {}

    def __call__(self, s: Settings) -> ModelFacts:
        import torch

        upcast = s.upcast_unquantized
        key = (s.adapter, s.quantized, s.weights_dtype, upcast)
        if key not in self.cache:
            cfg = self.cfg
            if s.adapter and not cfg.adapter:  # a suggested adapter: LoRA on every linear layer, defaults
                cfg = cfg.model_copy(update={"adapter": "lora", "lora_target_linear": True})
            if not s.adapter and cfg.adapter:
                cfg = cfg.model_copy(update={"adapter": None})
            dtype = getattr(torch, s.weights_dtype)
            self.cache[key] = count(cfg, self.config, dtype, s.quantized, upcast)
        return self.cache[key]


def plan(cfg: Config, *, gpus: int | None = None, gpu_memory: int | None = None, model: str | None = None,
         with_suggestions: bool = True) -> Plan:
    """The estimate for `cfg` on `gpus` GPUs of `gpu_memory` bytes (model: a shipped shape name or a
    config.json instead of base_model's)."""
    facts, settings = _prepared(cfg, gpus or 1, model)
    memory = gpu_memory or DEFAULT_GPU_MEMORY
    budget = int(memory * (1 - cfg.gradient_checkpointing_headroom))  # what gradient_checkpointing_layers fills
    if settings.gradient_checkpointing and cfg.gradient_checkpointing_layers == "auto":  # as training will
        settings = settings.but(checkpointed_layers=_fewest(facts, settings, budget)[0])

    def run(s: Settings) -> Estimate:
        return estimate(facts(s), s, memory)

    main = run(settings)
    found = suggestions(settings, run) if with_suggestions and not main.fits else []
    spare = None
    if with_suggestions and main.fits and settings.gradient_checkpointing and settings.checkpointed_layers is None:
        n, fewer = _fewest(facts, settings, budget)
        spare = fewer if fewer.fits and n < facts(settings).arch.layers else None
    return Plan(main, found, model or cfg.base_model or "", spare, facts(settings).arch.layers)


def fewest_checkpointed_layers(cfg: Config, *, gpus: int, gpu_memory: int) -> tuple[int, Estimate]:
    """gradient_checkpointing_layers: auto: the fewest checkpointed decoder layers (from the first) whose plan
    fits `gpu_memory`, and that plan; every layer when none fits (the plan then says DOES NOT FIT)."""
    facts, settings = _prepared(cfg, gpus)
    return _fewest(facts, settings.but(gradient_checkpointing=True), gpu_memory)


def _fewest(facts: _Facts, settings: Settings, gpu_memory: int) -> tuple[int, Estimate]:
    layers = facts(settings).arch.layers
    # Fewer checkpointed layers never need less memory, so the first that fits is the answer.
    for n in range(layers + 1):
        found = estimate(facts(settings), settings.but(checkpointed_layers=n), gpu_memory)
        if found.fits:
            return n, found
    return layers, found


def _prepared(cfg: Config, gpus: int, model: str | None = None) -> tuple[_Facts, Settings]:
    """The counted model (cached per variant) and the settings the trainer would use."""
    facts = _Facts(cfg, model_config(cfg, model))
    return facts, _compile_choice(cfg, from_config(cfg, gpus), facts)


def _compile_choice(cfg: Config, s: Settings, facts: _Facts) -> Settings:
    """`torch_compile: auto` planned as the trainer will decide it on a GPU (compiled blocks keep fewer
    activations than eager ones, so planning a run that trains eagerly as compiled would under-plan it)."""
    if cfg.torch_compile != "auto":
        return s
    from tuneforge.config.methods import varying_block_layout
    from tuneforge.models.compile_setup import choose

    choice = choose("auto", cuda=True, parameters=facts(s).total, max_steps=cfg.max_steps,
                    strided_ebft=varying_block_layout(cfg),
                    selective_checkpointing=cfg.selective_checkpoint_settings is not None)
    return s.but(compiled=choice.compile)


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": GiB, "gb": 10**9, "gib": GiB, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """'80GiB', '80G', '24 GB', '81920MiB' -> bytes (a bare number is GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise PlanError(f"--gpu-memory {text!r}: give a size such as 80GiB, 24GB or 81920MiB")
    return int(float(m.group(1)) * (_UNITS[unit] if unit else GiB))
