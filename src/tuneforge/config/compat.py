"""Axolotl compatibility: deprecated aliases, switches for what tuneforge always does, and keys it lacks.

Plugins and kernel switches are in plugins.py; Axolotl's full key list is in axolotl_keys.py.
"""

from __future__ import annotations

from typing import Any

from .plugins import FUSED_LOSS

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
    "adam_eps": "adam_epsilon",
    "noisy_embedding_alpha": "neftune_noise_alpha",
    "dpo_beta": "rl_beta",
    "evaluation_strategy": "eval_strategy",
    "eval_table_max_new_tokens": "generation_max_new_tokens",
    "revision_of_model": "model_revision",
    "relora_warmup_steps": "jagged_restart_warmup_steps",  # Axolotl's older ReLoRA names
    "relora_anneal_steps": "jagged_restart_anneal_steps",
    "pretrain_multipack_buffer_size": "streaming_multipack_buffer_size",
}

# Axolotl dataset type names that are another name of a tuneforge format (rows of the same shape).
DATASET_TYPES = {"orpo.chat_template": "chat_template.argilla"}

# max-autotune captures CUDA graphs, which per-block compilation cannot: the same tuning without them.
# (reduce-overhead is nothing but CUDA graphs, so it stays refused.)
COMPILE_MODES = {"max-autotune": "max-autotune-no-cudagraphs"}

# Keys Axolotl reads that carry no meaning here (we are always strict, single-process logging).
IGNORED = {"strict", "local_rank", "debug", "hf_use_auth_token", "sample_packing_eff_est", "total_num_tokens",
           "is_preprocess", "eval_table_size", "include_tokens_per_second", "total_supervised_tokens",
           "axolotl_config_path", "world_size", "is_falcon_derived_model", "is_llama_derived_model",
           "is_mistral_derived_model", "is_qwen_derived_model",
           # Axolotl's default (true) for how FSDP sharding places weights; tuneforge has one way to load
           "experimental_skip_move_to_device"}

# Axolotl switches for what tuneforge always does (or has no use for): accepted, with a note when set.
_FUSED_LOSS = FUSED_LOSS
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
    "chunked_cross_entropy_num_chunks": _FUSED_LOSS,
    "torchdistx_path": "models load through transformers; torchdistx's deferred initialisation is not used",
    "tokenizer_save_jinja_files": "the chat template is saved in the tokenizer's config with the model",
    "ddp": "data-parallel training is used whenever tuneforge is launched with torchrun",
    "gemma4_hybrid_attn_impl": "every layer uses attn_implementation",
    "xformers_attention": "attention uses attn_implementation (sdpa by default; packed rows attend per document)",
    "cls_model_config": "the model's config class comes from its config.json (model_type)",
    "sample_packing_seq_len_multiplier": "packing fills each row of a micro-batch up to sequence_len",
    "base_model_ignore_patterns": "transformers reads the model's safetensors weights when it has them",
    "flex_attn_compile_kwargs": "transformers compiles flex attention's kernel with its own settings",
    "tokenizer_use_mistral_common": "the model's Hugging Face tokenizer (tokenizer.json) is used, which Mistral "
                                    "models ship as well; a model that ships only tekken.json fails at load: convert "
                                    "it with transformers first",
    "test_value": "it is not an Axolotl key either (a stray key in one of Axolotl's examples; Axolotl drops keys "
                  "it does not know)",
    "eta_min": "it is not an Axolotl key either (Axolotl ignores it); a floor for the cosine schedule is "
               "cosine_min_lr_ratio",
    "hub_model_id": "nothing is pushed to the hub (no hub access is assumed); upload output_dir afterwards "
                    "with `huggingface-cli upload`",
    "hub_strategy": "nothing is pushed to the hub; upload output_dir afterwards with `huggingface-cli upload`",
    "embeddings_skip_upcast": "a bf16 QLoRA model keeps its embeddings, head and norms in bf16 already "
                              "(kbit_fp32_unquantized: true casts them to fp32, as PEFT's preparation does)",
}

# Axolotl's non-AMP dtype switches (`bfloat16: true` loads and trains the weights in that dtype): torch_dtype.
DTYPE_SWITCHES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}

# Axolotl keys that tuneforge does not implement yet. A falsy value (false, null, empty) is a no-op and
# is accepted; anything else is an explicit error rather than a silently ignored setting.
NOT_SUPPORTED_YET = {
    "lora_embedding_kernel": "fused LoRA kernels are planned",
    "push_dataset_to_hub": "pushing to the hub is not implemented",
    "processor_type": "multimodal models are not supported yet",
    "context_parallel_size": "context parallelism is not implemented",
    "sequence_parallel_degree": "context parallelism is not implemented",
    "tensor_parallel_size": "tensor parallelism is not implemented",
    "use_comet": "Comet logging is not implemented; use wandb, mlflow or tensorboard",
    "use_trackio": "Trackio logging is not implemented; use wandb, mlflow or tensorboard",
    "use_otel_metrics": "OpenTelemetry metrics are not implemented (the metrics are in output_dir/metrics.jsonl; "
                        "use_tensorboard, wandb_project, use_mlflow or use_swanlab send them to a tracker)",
    "lm_eval_tasks": "lm-eval integration is not implemented",
    "do_bench_eval": "benchmark evaluation is not implemented",
    "tiled_mlp": "tiled MLP is not implemented",
    "sage_attention": "SageAttention is not supported; use attn_implementation: sdpa",
    "s2_attention": "shifted sparse attention is not supported",
    "added_tokens_overrides": "renaming reserved tokens is not implemented; use `tokens`",
    "gpu_memory_limit": "memory caps are not implemented",
    "max_memory": "memory caps are not implemented",
    "use_ray": "Ray is not supported (`tuneforge train` starts one process per visible GPU itself: --num-processes "
               "N; several machines: --nnodes, --node-rank, --rdzv-endpoint)",
    "multipack_real_batches": "packing always builds full micro-batches",
    "flash_optimum": "optimum's BetterTransformer is not used (its fused attention is PyTorch's scaled_dot_product_"
                     "attention, which attn_implementation: sdpa, the default, uses)",
    "special_tokens_overrides": "not implemented",
}


def is_noop(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {} or value == ""
