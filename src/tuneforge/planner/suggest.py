"""The settings that make a run fit, in the order a user would try them: cheapest in speed and in what is
trained first, each with the planner's own estimate. Each step keeps the previous ones that are free of
side effects on the result (checkpointing, a smaller micro-batch with more accumulation)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .estimate import Estimate
from .settings import Settings

GPU_COUNTS = (2, 4, 8, 16, 32, 64)


@dataclass
class Suggestion:
    label: str
    keys: str  # the config keys / flags that apply it
    estimate: Estimate


def suggestions(s: Settings, run: Callable[[Settings], Estimate]) -> list[Suggestion]:
    """Every candidate from the configured settings `s`; `run` estimates a Settings."""
    out: list[Suggestion] = []
    base = s
    if s.compiled and not s.recompute_elementwise:  # the same gradients; a few elementwise kernels more
        base = base.but(recompute_elementwise=True)
        out.append(Suggestion("compiled blocks recompute elementwise results", "torch_compile_recompute_elementwise: "
                              "true", run(base)))
    if not s.gradient_checkpointing:
        base = base.but(gradient_checkpointing=True)
        out.append(Suggestion("gradient checkpointing", "gradient_checkpointing: true", run(base)))
    if s.micro_batch_size > 1:
        accum = s.grad_accum * s.micro_batch_size
        smaller = base.but(micro_batch_size=1, grad_accum=accum)
        estimate = run(smaller)
        out.append(Suggestion("micro-batch 1 with more accumulation",
                              f"micro_batch_size: 1, gradient_accumulation_steps: {accum}", estimate))
        # Accumulated gradients stay in memory between micro-batches: keep the step only where it helps.
        if estimate.total < run(base).total:
            base = smaller
    if s.adapter is None:
        lora = base.but(adapter="lora")
        out.append(Suggestion("LoRA", "adapter: lora, lora_target_linear: true", run(lora)))
    if s.quantized != "nf4":
        qlora = base.but(adapter="qlora", quantized="nf4")
        out.append(Suggestion("QLoRA", "adapter: qlora, load_in_4bit: true, lora_target_linear: true", run(qlora)))
    if s.zero_stage is not None:  # the run shards with DeepSpeed: more of ZeRO, not another sharding
        return out + _zero_suggestions(s, base, run)
    # FSDP2 shards a 4-bit base (torchao NF4), not an 8-bit one: 8-bit LoRA becomes LoRA on the 16-bit base there.
    nf4 = s.quantized == "nf4"
    fsdp_base = base.but(fsdp=True, offload=False, quantized="nf4" if nf4 else None,
                         adapter=s.adapter if nf4 else "lora" if s.adapter else None)
    for n in GPU_COUNTS:
        if n <= s.gpus and s.fsdp:
            continue
        sharded = fsdp_base.but(gpus=n)
        estimate = run(sharded)
        if estimate.fits or n == GPU_COUNTS[-1]:
            what = "" if fsdp_base.adapter == s.adapter else " (LoRA on the 16-bit base)"
            out.append(Suggestion(f"{n} GPUs with FSDP2{what}", f"--gpus {n}; fsdp_version: 2, fsdp_config: {{}}",
                                  estimate))
            break
    offload = fsdp_base.but(gpus=s.gpus, offload=True)
    out.append(Suggestion(f"FSDP2 offload on {s.gpus} GPU(s)", "fsdp_version: 2, fsdp_config: {offload_params: true}",
                          run(offload)))
    return out


def _zero_suggestions(s: Settings, base: Settings, run: Callable[[Settings], Estimate]) -> list[Suggestion]:
    """ZeRO-3 over more GPUs (the shipped deepspeed_configs/ files), then ZeRO-3 with everything offloaded."""
    out = []
    zero3 = base.but(zero_stage=3, zero_offload_optimizer=False, zero_offload_param=False)
    for n in GPU_COUNTS:
        if n < s.gpus or (n == s.gpus and s.zero_stage == 3):
            continue
        estimate = run(zero3.but(gpus=n))
        if estimate.fits or n == GPU_COUNTS[-1]:
            out.append(Suggestion(f"{n} GPUs with ZeRO-3", f"--gpus {n}; deepspeed: deepspeed_configs/zero3_bf16.json",
                                  estimate))
            break
    offload = zero3.but(zero_offload_optimizer=True, zero_offload_param=True)
    out.append(Suggestion(f"ZeRO-3 offload on {s.gpus} GPU(s)", "deepspeed: deepspeed_configs/zero3_cpuoffload_all.json",
                          run(offload)))
    return out


def first_fit(found: list[Suggestion]) -> Suggestion | None:
    return next((x for x in found if x.estimate.fits), None)
