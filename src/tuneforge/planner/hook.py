"""`tuneforge train`'s memory estimate: logged by the first process before the model loads. A model the
planner cannot size (an architecture without a decoder `layers` list, a remote-code model) only costs the
estimate, never the run."""

from __future__ import annotations

import logging

from .host import host_shortfall

log = logging.getLogger("tuneforge")


def log_plan(cfg, processes: int, main: bool = True) -> None:
    if not main:
        return
    try:
        from . import plan

        memory = gpu_memory()
        report = plan(cfg, gpus=processes, gpu_memory=memory, with_suggestions=False)
        lines = report.lines()
    except Exception as exc:  # the estimate is advice; training goes on without it
        log.debug("memory plan unavailable: %s: %s", type(exc).__name__, exc)
        return
    if memory is None:
        lines[-1] += " (no GPU here: planned for an 80 GiB GPU)"
    for line in lines:
        log.info("%s", line)
    if memory is not None and not plan_fits(lines):
        log.warning("the memory plan says this run may not fit; `tuneforge plan <config>` lists settings that do")
    short = host_shortfall(report.estimate)
    if short:
        log.warning("%s", short)


def resolve_checkpointed_layers(cfg, processes: int, main: bool = True):
    """`gradient_checkpointing_layers: auto` -> the number the plan of this GPU checkpoints (the plan of an auto
    config fills the GPU's memory less the headroom; every process computes the same); the config unchanged
    otherwise. Without a GPU, or for a model the planner cannot size, every layer is checkpointed."""
    if cfg.gradient_checkpointing_layers != "auto" or not cfg.gradient_checkpointing:
        return cfg
    from . import plan

    n, why, total = None, "no GPU here", gpu_memory()
    if total is not None:
        try:
            found = plan(cfg, gpus=processes, gpu_memory=total, with_suggestions=False).estimate
            n = found.settings.checkpointed_layers
            why = (f"planned {found.total / 2**30:.1f} GiB of {total / 2**30:.1f} GiB, "
                   f"{cfg.gradient_checkpointing_headroom:.0%} left as headroom")
        except Exception as exc:  # the planner cannot size this model: the safe choice
            why = f"the memory planner cannot size this model ({type(exc).__name__}: {exc})"
    if main:
        log.info("gradient_checkpointing_layers: auto -> %s (%s)", "every layer" if n is None else n, why)
    return cfg.model_copy(update={"gradient_checkpointing_layers": n})


def gpu_memory() -> int | None:
    """This process's GPU's memory in bytes, None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def plan_fits(lines: list[str]) -> bool:
    return not lines[-1].lstrip().startswith("DOES NOT FIT")
