"""The planner's output: a table for `tuneforge plan`, one short line per part for `tuneforge train`'s log."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .coefficients import GiB

if TYPE_CHECKING:
    from .estimate import Estimate

PHASES = {"loss": "the loss (end of the forward pass)", "backward": "the backward pass",
          "update": "the optimizer update", "generation": "generation"}


def gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def describe(e: Estimate) -> str:
    s = e.settings
    what = {"lora": "LoRA", "qlora": "QLoRA"}.get(s.adapter or "", "full fine-tuning")
    method = s.rl or ("reward model" if s.reward_model else "sft")
    layout = "packed" if s.packed else "padded"
    shard = ""
    if s.fsdp:
        shard = ", FSDP2" + (" offload" if s.offload else "") + ("" if s.reshard_after_forward else " (no reshard)")
    elif s.zero_stage is not None:
        shard = f", DeepSpeed ZeRO-{s.zero_stage}" + (" offload" if s.zero_offload_optimizer or s.zero_offload_param
                                                       else "")
    return (f"{what}, {method}, micro-batch {s.micro_batch_size} x {s.tokens // max(s.micro_batch_size, 1)} tokens "
            f"({layout}), accumulation {s.grad_accum}, {s.precision}, {s.optimizer}, "
            f"{s.gpus} GPU{'s' if s.gpus > 1 else ''}{shard}")


def fits_line(e: Estimate) -> str:
    verdict = "fits" if e.fits else "DOES NOT FIT"
    return (f"{verdict}: peak {gib(e.total)} GiB of {gib(e.gpu_memory)} GiB per GPU "
            f"(torch allocated {gib(e.allocated)} GiB, during {PHASES[e.peak_phase]})")


def render(plan) -> str:  # a tuneforge.planner.Plan (not imported: the package imports this module)
    e = plan.estimate
    lines = [f"Memory plan for {plan.source}", f"  {describe(e)}",
             f"  parameters: {e.extra['trainable'] + e.extra['frozen']:,} "
             f"({e.extra['trainable']:,} trainable, {e.extra['frozen']:,} frozen)", "",
             f"  {'per GPU':<32}{'GiB':>8}  note"]
    for part in e.parts:
        lines.append(f"  {part.name:<32}{gib(part.bytes):>8}  {part.note}")
    lines.append(f"  {'total (peak)':<32}{gib(e.total):>8}  during {PHASES[e.peak_phase]}")
    lines.append(f"  {'host memory per process':<32}{gib(e.host):>8}  "
                 + ("offloaded shards + the process" if e.settings.offload else "the process, weights on the GPU"))
    lines.append(f"  {'host memory while loading':<32}{gib(e.host_at_load):>8}  per node: each process reads "
                 "the weights into CPU memory first")
    if e.settings.offload:
        from .host import host_memory, host_shortfall

        here = host_memory()
        need = min(e.settings.gpus, 8) * e.host
        lines.append(f"  {'host memory per node (offload)':<32}{gib(need):>8}  "
                     + (f"this machine has {gib(here)} GiB" if here else ""))
        short = host_shortfall(e, here)
        if short:
            lines.append(f"  warning: {short}")
    lines += ["", fits_line(e)]
    if plan.spare_layers is not None:
        fewer = plan.spare_layers
        n = fewer.settings.checkpointed_layers
        lines.append(f"Memory to spare: it still fits with {n} of {plan.layers} layers checkpointed ({gib(fewer.total)} "
                     "GiB, within the headroom), and the others skip their recompute (faster steps): "
                     f"gradient_checkpointing_layers: auto (or {n}).")
    if plan.suggestions:
        lines += ["", "To fit, in the order to try (each keeps the earlier checkpointing / micro-batch steps):"]
        for i, sug in enumerate(plan.suggestions, 1):
            mark = "fits" if sug.estimate.fits else "does not fit"
            lines.append(f"  {i}. {sug.label:<44}{gib(sug.estimate.total):>8} GiB  {mark}   ({sug.keys})")
        first = next((x for x in plan.suggestions if x.estimate.fits), None)
        lines.append(f"Cheapest that fits: {first.label} ({first.keys})." if first
                     else "None of these fits: use more GPUs with offload, a shorter sequence_len or a smaller model.")
    return "\n".join(lines)


def compact(e: Estimate) -> list[str]:
    """One line per part that is not zero, then the verdict (for the training log)."""
    out = [f"memory plan: {describe(e)}"]
    for part in e.parts:
        if part.bytes and part.name not in ("activations (checkpointing)", "activations (no checkpointing)"):
            out.append(f"  {part.name}: {gib(part.bytes)} GiB")
    out.append(f"  {fits_line(e)}")
    return out
