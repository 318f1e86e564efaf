"""Axolotl's `plugins:` list and the kernel switches that go with it.

A plugin whose effect tuneforge has built in is accepted with one note saying what replaces it; a plugin
tuneforge cannot stand in for is refused with the plugin named and what to do instead. Kernel switches
(Liger's, Unsloth's, flash-attn's fused norms and MLP) promise fused blocks: tuneforge gets those by
compiling each transformer block, so a switch that is on turns `torch_compile` on (auto: on CUDA where it pays) with a
note, and an explicit `torch_compile: false` is kept and said to leave them unfused. Nothing that
promises speed or memory is dropped silently.
"""

from __future__ import annotations

from typing import Any

FUSED_LOSS = ("the loss is always computed a chunk of trained positions at a time, fused with the LM head, "
              "without the full logits tensor (models/losses.py)")

# Plugin class name -> (accepted, what replaces it or what to do instead).
PLUGINS: dict[str, tuple[bool, str]] = {
    "LigerPlugin": (True, "Liger's fused loss is built in (" + FUSED_LOSS + "); its fused norms, RoPE and "
                          "activations come from torch_compile, which its liger_* switches turn on"),
    "CutCrossEntropyPlugin": (True, "cut cross-entropy is built in: " + FUSED_LOSS),
    "SpectrumPlugin": (False, "list the modules to train in unfrozen_parameters (full fine-tuning of chosen "
                              "layers) or use adapter: lora"),
    "KDPlugin": (False, "knowledge distillation is not implemented; remove the plugin and its kd_* keys"),
    "GrokfastPlugin": (False, "Grokfast is not implemented; remove the plugin and its grokfast_* keys"),
    "LMEvalPlugin": (False, "run lm-eval on the saved model after training; remove the plugin and lm_eval_* keys"),
    "LLMCompressorPlugin": (False, "LLM Compressor's sparse fine-tuning is not implemented; remove the plugin and "
                                   "its llmcompressor block: fine-tune densely here, then sparsify or quantize the "
                                   "result with LLM Compressor"),
    "KernelsPlugin": (True, "its mixture-of-experts kernels are replaced by transformers' grouped GEMM over all "
                            "experts (experts_implementation: grouped_mm) and its fused layers by torch_compile, "
                            "which use_kernels turns on"),
    "MoraPlugin": (False, "MoRA adapters are not implemented; remove the plugin and use adapter: lora"),
    "NemoGymPlugin": (False, "NeMo Gym environments are not supported; remove the plugin and use rl: grpo with "
                             "reward functions (trl.reward_funcs)"),
    "DenseMixerPlugin": (False, "DenseMixer routing is not implemented; remove the plugin"),
    "HatcheryPlugin": (False, "remote training backends are not supported; remove the plugin and train locally"),
    "SwanLabPlugin": (True, "SwanLab logging is built in: it turns use_swanlab on (unless the config sets it), and "
                            "the swanlab_* keys apply (pip install swanlab)"),
    "DiffusionPlugin": (False, "diffusion language-model training is not implemented; remove the plugin and the "
                               "diffusion block to train the model as a causal LM (next-token loss) on the same data"),
    "DionPlugin": (False, "the Dion optimizer is not available; remove it and use optimizer: adamw_torch_fused"),
    "EBFTPlugin": (False, "EBFT is not implemented; remove it"),
    "ExpertParallelPlugin": (False, "expert parallelism is not implemented; remove it and expert_parallel_size "
                                    "(several GPUs train data-parallel with torchrun)"),
}

# Switches that ask for fused norms, RoPE, activations, MLP or LoRA projections: tuneforge has no
# hand-written kernels for them; compiling each transformer block (its LoRA layers included) fuses them.
# (Axolotl's lora_mlp_kernel / lora_qkv_kernel / lora_o_kernel are real keys: config/adapter.py.)
FUSION_SWITCHES = (
    "unsloth_lora_mlp", "unsloth_lora_qkv", "unsloth_lora_o",
    "liger_rope", "liger_rms_norm", "liger_layer_norm", "liger_glu_activation", "liger_swiglu",
    "liger_rms_norm_gated", "unsloth_rms_norm", "unsloth_rope", "flash_attn_rms_norm", "flash_attn_fuse_mlp",
    "flash_attn_fuse_qkv", "fused_attn_kernel", "use_kernels",
)


def plugin_name(path: str) -> str:
    """The class name of an Axolotl plugin path (`axolotl.integrations.liger.LigerPlugin` -> LigerPlugin)."""
    return str(path).rpartition(".")[2]


def check_plugins(value: Any) -> tuple[list[str], list[str]]:
    """Notes for accepted plugins and refusals (one message each) for the rest."""
    notes: list[str] = []
    refused: list[str] = []
    for path in value if isinstance(value, list) else [value]:
        name = plugin_name(path)
        known = PLUGINS.get(name)
        if known is None:
            names = ", ".join(sorted(PLUGINS))
            refused.append(f"unknown plugin `{path}`: tuneforge runs no plugin code; the Axolotl plugins it knows "
                           f"are {names}. Remove it")
        elif known[0]:
            notes.append(f"plugin `{path}` is not needed: {known[1]}")
        else:
            refused.append(f"plugin `{path}` is not supported here: {known[1]}")
    return notes, refused


def apply_fusion_switches(raw: dict[str, Any]) -> list[str]:
    """Pop the fusion switches; when any is on, turn torch_compile on (unless the config turns it off)."""
    on = [key for key in FUSION_SWITCHES if key in raw and raw.pop(key)]
    if not on:
        return []
    names = ", ".join(f"`{k}`" for k in on)
    if raw.get("torch_compile") is False:
        return [f"{names}: tuneforge fuses norms, RoPE and activations by compiling each transformer block, and "
                "`torch_compile: false` keeps them unfused; remove it to get the fusion"]
    if raw.get("torch_compile") in (None, "auto"):
        raw["torch_compile"] = "auto"
        return [f"{names}: fused by compiling each transformer block instead; torch_compile: auto is on "
                "(compiles on CUDA when the model and the run are large enough to repay the compile time)"]
    return [f"{names}: fused by torch_compile (on), which compiles each transformer block"]
