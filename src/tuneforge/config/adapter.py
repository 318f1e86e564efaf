"""LoRA / QLoRA adapter keys (applied through PEFT)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .base import Section


class AdapterKeys(Section):
    adapter: Literal["lora", "qlora"] | None = Field(
        None, description="Train a PEFT adapter instead of all weights: lora, or qlora (with load_in_4bit)."
    )
    lora_r: int = Field(8, ge=1, description="LoRA rank r.")
    lora_alpha: float = Field(16, gt=0, description="LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_target_modules: str | list[str] | None = Field(
        None, description="Module names (or a regex string) that receive LoRA layers, e.g. [q_proj, v_proj]."
    )
    lora_target_linear: bool = Field(
        False, description="Target every linear layer of the transformer blocks (not the LM head)."
    )
    lora_target_parameters: list[str] | None = Field(
        None, description="Parameters (not modules) that receive LoRA, by name suffix: MoE expert weights such as "
        "mlp.experts.gate_up_proj and mlp.experts.down_proj (PEFT target_parameters; no lora_dropout or DoRA)."
    )
    lora_modules_to_save: list[str] | None = Field(
        None, description="Modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head)."
    )
    lora_model_dir: str | None = Field(
        None, description="Folder of an existing adapter to continue training from (or to use for inference/merge)."
    )
    lora_fan_in_fan_out: bool = Field(False, description="PEFT fan_in_fan_out (True for GPT-2 style Conv1D layers).")
    lora_rank_pattern: dict[str, int] | None = Field(None, description="Per-module rank overrides (PEFT rank_pattern).")
    lora_alpha_pattern: dict[str, float] | None = Field(
        None, description="Per-module alpha overrides (PEFT alpha_pattern)."
    )
    lora_mlp_kernel: bool = Field(
        False, description="Fused LoRA SwiGLU MLP (gate, up, down and their LoRA in one autograd function that "
        "recomputes the activation instead of saving it); Llama/Mistral/Qwen2/Qwen3 layers with plain LoRA on "
        "a 16-bit or bitsandbytes 4-bit (QLoRA) base (dropout, DoRA and 8-bit bases stay on PEFT's path with "
        "a warning).")
    lora_qkv_kernel: bool = Field(
        False, description="Fused LoRA q/k/v projections (one function; the three LoRA A products in one matmul); "
        "same conditions as lora_mlp_kernel.")
    lora_o_kernel: bool = Field(
        False, description="Fused LoRA attention output projection (one function); same conditions as "
        "lora_mlp_kernel.")
    peft_use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    peft_use_rslora: bool = Field(False, description="Rank-stabilised LoRA: scale alpha/sqrt(r) instead of alpha/r.")
    peft_init_lora_weights: bool | str | None = Field(
        None, description="PEFT init_lora_weights (true, false, gaussian, pissa, olora, ...)."
    )
    peft_layers_to_transform: list[int] | None = Field(None, description="Only adapt these layer indices.")
    peft: dict[str, Any] | None = Field(None, description="Extra keyword arguments for peft.LoraConfig.")
    merge_lora: bool = Field(False, description="Merge the adapter into the base after training (writes output_dir/merged).")
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: the B matrices (and 1-D trainable parameters, as PEFT does) train at "
        "learning_rate x this ratio (the paper suggests 16; lower learning_rate a little with it)."
    )
    loraplus_lr_embedding: float = Field(
        1e-6, gt=0, description="LoRA+: learning rate of LoRA adapters on embedding layers."
    )
