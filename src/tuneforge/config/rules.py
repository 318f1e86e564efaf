"""Cross-field rules, checked before anything is loaded. Each names the keys and the fix."""

from __future__ import annotations

import re
from collections.abc import Callable

from . import distributed, quantization
from .errors import ConfigIssue
from .methods import method_facts, method_key
from .rl import KV_CACHE_DTYPES
from .schema import Config

Rule = Callable[[Config], list[ConfigIssue]]
_RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    _RULES.append(fn)
    return fn


def check(cfg: Config) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    for fn in _RULES:
        issues.extend(fn(cfg))
    return issues


def _exclusive(cfg: Config, a: str, b: str, fix: str) -> list[ConfigIssue]:
    va, vb = getattr(cfg, a), getattr(cfg, b)
    if va not in (None, 0, 0.0, [], False) and vb not in (None, 0, 0.0, [], False):
        return [ConfigIssue(b, f"`{a}` and `{b}` cannot both be set; {fix}")]
    return []


@rule
def _sharding(cfg: Config) -> list[ConfigIssue]:
    return distributed.check(cfg)


@rule
def _exclusive_pairs(cfg: Config) -> list[ConfigIssue]:
    return (
        _exclusive(cfg, "warmup_steps", "warmup_ratio", "keep one of them.")
        + _exclusive(cfg, "val_set_size", "test_datasets", "hold out from the training data or give test_datasets, not both.")
        + _exclusive(cfg, "save_steps", "saves_per_epoch", "keep one of them.")
        + _exclusive(cfg, "eval_steps", "evals_per_epoch", "keep one of them.")
        + _exclusive(cfg, "gradient_accumulation_steps", "batch_size", "batch_size = micro_batch_size x gradient_accumulation_steps; give one.")
        + _exclusive(cfg, "load_in_8bit", "load_in_4bit", "pick one quantization.")
        + _exclusive(cfg, "embedding_lr", "embedding_lr_scale", "give the rate or its scale, not both.")
        + _exclusive(cfg, "sample_packing", "group_by_length", "packing already fills rows without padding.")
        + _exclusive(cfg, "curriculum_sampling", "group_by_length", "rows come in dataset order or grouped by "
                     "length, not both.")
    )


@rule
def _quantization(cfg: Config) -> list[ConfigIssue]:
    issues = []
    if cfg.adapter == "qlora" and not cfg.load_in_4bit:
        issues.append(ConfigIssue("adapter", "`adapter: qlora` needs `load_in_4bit: true` (or use `adapter: lora`)."))
    if cfg.adapter == "qlora" and cfg.load_in_8bit:
        issues.append(ConfigIssue("load_in_8bit", "`adapter: qlora` is 4-bit; remove `load_in_8bit`."))
    if (cfg.load_in_4bit or cfg.load_in_8bit) and cfg.adapter is None:
        issues.append(
            ConfigIssue(
                "load_in_4bit" if cfg.load_in_4bit else "load_in_8bit",
                "quantized weights cannot be fully fine-tuned; add `adapter: qlora` (4-bit) or `adapter: lora`.",
            )
        )
    return issues + _quantized_experts(cfg)


def _quantized_experts(cfg: Config) -> list[ConfigIssue]:
    if not cfg.quantize_moe_experts:
        return []
    if cfg.adapter is None:
        return [ConfigIssue("quantize_moe_experts", "quantized expert weights stay frozen; add `adapter: qlora` "
                            "(with load_in_4bit) or `adapter: lora`, or remove quantize_moe_experts to fine-tune all "
                            "weights.")]
    if cfg.lora_target_parameters:
        return [ConfigIssue("lora_target_parameters", "LoRA on the expert weights (lora_target_parameters) cannot "
                            "be combined with quantize_moe_experts yet: PEFT's parameter LoRA does not compose with "
                            "quantized experts. Remove lora_target_parameters (LoRA then trains the attention and "
                            "shared layers), or remove quantize_moe_experts to train LoRA on 16-bit experts.")]
    return []


@rule
def _low_precision_training(cfg: Config) -> list[ConfigIssue]:
    return quantization.check(cfg)


@rule
def _cosine_constant(cfg: Config) -> list[ConfigIssue]:
    if cfg.cosine_constant_lr_ratio and cfg.lr_scheduler not in ("cosine", "cosine_with_min_lr"):
        return [ConfigIssue("cosine_constant_lr_ratio", f"shapes the cosine schedule; lr_scheduler is "
                            f"{cfg.lr_scheduler}: remove it or use lr_scheduler: cosine.")]
    return []


@rule
def _precision(cfg: Config) -> list[ConfigIssue]:
    if cfg.bf16 is True and cfg.fp16:
        return [ConfigIssue("fp16", "`bf16: true` and `fp16: true` conflict; keep one.")]
    return _kahan(cfg)


def _kahan(cfg: Config) -> list[ConfigIssue]:
    if cfg.bf16_master_weights != "kahan":
        return []
    key, fix = "bf16_master_weights", None
    if cfg.adapter:
        fix = "applies to full fine-tuning (adapter weights are fp32 already); remove it"
    elif cfg.optimizer not in ("adamw_torch", "adamw_torch_fused", "adamw", "optimi_adamw"):
        fix = f"kahan is an AdamW (torch-optimi); use optimizer: adamw_torch_fused, not {cfg.optimizer}"
    elif cfg.torch_dtype not in (None, "auto", "bfloat16") or cfg.fp16:
        fix = "kahan keeps bf16 weights; remove torch_dtype / fp16"
    return [ConfigIssue(key, f"bf16_master_weights: kahan {fix}.")] if fix else []


def _unfrozen_with_adapter(patterns: list[str]) -> str:
    """Axolotl applies unfrozen_parameters to the adapter-wrapped model (names `base_model.model.<name>`,
    LoRA weights included) and freezes every parameter that does not match: patterns anchored at a plain
    name freeze everything, LoRA too, and base weights that do match train but are not saved in the adapter."""
    plain = [p for p in patterns if (m := re.match(r"\^(\w+)", p)) and not "base_model".startswith(m.group(1))]
    why = (f"{', '.join(f'`{p}`' for p in plain)} start at the plain model's names, which the wrapped names never "
           "do, so Axolotl would freeze every parameter, LoRA's included, and train nothing" if plain else
           "Axolotl would freeze every other parameter, LoRA's included, and base weights that match would train "
           "without being saved in the adapter")
    return ("with an adapter, these patterns are matched against the adapter-wrapped parameter names "
            f"(`base_model.model.<name>`): {why}. tuneforge refuses the combination: remove unfrozen_parameters "
            "(LoRA trains its own weights only); to keep LoRA off part of the model, give lora_target_modules a "
            "regex (e.g. `model.language_model.*(q|k|v|o)_proj`); to train whole modules with the adapter, list "
            "them in lora_modules_to_save; or remove the adapter for a full fine-tune of the matching parameters.")


@rule
def _adapter_keys(cfg: Config) -> list[ConfigIssue]:
    issues = []
    if cfg.adapter and cfg.unfrozen_parameters:
        issues.append(ConfigIssue("unfrozen_parameters", _unfrozen_with_adapter(cfg.unfrozen_parameters)))
    if cfg.lora_model_dir and not cfg.adapter:
        issues.append(ConfigIssue("lora_model_dir", "needs `adapter: lora` or `adapter: qlora`."))
    if (cfg.adapter and cfg.lora_target_modules is None and not cfg.lora_target_linear and not cfg.lora_model_dir
            and not cfg.lora_target_parameters):
        issues.append(
            ConfigIssue("lora_target_modules", "no LoRA targets: set `lora_target_linear: true` or list lora_target_modules.")
        )
    if cfg.lora_target_parameters:
        # PEFT's LoRA on parameters (ParamWrapper) refuses these
        for key, why in (("lora_dropout", "set it to 0"), ("peft_use_dora", "remove it"),
                         ("lora_fan_in_fan_out", "remove it")):
            if getattr(cfg, key):
                issues.append(ConfigIssue(key, f"LoRA on parameters (lora_target_parameters) does not support it; {why}."))
    if cfg.loraplus_lr_ratio is not None and not cfg.adapter:
        issues.append(ConfigIssue("loraplus_lr_ratio", "LoRA+ needs `adapter: lora` or `adapter: qlora`."))
    if cfg.peft_use_dora and cfg.adapter == "qlora":
        pass  # PEFT supports DoRA on 4-bit layers; nothing to forbid.
    return issues


@rule
def _data(cfg: Config) -> list[ConfigIssue]:
    issues = []
    if cfg.val_set_size >= 1 and cfg.val_set_size != int(cfg.val_set_size):
        issues.append(ConfigIssue("val_set_size", "a value >= 1 is a row count and must be a whole number."))
    if cfg.min_sample_len and cfg.min_sample_len > cfg.sequence_len:
        issues.append(ConfigIssue("min_sample_len", f"is larger than sequence_len ({cfg.sequence_len}); every row would be dropped."))
    for i, entry in enumerate(cfg.datasets or []):
        if entry.shards_idx is not None and entry.shards and entry.shards_idx >= entry.shards:
            issues.append(ConfigIssue(f"datasets.{i}.shards_idx", f"must be below shards ({entry.shards})."))
    return issues


@rule
def _streaming(cfg: Config) -> list[ConfigIssue]:
    """Streamed data (pretraining_dataset, streaming: true) has no length known in advance: the run length is
    max_steps, evaluation data is separate, and only the SFT objective reads it (data/streaming.py)."""
    key = "pretraining_dataset" if cfg.pretraining_dataset else "streaming" if cfg.streaming else None
    if key is None:
        return []
    issues = []
    if not cfg.max_steps:
        issues.append(ConfigIssue(key, "a stream has no length known in advance: set max_steps (optimizer steps to "
                                  "train) as well."))
    if cfg.val_set_size:
        issues.append(ConfigIssue("val_set_size", f"cannot hold rows out of a stream ({key}); give evaluation data "
                                  "as test_datasets instead."))
    if cfg.pretraining_dataset and cfg.datasets:
        issues.append(ConfigIssue("datasets", "pretraining_dataset is the training data, so `datasets:` would not be "
                                  "used; remove one of them (evaluation data goes in test_datasets)."))
    if cfg.streaming and not cfg.pretraining_dataset and not cfg.datasets:
        issues.append(ConfigIssue("streaming", "there is nothing to stream: add `datasets:` (or pretraining_dataset)."))
    if cfg.rl or cfg.reward_model or cfg.process_reward_model:
        issues.append(ConfigIssue(key, "streamed data trains the SFT objective only; remove rl/reward_model/"
                                  "process_reward_model, or prepare the data beforehand (no streaming)."))
    return issues


@rule
def _methods(cfg: Config) -> list[ConfigIssue]:
    issues = []
    if cfg.rl and (cfg.reward_model or cfg.process_reward_model):
        issues.append(ConfigIssue("rl", "`rl` and reward_model/process_reward_model select different trainers; keep one."))
    if cfg.reward_model and cfg.process_reward_model:
        issues.append(ConfigIssue("process_reward_model", "choose reward_model or process_reward_model, not both."))
    supervised = method_facts(cfg).supervised
    if cfg.neftune_noise_alpha and not supervised:
        issues.append(ConfigIssue("neftune_noise_alpha", "NEFTune applies to supervised fine-tuning only; remove it "
                                  "(its noise would also reach the reference and reward forwards)."))
    issues.extend(_model_head(cfg))
    if cfg.rl == "simpo" and cfg.warmup_ratio:
        issues.append(ConfigIssue("warmup_ratio", "SimPO runs take warmup_steps, not warmup_ratio."))
    if cfg.rl == "ipo" and cfg.dpo_label_smoothing:
        issues.append(ConfigIssue("dpo_label_smoothing", "IPO does not use label smoothing; remove it."))
    if cfg.dpo_loss_weights and cfg.dpo_loss_type and len(cfg.dpo_loss_weights) != len(cfg.dpo_loss_type):
        issues.append(ConfigIssue("dpo_loss_weights", "needs one weight per entry of dpo_loss_type."))
    trl = cfg.trl
    if trl and trl.reward_weights and trl.reward_funcs and len(trl.reward_weights) != len(trl.reward_funcs):
        issues.append(ConfigIssue("trl.reward_weights", "needs one weight per entry of trl.reward_funcs."))
    kv_dtype = ((trl.generation_kwargs if trl else None) or {}).get("kv_cache_dtype", "auto")
    if kv_dtype not in KV_CACHE_DTYPES:
        issues.append(ConfigIssue("trl.generation_kwargs.kv_cache_dtype",
                                  f"{kv_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)} (fp8 = float8_e4m3fn)."))
    return issues


def _model_head(cfg: Config) -> list[ConfigIssue]:
    """A reward model trains a classification head; the config may only repeat it (rl.py fills it in)."""
    head = method_facts(cfg).head
    if head is None:
        return []
    key = method_key(cfg)
    if cfg.model_type is not None and cfg.model_type != head.model_type:
        return [ConfigIssue("model_type", f"`{key}` trains a {head.model_type}; got {cfg.model_type}.")]
    if cfg.num_labels is not None and cfg.num_labels != head.num_labels:
        return [ConfigIssue("num_labels", f"`{key}` needs num_labels: {head.num_labels}, got {cfg.num_labels}.")]
    return []


@rule
def _eval_schedule(cfg: Config) -> list[ConfigIssue]:
    issues = []
    has_eval = bool(cfg.val_set_size) or bool(cfg.test_datasets)
    # eval_steps / evals_per_epoch without evaluation data: dropped with a note before validation, as
    # Axolotl ignores them (apply_compat._evaluation_without_data).
    supervised = method_facts(cfg).supervised
    if cfg.batch_flattening and not supervised:
        issues.append(ConfigIssue("batch_flattening", "applies to supervised fine-tuning; preference data packs "
                                  "whole pairs with sample_packing: true."))
    if cfg.generate_samples and not supervised:
        issues.append(ConfigIssue("generate_samples", "shows samples of supervised fine-tuning only (GRPO logs its "
                                  "completions with trl.log_completions); remove it."))
    if cfg.do_causal_lm_eval and not supervised:
        issues.append(ConfigIssue("do_causal_lm_eval", "scores generations of supervised fine-tuning only; remove it."))
    if cfg.do_causal_lm_eval and "comet" in cfg.eval_causal_lm_metrics:
        issues.append(ConfigIssue("eval_causal_lm_metrics", "comet scores with a neural model downloaded from the "
                                  "Hugging Face Hub, which tuneforge does not fetch during training; remove it "
                                  "(sacrebleu, chrf and ter are computed offline)."))
    for key in ("early_stopping_patience", "load_best_model_at_end", "generate_samples", "do_causal_lm_eval"):
        if getattr(cfg, key) and (not has_eval or cfg.eval_strategy == "no"):
            fix = "remove eval_strategy: no" if has_eval else "set val_set_size or test_datasets"
            issues.append(ConfigIssue(key, f"needs evaluations to compare: {fix}."))
    if cfg.save_strategy == "best" and (not has_eval or cfg.eval_strategy == "no"):
        fix = "remove eval_strategy: no" if has_eval else "set val_set_size or test_datasets"
        issues.append(ConfigIssue("save_strategy", f"best saves a checkpoint when metric_for_best_model improves at "
                                  f"an evaluation, and this run has none: {fix}, or choose save_strategy: steps."))
    return issues


@rule
def _checkpointed_layers(cfg: Config) -> list[ConfigIssue]:
    if cfg.gradient_checkpointing_layers is None or cfg.gradient_checkpointing:
        return []
    return [ConfigIssue("gradient_checkpointing_layers", "it says how many layers gradient checkpointing covers; "
                        "add gradient_checkpointing: true, or remove it")]


@rule
def _selective_checkpointing(cfg: Config) -> list[ConfigIssue]:
    sac, key = cfg.selective_checkpointing, "selective_checkpointing"
    if sac is False:
        return []
    if not cfg.gradient_checkpointing:
        return [ConfigIssue(key, "selective checkpointing chooses what gradient checkpointing recomputes; add "
                            "gradient_checkpointing: true")]
    if (cfg.gradient_checkpointing_kwargs or {}).get("use_reentrant"):
        return [ConfigIssue("gradient_checkpointing_kwargs", "selective checkpointing needs non-reentrant "
                            "checkpointing; remove use_reentrant: true")]
    if cfg.torch_compile is True:
        return [ConfigIssue("torch_compile", "selective checkpointing decides op by op as the block runs, which "
                            "a compiled block hides; use torch_compile: false (or auto) with it, or drop it")]
    if sac is not True and sac.offload:
        return [ConfigIssue(f"{key}.offload", "offloading the kept outputs to CPU memory is not implemented; "
                            "remove it (they stay in GPU memory), or use activation_offloading: true")]
    return []


@rule
def _recompute_elementwise(cfg: Config) -> list[ConfigIssue]:
    if not cfg.torch_compile_recompute_elementwise or cfg.torch_compile is not False:
        return []
    return [ConfigIssue("torch_compile_recompute_elementwise", "it tells the compiler what to keep for the backward "
                        "pass; add torch_compile: true (or auto), or remove it")]
