"""Axolotl compatibility: deprecated aliases and keys we know but do not support yet."""

from __future__ import annotations

from typing import Any

# Boolean attention flags Axolotl deprecated in favour of `attn_implementation`.
ATTENTION_FLAGS = {
    "flash_attention": "flash_attention_2",
    "sdp_attention": "sdpa",
    "flex_attention": "flex_attention",
    "eager_attention": "eager",
}

# Renamed keys: old name -> current name.
RENAMED = {
    "dataset_processes": "dataset_num_proc",
    "model_config_overrides": "model_config",
    "eval_max_new_tokens": "generation_max_new_tokens",  # Axolotl's older key for do_causal_lm_eval's length
}

# Keys Axolotl reads that carry no meaning here (we are always strict, single-process logging).
IGNORED = {"strict", "local_rank", "debug", "hf_use_auth_token", "sample_packing_eff_est", "total_num_tokens",
           "is_preprocess", "eval_table_size", "include_tokens_per_second"}

# Axolotl switches for what tuneforge always does (or has no use for): accepted, with a note when set.
_FUSED_LOSS = ("the loss is always computed a chunk of trained positions at a time, fused with the LM head, "
               "without the full logits tensor (models/losses.py)")
_NO_LOADER = ("batches are gathered in the training process from the memory-mapped prepared dataset, without "
              "loader workers")
BUILT_IN = {
    "chunked_cross_entropy": _FUSED_LOSS,
    "cut_cross_entropy": _FUSED_LOSS,
    "liger_cross_entropy": _FUSED_LOSS,
    "liger_fused_linear_cross_entropy": _FUSED_LOSS,
    "flash_attn_cross_entropy": _FUSED_LOSS,
    "unsloth_cross_entropy_loss": _FUSED_LOSS,
    "sdpa_varlen": "packed rows always attend per document (varlen kernels on CUDA)",
    "lora_on_cpu": "`tuneforge merge-lora` merges on the CPU, shard by shard",
    "merge_method": "`tuneforge merge-lora` always merges shard by shard (Axolotl's memory_efficient)",
    "dataloader_num_workers": _NO_LOADER,
    "dataloader_prefetch_factor": _NO_LOADER,
    "dataloader_pin_memory": _NO_LOADER,
}

_LIGER = "Liger kernels are not used; `torch_compile: true` fuses each block's norms, RoPE and activation instead"

# Axolotl keys that tuneforge does not implement yet. A falsy value (false, null, empty) is a no-op and
# is accepted; anything else is an explicit error rather than a silently ignored setting.
NOT_SUPPORTED_YET = {
    "pretraining_dataset": "streaming continual pretraining is planned; use `type: completion` for now",
    "streaming": "streaming datasets are planned",
    "plugins": "plugins are not supported; for the Liger plugin's fusions use torch_compile: true (the loss is "
               "already fused)",
    "liger_rope": _LIGER,
    "liger_rms_norm": _LIGER,
    "liger_glu_activation": _LIGER,
    "liger_swiglu": _LIGER,
    "liger_layer_norm": _LIGER,
    "relora": "ReLoRA is not implemented",
    "relora_steps": "ReLoRA is not implemented",
    "jagged_restart_steps": "ReLoRA is not implemented",
    "lora_mlp_kernel": "fused LoRA kernels are planned",
    "lora_qkv_kernel": "fused LoRA kernels are planned",
    "lora_o_kernel": "fused LoRA kernels are planned",
    "lora_embedding_kernel": "fused LoRA kernels are planned",
    "hub_model_id": "pushing to the hub is not implemented (no hub access is assumed)",
    "hub_strategy": "pushing to the hub is not implemented",
    "push_dataset_to_hub": "pushing to the hub is not implemented",
    "gptq": "GPTQ bases are not supported",
    "processor_type": "multimodal models are not supported yet",
    "context_parallel_size": "context parallelism is not implemented",
    "sequence_parallel_degree": "context parallelism is not implemented",
    "tensor_parallel_size": "tensor parallelism is not implemented",
    "dp_shard_size": "N-D parallelism is not implemented",
    "dp_replicate_size": "N-D parallelism is not implemented",
    "fp8": "FP8 training is not implemented",
    "qat": "quantization-aware training is not implemented",
    "quantization": "post-training quantization is not implemented",
    "use_comet": "Comet logging is not implemented; use wandb, mlflow or tensorboard",
    "use_trackio": "Trackio logging is not implemented; use wandb, mlflow or tensorboard",
    "use_otel_metrics": "OpenTelemetry metrics are not implemented",
    "lm_eval_tasks": "lm-eval integration is not implemented",
    "do_bench_eval": "benchmark evaluation is not implemented",
    "activation_offloading": "activation offloading is not implemented",
    "tiled_mlp": "tiled MLP is not implemented",
    "xformers_attention": "xformers attention is not supported; use attn_implementation: sdpa",
    "sage_attention": "SageAttention is not supported; use attn_implementation: sdpa",
    "s2_attention": "shifted sparse attention is not supported",
    "added_tokens_overrides": "renaming reserved tokens is not implemented; use `tokens`",
    "ebft": "EBFT is planned",
    "gpu_memory_limit": "memory caps are not implemented",
    "max_memory": "memory caps are not implemented",
    "use_ray": "Ray is not supported",
    "multipack_real_batches": "packing always builds full micro-batches",
    "pretrain_multipack_attn": "streaming pretraining is planned",
    "flash_attn_rms_norm": "fused norms are planned",
    "flash_attn_fuse_qkv": "fused attention projections are planned",
    "flash_attn_fuse_mlp": "fused MLP is planned",
    "flash_optimum": "BetterTransformer is not supported",
    "unsloth_lora_mlp": "Unsloth patches are not supported",
    "unsloth_lora_qkv": "Unsloth patches are not supported",
    "unsloth_lora_o": "Unsloth patches are not supported",
    "special_tokens_overrides": "not implemented",
}


def is_noop(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {} or value == ""
