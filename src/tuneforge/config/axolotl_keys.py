"""Axolotl's key names, so that a real Axolotl key tuneforge lacks is told apart from a typo.

The names are Axolotl's configuration schema fields (its `utils/schemas/` models: model, training, PEFT,
datasets, integrations, deprecated and remapped keys) and the arguments of the plugins its examples use.
They are facts about Axolotl's file format, listed here so that `load` can say "Axolotl key, not supported
here yet: ..., do X instead" rather than a misleading did-you-mean. `ADVICE` says what to do instead, by
key or by prefix; keys without advice get the generic one.
"""

from __future__ import annotations

# Top-level keys of Axolotl's schema (AxolotlInputConfig and its parts).
_SCHEMA = """
strict resume_from_checkpoint auto_resume_from_checkpoints resize_token_embeddings_to_32x
mean_resizing_embeddings shrink_embeddings embeddings_skip_upcast rl trl vllm qat quantization reward_model
process_reward_model num_labels dpo_use_weighting dpo_use_logits_to_keep dpo_label_smoothing dpo_loss_type
dpo_loss_weights dpo_padding_free dpo_generate_during_eval dpo_norm_loss datasets test_datasets
shuffle_merged_datasets shuffle_before_merging_datasets dataset_prepared_path dataset_shard_num
dataset_shard_idx skip_prepare_dataset num_dataset_shards_to_save pretraining_dataset dataset_processes
dataset_num_proc dataset_exact_deduplication dataset_keep_in_memory dataloader_pin_memory
dataloader_num_workers dataloader_prefetch_factor dataloader_drop_last accelerator_config
remove_unused_columns push_dataset_to_hub hf_use_auth_token device device_map world_size local_rank ddp
seed ddp_timeout ddp_bucket_cap_mb ddp_broadcast_buffers ddp_find_unused_parameters eval_table_size
eval_max_new_tokens do_causal_lm_eval eval_causal_lm_metrics do_bench_eval bench_dataset bench_split
metric_for_best_model greater_is_better loss_watchdog_threshold loss_watchdog_patience gc_steps bf16 fp16
fp8 fp8_enable_fsdp_float8_all_gather bfloat16 float16 tf32 float32 gradient_checkpointing
gradient_checkpointing_kwargs selective_checkpointing activation_offloading unfrozen_parameters sequence_len eval_sequence_len
min_sample_len max_prompt_len sample_packing sample_packing_group_size sample_packing_bin_size
sample_packing_sequentially sample_packing_mp_start_method eval_sample_packing pad_to_sequence_len
pad_to_multiple_of curriculum_sampling multipack_real_batches pretraining_sample_concatenation
batch_flattening use_pose pose_split_on_token_ids pose_max_context_len pose_num_chunks
pretrain_multipack_buffer_size pretrain_multipack_attn streaming streaming_multipack_buffer_size
xformers_attention sdp_attention s2_attention flex_attention flex_attn_compile_kwargs flash_attention
flash_attn_cross_entropy flash_attn_rms_norm flash_attn_fuse_qkv flash_attn_fuse_mlp flash_optimum
eager_attention sage_attention attn_implementation unsloth_cross_entropy_loss unsloth_lora_mlp
unsloth_lora_qkv unsloth_lora_o unsloth_rms_norm unsloth_rope lora_mlp_kernel lora_qkv_kernel lora_o_kernel
lora_embedding_kernel chunked_cross_entropy chunked_cross_entropy_num_chunks tiled_mlp
tiled_mlp_num_shards tiled_mlp_use_original_mlp llama4_linearized_experts deepspeed fsdp fsdp_config
fsdp_version fsdp_final_state_dict_type val_set_size sequence_parallel_degree context_parallel_size
heads_k_stride ring_attn_func tensor_parallel_size dp_shard_size dp_replicate_size special_tokens tokens
added_tokens_overrides torch_compile torch_compile_backend torch_compile_mode max_steps warmup_steps
warmup_ratio eval_steps evals_per_epoch eval_strategy save_steps saves_per_epoch save_strategy
save_total_limit save_first_step save_only_model logging_steps early_stopping_patience
load_best_model_at_end use_tensorboard profiler_steps profiler_steps_start include_tokens_per_second
include_tkps neftune_noise_alpha orpo_alpha rpo_alpha simpo_gamma cpo_alpha kto_desirable_weight
kto_undesirable_weight rl_beta max_memory gpu_memory_limit low_cpu_mem_usage chat_template
chat_template_jinja chat_template_kwargs eot_tokens default_system_message fix_untrained_tokens
is_preprocess preprocess_iterable total_num_tokens total_supervised_tokens sample_packing_eff_est
axolotl_config_path is_falcon_derived_model is_llama_derived_model is_mistral_derived_model
is_qwen_derived_model plugins generate_samples num_generation_samples generation_max_new_tokens
generation_temperature generation_top_p generation_top_k generation_prompt_ratio generation_do_sample
dynamic_checkpoint torch_empty_cache_steps gc_collect_steps reinit_weights excess_length_strategy
base_model base_model_config cls_model_config tokenizer_config tokenizer_use_fast tokenizer_legacy
tokenizer_use_mistral_common tokenizer_type processor_type tokenizer_save_jinja_files trust_remote_code
experimental_skip_move_to_device use_kernels model_quantization_config model_quantization_config_kwargs
output_dir hub_model_id hub_strategy hub_revision hub_private_repo save_safetensors load_in_8bit load_in_4bit
adapter lora_model_dir lora_r lora_alpha lora_fan_in_fan_out lora_target_modules lora_target_parameters
lora_target_linear lora_modules_to_save lora_dropout peft_layers_to_transform peft_layers_pattern peft
peft_use_dora peft_use_rslora peft_layer_replication peft_init_lora_weights peft_trainable_token_indices
peft_ensure_weight_tying peft_autocast_adapter_dtype qlora_sharded_model_loading lora_on_cpu gptq
gptq_groupsize gptq_model_v1 gptq_disable_exllama bnb_config_kwargs loraplus_lr_ratio loraplus_lr_embedding
merge_lora merge_method relora relora_steps relora_warmup_steps relora_anneal_steps relora_prune_ratio
relora_prune_method relora_cpu_offload jagged_restart_steps jagged_restart_warmup_steps
jagged_restart_anneal_steps gradient_accumulation_steps micro_batch_size batch_size eval_batch_size
auto_find_batch_size train_on_inputs group_by_length learning_rate embedding_lr embedding_lr_scale
weight_decay optimizer optim_args optim_target_modules torchdistx_path lr_scheduler lr_scheduler_kwargs
lr_quadratic_warmup cosine_min_lr_ratio cosine_constant_lr_ratio lr_div_factor lr_groups adam_epsilon
adam_epsilon2 adam_beta1 adam_beta2 adam_beta3 max_grad_norm num_epochs use_wandb wandb_name wandb_run_id
wandb_mode wandb_project wandb_entity wandb_watch wandb_log_model use_mlflow mlflow_tracking_uri
mlflow_experiment_name mlflow_run_name hf_mlflow_log_artifacts use_comet comet_api_key comet_workspace
comet_project_name comet_experiment_key comet_mode comet_online comet_experiment_config use_trackio
trackio_project_name trackio_run_name trackio_space_id use_otel_metrics otel_metrics_host otel_metrics_port
lisa_n_layers lisa_step_interval lisa_layers_attribute gradio_title gradio_share gradio_server_name
gradio_server_port gradio_max_new_tokens gradio_temperature use_ray ray_run_name ray_num_workers
resources_per_worker image_size image_resize_algorithm max_packed_sequence_len rope_scaling
noisy_embedding_alpha dpo_beta evaluation_strategy model_config model_kwargs model_type model_revision
overrides_of_model_config overrides_of_model_kwargs type_of_model revision_of_model precompute_ref_log_probs
center_rewards_coefficient early_stopping_threshold dynamic_checkpoint kd_ce_alpha ebft
eval_table_max_new_tokens fused_attn_kernel torch_compile_options gemma4_hybrid_attn_impl adam_eps
use_dynamic_finetuning experts_implementation expert_parallel_size nvfp4_merge_aware quantize_moe_experts
"""

# Arguments of Axolotl's plugins (their `args.py`), set at the top level of a config.
_PLUGIN_ARGS = """
liger_rope liger_rms_norm liger_layer_norm liger_swiglu liger_glu_activation liger_cross_entropy
liger_fused_linear_cross_entropy liger_use_token_scaling liger_rms_norm_gated cut_cross_entropy
spectrum_top_fraction spectrum_model_name kd_trainer kd_ce_alpha kd_alpha kd_temperature
kd_zscore_base_temp kd_top_k_before_softmax kd_normalize_topk kd_beta kd_online_server_base_url
kd_online_topk kd_online_server kd_online_timeout kd_cache_dir kd_use_liger grokfast_alpha grokfast_lamb
lm_eval_tasks lm_eval_batch_size lm_eval_model llmcompressor dion_lr dion_momentum dion_rank_fraction
dion_rank_multiple_of dion_difference_clip llm_compressor use_scattermoe use_sonicmoe use_swanlab
swanlab_project swanlab_experiment_name swanlab_description swanlab_mode swanlab_workspace swanlab_api_key
swanlab_web_host swanlab_api_host swanlab_log_model swanlab_log_completions swanlab_completion_log_interval
swanlab_completion_max_buffer swanlab_lark_webhook_url swanlab_lark_secret diffusion use_eaft eaft_alpha eaft_k
expert_parallel_backend expert_parallel_num_nvl_bytes expert_parallel_num_rdma_bytes
expert_parallel_token_capacity expert_parallel_fallback_on_unsupported expert_backend nonexpert_quantization
moe_grouped_backend moe_dequant_chunk_size moe_bnb_fast use_dsv4_kernels use_glm_dsa_kernels
dsv4_fp8_nonexpert_mode dsv4_fp8_lora_kernel dsv4_shared_mlp_lora_kernel dsv4_bf16_all dsv4_fp4_grouped_mode
gemma4_fp8_nonexpert gemma4_nf4_nonexpert nvfp4_merge_aware_start_step use_mora mora_type mora nemo_gym_enabled
nemo_gym_dir nemo_gym_auto_clone nemo_gym_config_paths nemo_gym_head_port nemo_gym_server_timeout
nemo_gym_verify_timeout nemo_gym_run_timeout nemo_gym_datasets nemo_gym_auto_start nemo_gym_model_name
nemo_gym_multi_turn nemo_gym_max_turns dense_mixer lm_eval_post_train kd_temperature_min hatchery
"""

# Keys of Axolotl's `datasets:` entries (SFT, DPO, KTO, stepwise and pretraining datasets).
_DATASET = """
path split type input_transform shards shards_idx preprocess_shards conversation chat_template
chat_template_jinja data_files input_format name ds_type field field_human field_model field_messages
field_system field_tools field_thinking template_thinking_key message_field_role message_field_content
message_property_mappings message_field_training message_field_training_detail split_thinking
logprobs_field temperature roles_to_train train_on_eos train_on_eot roles drop_system_message
trust_remote_code revision step_separator max_completion_length train_on_last_step_only text_column skip
train_on_split
"""

SCHEMA_KEYS = frozenset(_SCHEMA.split())
PLUGIN_ARG_KEYS = frozenset(_PLUGIN_ARGS.split())
TOP_LEVEL = SCHEMA_KEYS | PLUGIN_ARG_KEYS
DATASET_KEYS = frozenset(_DATASET.split())

_GENERIC = "remove it; tuneforge has no equivalent yet"
_NVFP4 = ("merge-aware LoRA training on an NVFP4-quantized base is not supported (NVFP4 checkpoints do not load "
          "here); start from the bf16 model with adapter: lora, merge with `tuneforge merge-lora`, then quantize the "
          "merged model to NVFP4")
_RAY = ("Ray is not supported; remove it: `tuneforge train` starts one process per visible GPU itself "
        "(--num-processes N; several machines: --nnodes, --node-rank, --rdzv-endpoint)")
_OTEL = ("OpenTelemetry metrics are not implemented; remove it: the metrics are in output_dir/metrics.jsonl, and "
         "use_tensorboard, wandb_project, use_mlflow or use_swanlab send them to a tracker")
_LLMC = ("LLM Compressor's sparse fine-tuning is not implemented; remove it: fine-tune the model densely here, then "
         "sparsify or quantize the result with LLM Compressor")
_KERNELS = ("an option of Axolotl's mixture-of-experts kernels; remove it (experts run through transformers' "
            "experts_implementation)")

# What to do instead, by exact key, then by prefix (first match wins).
ADVICE = {
    "tokenizer_save_jinja_files": "remove it; the chat template is saved in the tokenizer's config",
    "model_quantization_config": "remove it; use load_in_4bit / load_in_8bit with adapter: qlora / lora",
    "hub_revision": "remove it; push the output folder yourself (huggingface-cli upload)",
    "hub_private_repo": "remove it; push the output folder yourself (huggingface-cli upload)",
    "peft_layers_pattern": "remove it; list modules in lora_target_modules (a regex is accepted)",
    "peft_layer_replication": "remove it",
    "optim_target_modules": "remove it; GaLore-style optimizers are not available",
    "eval_table_size": "use generate_samples: true and num_generation_samples",
    "image_size": "multimodal training is not supported; train a text-only model",
    "image_resize_algorithm": "multimodal training is not supported; train a text-only model",
    "spectrum_top_fraction": "list the modules to train in unfrozen_parameters",
    "spectrum_model_name": "list the modules to train in unfrozen_parameters",
    "use_pose": "remove it; set model_config rope scaling and train on long rows instead",
    "use_dynamic_finetuning": "remove it; the DFT loss is not implemented (the loss is plain cross-entropy)",
    "field_thinking": "remove it and put the reasoning in the assistant message's content, as the chat template "
                      "should render it",
    "template_thinking_key": "remove it and put the reasoning in the assistant message's content",
    "model_quantization_config_kwargs": "remove it with model_quantization_config; use load_in_4bit with "
                                        "adapter: qlora",
    "expert_parallel_size": "expert parallelism is not implemented; remove it (several GPUs train data-parallel "
                            "with torchrun)",
    "nvfp4_merge_aware": _NVFP4,
    "diffusion": "diffusion language-model training is not implemented; remove it and the DiffusionPlugin to train "
                 "the model as a causal LM (next-token loss) on the same data",
    "flex_attn_compile_kwargs": "remove it; transformers compiles flex attention with its own settings",
    "torch_compile_options": "remove it; torch_compile_backend and torch_compile_mode are the settings here",
}
PREFIX_ADVICE = (
    ("gptq", "GPTQ-quantized bases cannot be trained here; start from the unquantized model with "
             "adapter: qlora and load_in_4bit: true"),
    ("expert_parallel", "expert parallelism is not implemented; remove it (several GPUs train data-parallel "
                        "with torchrun)"),
    ("dsv4_", _KERNELS),
    ("use_dsv4_kernels", _KERNELS),
    ("use_glm_dsa_kernels", _KERNELS),
    ("moe_", _KERNELS),
    ("expert_backend", _KERNELS),
    ("nonexpert_quantization", _KERNELS),
    ("gemma4_fp8_nonexpert", _KERNELS),
    ("gemma4_nf4_nonexpert", _KERNELS),
    ("nvfp4_", _NVFP4),
    ("use_mora", "MoRA adapters are not implemented; use adapter: lora"),
    ("mora", "MoRA adapters are not implemented; use adapter: lora"),
    ("nemo_gym", "NeMo Gym environments are not supported; use rl: grpo with reward functions (trl.reward_funcs)"),
    ("dense_mixer", "DenseMixer routing is not implemented; remove it"),
    ("hatchery", "remote training backends are not supported; train locally with tuneforge train"),
    ("comet_", "Comet logging is not implemented; use wandb, mlflow or tensorboard"),
    ("trackio_", "Trackio logging is not implemented; use wandb, mlflow or tensorboard"),
    ("otel_", _OTEL),
    ("gradio_", "use `tuneforge inference --chat` for a chat with the trained model"),
    ("ray_", _RAY),
    ("resources_per_worker", _RAY),
    ("kd_", "knowledge distillation is not implemented; remove it"),
    ("grokfast_", "Grokfast is not implemented; remove it"),
    ("lm_eval_", "lm-eval integration is not implemented; run lm-eval on the saved model afterwards"),
    ("dion_", "the Dion optimizer is not available; use optimizer: adamw_torch_fused"),
    ("pose_", "PoSE is not implemented; remove it"),
    ("tiled_mlp", "tiled MLP is not implemented; use gradient_checkpointing: true"),
    ("llmcompressor", _LLMC),
    ("llm_compressor", _LLMC),
    ("is_", "remove it; tuneforge reads the model family from the model's config"),
)


def is_axolotl_key(key: str, nested: bool = False) -> bool:
    """Whether `key` is one of Axolotl's key names (top level, or of a `datasets:` entry when nested)."""
    return key in (DATASET_KEYS if nested else TOP_LEVEL)


def advice(key: str) -> str:
    """What to do instead of an Axolotl key tuneforge does not support."""
    if key in ADVICE:
        return ADVICE[key]
    for prefix, text in PREFIX_ADVICE:
        if key.startswith(prefix):
            return text
    return _GENERIC


# Optimizer families by name, each with the supported choices closest to it (first available wins).
_OPTIMIZER_FAMILIES = (
    (("adamw_torch_8bit", "adamw_torch_4bit", "adamw_torch_fp8", "ao_"), "torchao's low-bit AdamW",
     ("adamw_torch_8bit", "adamw_8bit", "adamw_torch_fused")),
    (("bnb", "8bit", "32bit", "paged_"), "a bitsandbytes optimizer", ("adamw_8bit", "paged_adamw_8bit")),
    (("optimi_",), "an optimi optimizer", ("optimi_adamw", "adamw_torch_fused")),
    (("schedule_free",), "a schedule-free optimizer", ("schedule_free_adamw", "adamw_torch_fused")),
    (("galore", "apollo", "lomo"), "a low-memory projection optimizer (GaLore/APOLLO/LOMO)",
     ("adamw_8bit", "adafactor")),
    (("ademamix",), "AdEMAMix", ("ademamix", "adamw_torch_fused")),
    (("muon", "dion"), "an orthogonalising optimizer (Muon/Dion)", ("muon", "adamw_torch_fused")),
    (("lion",), "Lion", ("lion_32bit", "lion_8bit")),
    (("adafactor",), "Adafactor", ("adafactor",)),
)


def optimizer_message(value: object, supported: list[str]) -> str:
    """An unknown optimizer name: its family and the closest choice tuneforge has."""
    import difflib

    name = str(value)
    for needles, family, choices in _OPTIMIZER_FAMILIES:
        if any(n in name for n in needles):
            pick = next((c for c in choices if c in supported), None)
            if pick and pick != name:
                return (f"`{name}` is {family}, not available here; the closest supported choice is `{pick}` "
                        "(all choices: docs/configuration.md)")
    close = difflib.get_close_matches(name, supported, n=1, cutoff=0.5)
    pick = close[0] if close else "adamw_torch_fused"
    return f"unknown optimizer `{name}`; the closest supported choice is `{pick}` (all choices: docs/configuration.md)"
