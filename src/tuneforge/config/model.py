"""Base model, tokenizer, chat template and precision keys."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from .base import Section


class SpecialTokens(Section):
    bos_token: str | None = Field(None, description="Beginning-of-sequence token to set on the tokenizer.")
    eos_token: str | None = Field(None, description="End-of-sequence token to set on the tokenizer.")
    pad_token: str | None = Field(None, description="Padding token; set it when the tokenizer has none.")
    unk_token: str | None = Field(None, description="Unknown token to set on the tokenizer.")
    additional_special_tokens: list[str] | None = Field(
        None, description="Extra special tokens to add (the embeddings are resized)."
    )


AttnImpl = Literal["eager", "sdpa", "flash_attention_2", "flex_attention", "varlen"]


class SelectiveCheckpointing(Section):
    save: list[str] = Field(
        ["attention"], min_length=1, description="Ops whose outputs are kept in the forward instead of recomputed "
        "in the backward: `attention` (every attention kernel: SDPA's, flash, varlen), or text matched against "
        "the op's qualified name (e.g. `aten::mm`)."
    )
    save_sliding_window: bool = Field(
        False, description="Also keep the attention outputs of the layers listed in recompute_layer_types "
        "(sliding-window attention is cheap to recompute, so by default it is)."
    )
    recompute_layer_types: list[str] = Field(
        ["sliding_attention", "chunked_attention"], description="Layer types (the model config's `layer_types`) "
        "whose attention is recomputed as usual."
    )
    offload: bool = Field(False, description="Not supported: the kept outputs stay in GPU memory.")


class ModelKeys(Section):
    base_model: str = Field(..., description="Hugging Face model id or local folder of the model to fine-tune.")
    base_model_config: str | None = Field(
        None, description="Model id or folder to read the model config from, when it differs from base_model."
    )
    tokenizer_config: str | None = Field(
        None, description="Model id or folder to load the tokenizer from, when it differs from base_model."
    )
    model_type: str | None = Field(
        None,
        description="transformers Auto class to load with, e.g. AutoModelForCausalLM (default), "
        "AutoModelForSequenceClassification (reward models), AutoModelForTokenClassification (PRMs).",
    )
    tokenizer_type: str | None = Field(None, description="transformers tokenizer class (default: AutoTokenizer).")
    tokenizer_use_fast: bool = Field(True, description="Use the fast (Rust) tokenizer; tuneforge needs it for masking.")
    tokenizer_legacy: bool | None = Field(None, description="Passed to the tokenizer as `legacy` when set.")
    trust_remote_code: bool = Field(False, description="Allow custom model/tokenizer code from the model repository.")
    model_revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of base_model.")
    model_config_overrides: dict[str, Any] | None = Field(
        None,
        alias="model_config",
        description="Overrides applied to the model config before loading (e.g. rope_scaling, num_hidden_layers).",
    )
    model_kwargs: dict[str, Any] | None = Field(
        None, description="Extra keyword arguments for `from_pretrained` of the model."
    )
    special_tokens: SpecialTokens | None = Field(None, description="Special tokens to set or add on the tokenizer.")
    tokens: list[str] | None = Field(None, description="Plain tokens to add to the vocabulary (embeddings are resized).")
    chat_template: str | None = Field(
        None,
        description="Chat template for chat datasets and for the saved tokenizer: a named template "
        "(chatml, llama3, mistral, gemma, qwen3, phi_3), `tokenizer_default`, "
        "`tokenizer_default_fallback_<name>`, or `jinja` (with chat_template_jinja).",
    )
    chat_template_jinja: str | None = Field(
        None, description="Inline Jinja chat template, or a path to a .jinja file (implies chat_template: jinja)."
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Extra variables passed to the chat template (e.g. enable_thinking)."
    )
    eot_tokens: list[str] | None = Field(
        None,
        description="End-of-turn tokens that close a chat turn (default: the template's own, else eos_token). "
        "Used to decide which terminator tokens are trained.",
    )
    default_system_message: str | None = Field(
        None, description="System message inserted into chat conversations that have none."
    )
    num_labels: int | None = Field(None, description="Number of labels for classification heads (reward models: 1).")
    bf16: bool | Literal["auto"] = Field(
        "auto", description="bfloat16 mixed precision: true, false, or auto (on when the GPU supports it)."
    )
    fp16: bool | None = Field(None, description="float16 mixed precision with loss scaling (older GPUs).")
    tf32: bool | Literal["auto"] = Field(
        "auto", description="Allow TF32 matmuls on Ampere+ GPUs (auto: on when CUDA is used)."
    )
    load_in_8bit: bool = Field(False, description="Load the base model in 8 bits through bitsandbytes (CUDA).")
    load_in_4bit: bool = Field(False, description="Load the base model in 4-bit NF4 (QLoRA): through bitsandbytes on "
                               "one GPU (CUDA), as torchao NF4 shards under FSDP2 (fsdp_version: 2; needs torchao).")
    kbit_fp32_unquantized: bool | None = Field(
        None, description="load_in_4bit / load_in_8bit on one GPU: cast the weights bitsandbytes leaves unquantized "
        "(norms, embeddings, LM head) to fp32, as PEFT's prepare_model_for_kbit_training does. Default: only when "
        "they are fp16 (fp16 norms can overflow); bf16 ones stay bf16, as in a LoRA run: half their memory, a "
        "bf16 residual stream and bf16 activations (the fp32 ones cost an 8B QLoRA run about a quarter more "
        "activation memory per layer)."
    )
    bnb_config_kwargs: dict[str, Any] | None = Field(
        None, description="Overrides for the bitsandbytes quantization config."
    )
    quantize_moe_experts: bool = Field(
        False, description="Store a mixture-of-experts model's fused expert weights (3-D, which load_in_4bit leaves "
        "in 16 bits) in NF4 (int8 with load_in_8bit), dequantized layer by layer when used; needs an adapter. "
        "Also works without load_in_4bit (the other layers then stay 16-bit)."
    )
    attn_implementation: AttnImpl | None = Field(
        None,
        description="Attention kernel: eager, sdpa (default), flash_attention_2 (needs flash-attn), "
        "flex_attention, or varlen (tuneforge's packed variable-length attention, CUDA).",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass to save memory (costs ~30% speed). "
        "Axolotl's `offload` / `unsloth` become true with activation_offloading: true."
    )
    gradient_checkpointing_kwargs: dict[str, Any] | None = Field(
        None, description="Options for gradient checkpointing, e.g. {use_reentrant: false}."
    )
    gradient_checkpointing_layers: int | Literal["auto"] | None = Field(
        None, description="With gradient_checkpointing: how many decoder layers are checkpointed, from the "
        "first; the others keep their activations and skip the recompute (faster steps, more memory). auto: "
        "the fewest that the memory planner (`tuneforge plan`) fits in the GPU's memory, with "
        "gradient_checkpointing_headroom to spare. Default: every layer."
    )
    gradient_checkpointing_headroom: float = Field(
        0.1, ge=0, lt=1, description="gradient_checkpointing_layers: auto leaves this fraction of the GPU's "
        "memory unplanned (the planner's error, fragmentation, other processes)."
    )
    selective_checkpointing: bool | SelectiveCheckpointing = Field(
        False, description="With gradient_checkpointing: keep the outputs of the expensive ops of each layer "
        "(by default its attention) from the forward, and recompute only the rest in the backward: faster "
        "steps for one hidden-state-sized tensor per layer. true: `{save: [attention]}`. Runs the blocks eagerly."
    )
    activation_offloading: bool = Field(
        False, description="Keep the activations saved for the backward pass in (pinned) CPU memory instead of "
        "GPU memory (torch.autograd.graph.save_on_cpu): less GPU memory, slower steps. With "
        "gradient_checkpointing only the checkpointed layer inputs are saved, so little is copied.",
    )
    resize_token_embeddings_to_32x: bool = Field(
        False, description="Give the embeddings a multiple of 32 rows when they are resized (faster matmuls)."
    )
    shrink_embeddings: bool = Field(
        False, description="Cut the embeddings down to the tokenizer's size when the model has more rows."
    )
    mean_resizing_embeddings: bool | None = Field(
        None, description="Initialise new embedding rows around the mean of the old ones (transformers' "
        "mean_resizing; default: transformers' own default)."
    )
    torch_compile: bool | Literal["auto"] = Field(
        False,
        description="Compile each transformer block with torch.compile (fuses norms, activations, RoPE; "
        "CUDA only, the first steps pay the compile time; compiled code is cached in $TORCHINDUCTOR_CACHE_DIR, "
        "default ~/.cache/tuneforge/inductor). auto: compile where it pays (CUDA, at least 0.4B parameters, "
        "max_steps unset or at least 100, not EBFT strided mode), else eager; the log says which and why.",
    )
    torch_compile_backend: str | None = Field(None, description="torch.compile backend (default: inductor).")
    torch_compile_mode: str | None = Field(
        None, description="torch.compile mode of the transformer blocks: default, or max-autotune-no-cudagraphs "
        "(inductor times GEMM templates against cuBLAS: longer first steps). Modes that capture CUDA graphs "
        "(reduce-overhead, max-autotune) are not supported with per-block compilation."
    )
    torch_compile_recompute_elementwise: bool | None = Field(
        None, description="Compiled blocks recompute elementwise results (the normalised layer inputs, the MLP's "
        "SiLU product) in the backward pass instead of keeping them from the forward pass: about 30% less "
        "activation memory per layer that is not checkpointed (Llama; 22% of the whole peak for 8B LoRA in "
        "float8), for about 1% of speed. Frees memory for fewer gradient_checkpointing_layers. Needs "
        "torch_compile. Unset: on where the blocks are compiled and gradient_checkpointing_layers is auto (the "
        "freed memory buys layers without recompute), off elsewhere.",
    )

    @property
    def recompute_elementwise(self) -> bool:
        """torch_compile_recompute_elementwise as this run applies it (unset: with gradient_checkpointing_layers
        auto and compiled blocks)."""
        if self.torch_compile_recompute_elementwise is not None:
            return self.torch_compile_recompute_elementwise
        return self.torch_compile is not False and self.gradient_checkpointing_layers == "auto"

    @property
    def selective_checkpoint_settings(self) -> SelectiveCheckpointing | None:
        """selective_checkpointing as its settings (true: the defaults); None when off or without
        gradient_checkpointing, which it refines."""
        sac = self.selective_checkpointing
        if sac is False or not self.gradient_checkpointing:
            return None
        return SelectiveCheckpointing() if sac is True else sac

    @field_validator("gradient_checkpointing_layers", mode="before")
    @classmethod
    def _layer_count(cls, value):
        if value is None or value == "auto" or (type(value) is int and value >= 0):
            return value
        raise ValueError("give a number of decoder layers (0 or more) or auto")

    @field_validator("torch_compile_mode")
    @classmethod
    def _compile_mode(cls, value: str | None) -> str | None:
        if value in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"{value} captures CUDA graphs, which tuneforge's per-block compilation does not "
                             "support; use default or max-autotune-no-cudagraphs")
        if value not in (None, "default", "max-autotune-no-cudagraphs"):
            raise ValueError("use default or max-autotune-no-cudagraphs")
        return value
    unfrozen_parameters: list[str] | None = Field(
        None, description="Regexes of parameter names to train; every other parameter is frozen (full fine-tune)."
    )
    reinit_weights: bool = Field(
        False, description="Initialise the model randomly from its config instead of loading weights (from scratch)."
    )
    device_map: str | dict[str, Any] | None = Field(None, description="Device placement passed to from_pretrained.")
    low_cpu_mem_usage: bool | None = Field(None, description="Load weights lazily to lower peak CPU memory.")
    torch_dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = Field(
        None, description="dtype of the loaded weights (default: float32 for training with mixed precision)."
    )
