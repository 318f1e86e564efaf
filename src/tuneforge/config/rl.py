"""Preference, reward-model and online-RL keys (`rl:`, `trl:`, `vllm:`).

Declared here so that configs validate; the objectives that read them live in `tuneforge.methods`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from .base import Section
from .ebft import EBFTBlock
from .methods import method_facts

RLMethod = Literal["dpo", "ipo", "simpo", "kto", "orpo", "grpo", "gdpo", "ebft"]

# `trl.generation_kwargs.kv_cache_dtype` values the embedded engine takes (vLLM's spelling); auto: the model's
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


class TRLBlock(Section):
    beta: float | None = Field(None, description="KL / preference temperature (takes precedence over rl_beta; unset: "
                               "rl_beta, else 0.1 for DPO-style methods and 0 for GRPO).")
    max_completion_length: int | None = Field(
        None, ge=1, description="Maximum generated tokens per completion (GRPO: 256 when unset); for stepwise_supervised "
        "data, the cap on completion tokens (unset: none).")
    max_prompt_length: int | None = Field(None, ge=1, description="Maximum prompt tokens.")
    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (GRPO group size).")
    generation_batch_size: int | None = Field(
        None, ge=1, description="Completions generated per generation round; tuneforge generates once per optimizer "
        "step, so it must equal micro_batch_size x gradient_accumulation_steps (or be unset).")
    reward_funcs: list[str] | None = Field(None, description="Reward functions as `module.function` references.")
    reward_weights: list[float] | None = Field(None, description="Weights of the reward functions.")
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] | None = Field(
        None, description="How several rewards combine before normalisation (unset: normalize_then_sum for gdpo, "
        "sum_then_normalize otherwise)."
    )
    reward_num_workers: int = Field(0, ge=0, description="Worker processes for reward functions (0: in the training process).")
    use_vllm: bool = Field(False, description="Generate with vLLM instead of the embedded engine.")
    vllm_mode: Literal["server", "colocate"] | None = Field(None, description="vLLM mode.")
    vllm_server_host: str | None = Field(None, description="vLLM server host.")
    vllm_server_port: int | None = Field(None, description="vLLM server port.")
    vllm_server_timeout: float | None = Field(None, description="Seconds to wait for the vLLM server.")
    vllm_lora_sync: bool | None = Field(None, description="Sync LoRA adapters to vLLM instead of merged weights.")
    vllm_enable_sleep_mode: bool | None = Field(
        None, description="Colocate: put vLLM to sleep between generations (weights to CPU, KV cache freed) so "
        "training gets the GPU memory back (EXPERIMENTAL).")
    vllm_importance_sampling_correction: bool | None = Field(
        None, description="Correct the sampler/trainer mismatch with truncated importance weights (unset: on when "
        "the sampler is off-policy: use_vllm, async_prefetch or an fp8 KV cache)."
    )
    vllm_importance_sampling_mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = (
        Field("token_truncate", description="Importance-weight granularity and mode."))
    vllm_importance_sampling_cap: float = Field(3.0, gt=0, description="Importance-weight cap C.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0: off).")
    min_p: float = Field(0.0, ge=0, le=1, description="Min-p sampling threshold.")
    repetition_penalty: float = Field(1.0, gt=0, description="Repetition penalty.")
    generation_kwargs: dict[str, Any] | None = Field(
        None, description="Extra generation options: the embedded engine's keys (stop_token_ids, cuda_graphs, compile, "
        "half_precision_copy, fused_decode, kv_cache_dtype; see grpo.md); any other key goes to vLLM's "
        "SamplingParams when use_vllm is set.")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="Extra chat-template variables for prompts.")
    num_iterations: int = Field(1, ge=1, description="Optimisation passes per generated batch.")
    epsilon: float = Field(0.2, ge=0, description="Lower clip range of the ratio.")
    epsilon_high: float | None = Field(None, ge=0, description="Upper clip range of the ratio (default: epsilon).")
    delta: float | None = Field(None, description="Optional two-sided clip of the ratio.")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field("dapo", description="Loss aggregation.")
    scale_rewards: bool | Literal["group", "batch", "none"] = Field(
        "group", description="Advantage scaling: group (std per group), batch, or none (true: group, false: none)."
    )
    mask_truncated_completions: bool = Field(False, description="Exclude truncated completions from the loss.")
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="Ratio per token (GRPO) or per sequence (GSPO)."
    )
    log_completions: bool = Field(False, description="Log a sample of completions (to the log and completions.jsonl).")
    async_prefetch: bool = Field(False, description="Generate the next batch while the current one trains.")
    skip_zero_advantage_batches: bool = Field(True, description="Skip micro-batches with no learning signal.")
    reward_timeout: float | None = Field(
        None, gt=0, description="Seconds a reward call may take (default: no limit); the functions then run in worker "
        "processes (reward_num_workers, at least one) that are stopped when the time is up."
    )
    reward_nan_policy: Literal["error", "skip"] = Field(
        "error", description="What a reward of NaN, infinity or beyond +-1e15 does: `error` stops the run naming the "
        "function and row; `skip` treats it as None (not applicable) and logs how many.")
    prefetch_depth: int = Field(1, ge=1, description="Rollouts generated ahead with async_prefetch.")
    use_data_producer: bool = Field(False, description="Accepted for Axolotl compatibility; same as async_prefetch.")
    vllm_sync_interval: int = Field(1, ge=1, description="Optimizer steps between weight syncs to the sampler.")
    vllm_importance_sampling_clip_min: float | None = Field(
        None, ge=0, description="Lower bound of the importance weight (default: none; Axolotl uses 1/cap)."
    )
    off_policy_mask_threshold: float | None = Field(
        None, description="Drop negative-advantage sequences whose mean sampler-vs-policy log-ratio exceeds this."
    )
    use_bias_correction_kl: bool = Field(False, description="Multiply the KL term by the importance ratio.")
    num_completions_to_print: int = Field(4, ge=0, description="Completions logged per step with log_completions.")


class VLLMBlock(Section):
    host: str = Field("127.0.0.1", description="Address `vllm-serve` binds (this machine only by default; set "
                      "0.0.0.0 for a trainer on another machine, with api_key).")
    port: int = Field(8000, ge=0, le=65535, description="Server port.")
    api_key: str | None = Field(None, description="Bearer token `vllm-serve` requires on every endpoint but /health/, "
                                "and the trainer sends (env TUNEFORGE_VLLM_API_KEY takes precedence).")
    adapter_roots: list[str] | None = Field(None, description="Folders `vllm-serve` may load LoRA adapters from "
                                            "(default: the system temp folder, where the trainer's LoRA sync writes).")
    tensor_parallel_size: int | None = Field(None, ge=1, description="Tensor parallel size.")
    data_parallel_size: int | None = Field(None, ge=1, description="Accepted for Axolotl compatibility; no effect "
                                           "(`tuneforge vllm-serve` runs one engine; see tensor_parallel_size).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Fraction of GPU memory vLLM may use.")
    dtype: str = Field("auto", description="Weights dtype.")
    max_model_len: int | None = Field(None, ge=1, description="Maximum context length.")
    enable_prefix_caching: bool | None = Field(None, description="Enable prefix caching.")
    enforce_eager: bool | None = Field(None, description="Disable CUDA graphs in vLLM.")


class RLKeys(Section):
    rl: RLMethod | None = Field(None, description="Preference or RL method: dpo, ipo, simpo, kto, orpo, grpo, gdpo, ebft.")
    rl_beta: float | None = Field(
        None, description="beta of the preference/RL loss (trl.beta takes precedence; unset: 0.1 for DPO-style methods, 0 for GRPO).")
    dpo_loss_type: list[str] | None = Field(
        None, description="DPO loss variants, e.g. [sigmoid], [ipo], [sigmoid, sft] (unset: [ipo] for rl: ipo, else [sigmoid]).")
    dpo_loss_weights: list[float] | None = Field(None, description="Weights of the dpo_loss_type terms.")
    dpo_label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Label smoothing (robust / cDPO).")
    dpo_use_weighting: bool = Field(False, description="WPO weighting of the DPO loss.")
    precompute_ref_log_probs: bool = Field(False, description="Compute reference log-probs once, before training.")
    orpo_alpha: float | None = Field(
        None, description="ORPO lambda (weight of the odds-ratio term; unset: trl.beta / rl_beta, else 0.1).")
    simpo_gamma: float = Field(0.5, description="SimPO target margin gamma.")
    cpo_alpha: float = Field(1.0, description="Weight of the NLL term for SimPO/CPO (0: the SimPO paper's loss).")
    kto_desirable_weight: float = Field(1.0, description="KTO weight of desirable examples.")
    kto_undesirable_weight: float = Field(1.0, description="KTO weight of undesirable examples.")
    reward_model: bool = Field(False, description="Train an outcome reward model (Bradley-Terry).")
    process_reward_model: bool = Field(False, description="Train a process reward model (token classification).")
    center_rewards_coefficient: float = Field(0.0, description="Penalty pulling reward-model outputs to zero.")
    trl: TRLBlock | None = Field(None, description="Online-RL and TRL-style options (GRPO).")
    vllm: VLLMBlock | None = Field(None, description="vLLM server options for `tuneforge vllm-serve`.")
    ebft: EBFTBlock | None = Field(None, description="EBFT options (`rl: ebft`; docs/ebft.md).")

    @model_validator(mode="after")
    def _method_head(self):
        """A reward model's head (model_type, num_labels) is part of what `reward_model: true` means: fill
        it in when left out, so the model loader, PEFT's task type and the saved config.yaml all see it
        (a conflicting value is reported by config/rules.py)."""
        head = method_facts(self).head if hasattr(self, "model_type") else None
        if head is not None:
            if self.model_type is None:
                self.model_type = head.model_type
            if self.num_labels is None:
                self.num_labels = head.num_labels
        return self
