"""GRPO's settings: the `trl:` keys it reads, with their defaults from the schema (config/rl.py), plus
the few values derived from other keys, and the checks of the batch geometry."""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.config.rl import TRLBlock
from tuneforge.config.schema import Config
from tuneforge.errors import NotSupportedYet

from ..base import config_error
from ..preference import beta_of
from .loss import LOSS_TYPES

# trl.max_completion_length for GRPO when unset (the key is shared with stepwise_supervised data, where
# unset means no cap, so its schema default stays empty).
DEFAULT_MAX_COMPLETION_LENGTH = 256


@dataclass
class GRPOSettings:
    num_generations: int
    max_completion_length: int
    beta: float
    epsilon: float
    epsilon_high: float
    delta: float | None
    loss_type: str
    scale_rewards: str
    aggregation: str
    level: str
    num_iterations: int
    mask_truncated: bool
    skip_zero_advantage: bool
    temperature: float
    async_prefetch: bool
    prefetch_depth: int
    use_vllm: bool
    rounded_kv_cache: bool  # generation_kwargs.kv_cache_dtype fp8: the sampler is not exactly pi
    is_correction: bool | None  # None: on for off-policy samplers
    is_mode: str
    is_cap: float
    is_floor: float | None
    opsm: float | None
    bias_corrected_kl: bool
    log_completions: bool
    completions_to_print: int
    sync_interval: int

    @classmethod
    def from_config(cls, cfg: Config) -> GRPOSettings:
        trl = cfg.trl or TRLBlock()
        # Unset keys whose default depends on another key (as in TRL): epsilon_high -> epsilon, the
        # aggregation -> the method (GDPO normalises each reward), the fp8 KV cache -> an off-policy sampler.
        scale = {True: "group", False: "none"}.get(trl.scale_rewards, trl.scale_rewards)
        aggregation = trl.multi_objective_aggregation or (
            "normalize_then_sum" if cfg.rl == "gdpo" else "sum_then_normalize")
        kv_cache = (trl.generation_kwargs or {}).get("kv_cache_dtype", "auto")
        settings = cls(
            num_generations=trl.num_generations, beta=beta_of(cfg, default=0.0),
            max_completion_length=trl.max_completion_length or DEFAULT_MAX_COMPLETION_LENGTH,
            epsilon=float(trl.epsilon), delta=trl.delta,
            epsilon_high=float(trl.epsilon if trl.epsilon_high is None else trl.epsilon_high),
            loss_type=trl.loss_type, scale_rewards=scale, aggregation=aggregation,
            level=trl.importance_sampling_level, num_iterations=trl.num_iterations,
            mask_truncated=trl.mask_truncated_completions,
            # FSDP2: every process must run each forward (parameters are gathered with all of them).
            skip_zero_advantage=trl.skip_zero_advantage_batches and not cfg.fsdp_enabled,
            temperature=float(trl.temperature), async_prefetch=trl.async_prefetch or trl.use_data_producer,
            prefetch_depth=trl.prefetch_depth, use_vllm=trl.use_vllm,
            rounded_kv_cache=not trl.use_vllm and kv_cache != "auto",
            is_correction=trl.vllm_importance_sampling_correction, is_mode=trl.vllm_importance_sampling_mode,
            is_cap=float(trl.vllm_importance_sampling_cap), is_floor=trl.vllm_importance_sampling_clip_min,
            opsm=trl.off_policy_mask_threshold, bias_corrected_kl=trl.use_bias_correction_kl,
            log_completions=trl.log_completions, completions_to_print=trl.num_completions_to_print,
            sync_interval=trl.vllm_sync_interval,
        )
        settings.check(cfg)
        return settings

    def check(self, cfg: Config) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise config_error("trl.loss_type", f"must be one of {', '.join(LOSS_TYPES)}.")
        if cfg.sample_packing:
            raise config_error("sample_packing", "GRPO batches are prompts and their generated completions; "
                                                 "remove sample_packing (or set it to false).")
        G = self.num_generations
        per_step = completions_per_micro_batch(cfg, G) * cfg.grad_accum
        if per_step % G:
            raise config_error("micro_batch_size", f"counts completions (as in Axolotl/TRL): micro_batch_size x "
                               f"gradient_accumulation_steps = {per_step} completions per optimizer step, which must "
                               f"be a multiple of trl.num_generations ({G}) so that every prompt gets its {G} "
                               "completions. Change one of the three.")
        wanted = cfg.trl.generation_batch_size if cfg.trl else None
        if wanted is not None and wanted != per_step:
            raise config_error("trl.generation_batch_size", f"is {wanted}, but tuneforge generates once per optimizer "
                               f"step: micro_batch_size x gradient_accumulation_steps = {per_step} completions. "
                               f"Remove it or set it to {per_step}.")
        if self.temperature <= 0:
            raise config_error("trl.temperature", "GRPO samples completions; the temperature must be > 0.")
        if self.async_prefetch and self.use_vllm and cfg.trl.vllm_mode == "colocate":
            raise NotSupportedYet("trl.async_prefetch with vllm_mode: colocate is not implemented (the engine shares "
                                  "the training GPU); use vllm_mode: server with tuneforge vllm-serve, or drop one.")
        if self.async_prefetch and self.use_vllm and self.prefetch_depth > 1:
            raise config_error("trl.prefetch_depth", "with trl.use_vllm, one rollout is generated ahead (the server "
                               "holds one copy of the weights); set prefetch_depth: 1.")

    @property
    def off_policy_sampler(self) -> bool:
        return self.async_prefetch or self.use_vllm or self.rounded_kv_cache

    @property
    def correct_is(self) -> bool:
        return self.off_policy_sampler if self.is_correction is None else bool(self.is_correction)


def completions_per_micro_batch(cfg: Config, num_generations: int) -> int:
    """`micro_batch_size` (completions, as in Axolotl); unset, one prompt's group per micro-batch."""
    return cfg.micro_batch_size if "micro_batch_size" in cfg.model_fields_set else num_generations
