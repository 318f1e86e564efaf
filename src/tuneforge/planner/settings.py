"""The planner's inputs, read from a Config as the trainer would read them on a CUDA GPU (the planner runs
anywhere; `bf16: auto` means bf16 there). Suggestions are variants of these settings."""

from __future__ import annotations

from dataclasses import dataclass, replace

from tuneforge.config.methods import method_facts
from tuneforge.config.schema import Config

from .coefficients import BITSANDBYTES

# Methods whose loss compares against a reference model (a frozen copy under full fine-tuning).


@dataclass(frozen=True)
class Settings:
    micro_batch_size: int
    sequence_len: int
    packed: bool
    grad_accum: int
    gradient_checkpointing: bool
    adapter: str | None  # None (full fine-tuning), "lora", "qlora"
    quantized: str | None  # "nf4", "int8" (bitsandbytes), "float8" (fp8_frozen_weights) or None
    precision: str  # "bf16", "fp16" or "no" (fp32)
    torch_dtype: str | None  # an explicit weights dtype (e.g. "bfloat16": pure bf16 full fine-tuning)
    optimizer: str
    sgd_momentum: bool
    attention: str  # "varlen" (flash-style), "sdpa", "eager"
    rl: str | None
    reward_model: bool
    precompute_ref: bool
    reference: bool  # the method needs pi_ref at all
    gpus: int
    fsdp: bool
    offload: bool
    reshard_after_forward: bool
    compiled: bool
    activation_offloading: bool = False  # saved activations in pinned CPU memory
    zero_stage: int | None = None  # deepspeed: its ZeRO stage (None: no DeepSpeed)
    zero_offload_optimizer: bool = False  # offload_optimizer to cpu/nvme: master weights and states off the GPU
    zero_offload_param: bool = False  # offload_param (ZeRO-3): the partitioned weights off the GPU
    saved_attention: bool = False  # selective_checkpointing keeps each layer's attention output
    checkpointed_layers: int | None = None  # gradient_checkpointing_layers (None: every layer)
    kbit_fp32: bool = False  # kbit_fp32_unquantized as resolved for a bf16/fp16 GPU
    kahan: bool = False  # bf16_master_weights: kahan (bf16 weights; AdamW keeps a compensation buffer)
    fp8: bool = False  # fp8: true (torchao float8 linear layers)
    recompute_elementwise: bool = False  # torch_compile_recompute_elementwise (compiled blocks only)
    num_generations: int = 8
    prompt_len: int = 0
    completion_len: int = 256
    completions_per_step: int = 0
    kv_cache_bytes: int = 2
    half_precision_copy: bool = True  # GRPO: generate from a compute-dtype snapshot of fp32 weights
    prefetch_snapshots: int = 0  # trl.async_prefetch: copies the background sampler generates from (prefetch_depth)
    server_generation: bool = False  # trl.use_vllm in server mode: the server holds the KV cache and its weights
    eval_generation: bool = False  # generate_samples / do_causal_lm_eval (under FSDP2: a whole copy to generate with)
    online: bool = False  # prompts in, completions generated during training (config.methods facts)
    paired: bool = False  # chosen/rejected rows (preference methods, reward models)

    @property
    def upcast_unquantized(self) -> bool:
        """Single-GPU bitsandbytes with the unquantized weights cast to fp32 (FSDP2's NF4 base keeps them
        16-bit): then the residual stream is fp32 too."""
        return self.quantized in BITSANDBYTES and not self.fsdp and self.kbit_fp32

    def but(self, **changes) -> Settings:
        return replace(self, **changes)

    @property
    def compute_bytes(self) -> int:
        return 4 if self.precision == "no" else 2

    @property
    def weights_dtype(self) -> str:
        """models.load.weights_dtype for a CUDA GPU with bf16."""
        if self.kahan:
            return "bfloat16"
        if self.torch_dtype and self.torch_dtype != "auto":
            return self.torch_dtype
        if self.adapter and self.precision != "no":
            return "bfloat16" if self.precision == "bf16" else "float16"
        return "float32"

    @property
    def tokens(self) -> int:
        """Tokens in one micro-batch's forward pass (an upper bound when rows are padded, not packed)."""
        if self.online:
            return self.micro_batch_size * (self.prompt_len + self.completion_len)
        rows = self.micro_batch_size * (2 if self.paired and not self.packed else 1)
        return rows * self.sequence_len


def precision_on_gpu(cfg: Config) -> str:
    if cfg.fp16:
        return "fp16"
    if cfg.bf16 is True or cfg.bf16 == "auto":
        return "bf16"
    return "no"


def from_config(cfg: Config, gpus: int) -> Settings:
    fsdp = cfg.fsdp_config
    trl = cfg.trl
    quantized = "nf4" if cfg.load_in_4bit or cfg.adapter == "qlora" else "int8" if cfg.load_in_8bit else None
    if cfg.fp8_frozen_weights and cfg.adapter:
        quantized = "float8"
    online = method_facts(cfg).online
    settings = Settings(
        micro_batch_size=cfg.micro_batch_size, sequence_len=cfg.sequence_len, packed=bool(cfg.sample_packing),
        grad_accum=cfg.grad_accum, gradient_checkpointing=bool(cfg.gradient_checkpointing),
        adapter=("qlora" if quantized in BITSANDBYTES else "lora") if cfg.adapter else None, quantized=quantized,
        precision=precision_on_gpu(cfg), torch_dtype=cfg.torch_dtype, optimizer=cfg.optimizer,
        sgd_momentum=bool((cfg.optim_args or {}).get("momentum")), attention=_attention(cfg), rl=cfg.rl,
        reward_model=bool(cfg.reward_model), precompute_ref=bool(getattr(cfg, "precompute_ref_log_probs", False)),
        reference=_uses_reference(cfg), online=method_facts(cfg).online,
        paired=method_facts(cfg).rows == "preference", gpus=max(1, gpus), fsdp=bool(cfg.fsdp_enabled),
        offload=bool(fsdp and fsdp.offload_params), reshard_after_forward=bool(fsdp.reshard_after_forward) if fsdp else True,
        compiled=cfg.torch_compile is True,  # auto: decided with the parameter count (planner.plan)
        activation_offloading=bool(cfg.activation_offloading),
        saved_attention="attention" in getattr(cfg.selective_checkpoint_settings, "save", ()),
        checkpointed_layers=cfg.gradient_checkpointing_layers if isinstance(cfg.gradient_checkpointing_layers, int)
        else None,
        kahan=cfg.bf16_master_weights == "kahan", fp8=bool(cfg.fp8),
        recompute_elementwise=cfg.recompute_elementwise,
        eval_generation=cfg.eval_generates,
        kbit_fp32=cfg.kbit_fp32_unquantized if cfg.kbit_fp32_unquantized is not None
        else precision_on_gpu(cfg) == "fp16",
    )
    if online:
        generations = int(getattr(trl, "num_generations", None) or 8)
        from tuneforge.data.formats.grpo import prompt_limit

        per_micro = cfg.micro_batch_size if "micro_batch_size" in cfg.model_fields_set else generations
        gen_kwargs = (getattr(trl, "generation_kwargs", None) or {}) if trl else {}
        kv = gen_kwargs.get("kv_cache_dtype")
        settings = settings.but(
            num_generations=generations, prompt_len=prompt_limit(cfg) or cfg.sequence_len,
            completion_len=int(getattr(trl, "max_completion_length", None) or 256),
            completions_per_step=per_micro * cfg.grad_accum, micro_batch_size=per_micro,
            kv_cache_bytes=1 if kv and "fp8" in str(kv) else settings.compute_bytes,
            half_precision_copy=bool(gen_kwargs.get("half_precision_copy", True)),
            server_generation=bool(trl and trl.use_vllm and trl.vllm_mode != "colocate"),
            prefetch_snapshots=trl.prefetch_depth if trl and (trl.async_prefetch or trl.use_data_producer)
            and not trl.use_vllm else 0)
    if cfg.deepspeed:
        settings = settings.but(**_zero(cfg))
    return settings


def _zero(cfg: Config) -> dict:
    """The DeepSpeed JSON's stage and offloads, as Settings fields."""
    from tuneforge.config.distributed import deepspeed_settings, zero_offloads, zero_stage

    settings = deepspeed_settings(cfg)
    offloads = zero_offloads(settings)
    return {"zero_stage": zero_stage(settings), "zero_offload_optimizer": "offload_optimizer" in offloads,
            "zero_offload_param": "offload_param" in offloads}


def _attention(cfg: Config) -> str:
    impl = cfg.attn_implementation
    if impl in (None, "varlen", "flash_attention_2", "flex_attention"):
        return "varlen"  # CUDA's default: tuneforge's varlen (flash) kernel
    return "eager" if impl == "eager" else "sdpa"


def _uses_reference(cfg: Config) -> bool:
    reference = method_facts(cfg).reference
    if reference == "always":
        return True
    if reference == "kl":
        beta = cfg.trl.beta if cfg.trl is not None and cfg.trl.beta is not None else cfg.rl_beta
        return bool(beta)  # GRPO's default beta is 0: no KL term, no reference
    return False
