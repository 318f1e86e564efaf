"""Training variants: LISA layer sampling, ReLoRA restarts, the EAFT loss, Llama 4's per-expert linears.

Declared here so that configs validate and `docs/configuration.md` shows them; the code that reads them is
in `engine/lisa.py`, `engine/relora.py`, `models/losses.py` (EAFT) and `models/llama4_experts.py`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import Section


class VariantKeys(Section):
    # LISA (Pan et al., 2024): full fine-tuning of a few randomly chosen decoder layers at a time
    lisa_n_layers: int | None = Field(
        None, ge=1, description="LISA: decoder layers trained at a time (full fine-tuning); the others are frozen. "
        "Embeddings and the output head always train.")
    lisa_step_interval: int | None = Field(
        None, ge=1, description="LISA: optimizer steps between two random choices of the trained layers (seeded "
        "by `seed`, so a resumed run chooses the same layers).")
    lisa_layers_attribute: str = Field(
        "model.layers", description="LISA: attribute path from the model to its list of decoder layers.")
    # ReLoRA (Lialin et al., 2023): periodic merge of the adapter into the base weights
    relora: bool = Field(
        False, description="ReLoRA: every jagged_restart_steps steps merge the LoRA adapter into the base "
        "weights, start a fresh adapter and prune its optimizer state (adapter: lora).")
    relora_steps: int | None = Field(
        None, ge=1, description="Axolotl's older form of `relora: true` with jagged_restart_steps: ReLoRA restarts "
        "every this many steps (jagged_restart_steps wins when both are set).")
    relora_prune_ratio: float | None = Field(
        None, ge=0, le=1, description="ReLoRA: share of the adapter's optimizer-state values zeroed at each "
        "restart (unset: 0.999 for relora_prune_method: reset, else 0.9).")
    relora_prune_method: Literal["magnitude", "random", "reset"] = Field(
        "magnitude", description="ReLoRA: which values are zeroed: the smallest in magnitude, a random subset, or "
        "reset (random, 0.999 unless relora_prune_ratio is set).")
    relora_cpu_offload: bool = Field(
        False, description="ReLoRA: accepted for Axolotl compatibility, no effect: restarts merge one layer at a time "
        "in place, so the extra memory is one layer's update.")
    jagged_restart_steps: int | None = Field(
        None, ge=1, description="Jagged learning rate: restart every this many optimizer steps (the ReLoRA "
        "interval); after each restart the rate warms up again from 0.1% of the schedule's value.")
    jagged_restart_warmup_steps: int | None = Field(
        None, ge=1, description="Jagged learning rate: warmup steps after each restart (unset: 10).")
    jagged_restart_anneal_steps: int | None = Field(
        None, ge=1, description="Jagged learning rate: steps before each restart over which the rate decays to "
        "0.1% of the schedule's value (unset: 1).")
    # EAFT: cross-entropy weighted by the model's own (top-k) predictive entropy
    use_eaft: bool = Field(
        False, description="EAFT (SFT): weight each trained token's cross-entropy by the entropy of the model's "
        "top-k next-token distribution (no gradient through the weight) raised to eaft_alpha.")
    eaft_alpha: float = Field(1.0, ge=0, description="EAFT: exponent of the entropy weight (0: plain cross-entropy).")
    eaft_k: int = Field(20, ge=1, description="EAFT: logits the entropy is computed over (the largest k).")
    # Llama 4
    llama4_linearized_experts: bool = Field(
        False, description="Llama 4: replace each layer's fused expert tensors with one nn.Linear per expert, so "
        "LoRA can target experts by name (`feed_forward.experts.3.down_proj`); saved fused again.")

    @field_validator("jagged_restart_warmup_steps", "jagged_restart_anneal_steps", mode="before")
    @classmethod
    def _false_is_unset(cls, value):
        # Axolotl's ReLoRA example writes `jagged_restart_anneal_steps: false` for "the default".
        return None if value is False else value

    @model_validator(mode="after")
    def _lisa_leaves_layers_without_gradients(self):
        # Frozen layers get no gradient in a step: data-parallel training must not wait for theirs.
        if self.lisa_n_layers and hasattr(self, "ddp_find_unused_parameters"):
            self.ddp_find_unused_parameters = True
        return self

    def relora_every(self) -> int | None:
        """Steps between ReLoRA restarts, or None when ReLoRA is off (relora_steps turns it on by itself)."""
        if not (self.relora or self.relora_steps):
            return None
        return self.jagged_restart_steps or self.relora_steps

    def relora_ratio(self) -> float:
        """The prune ratio in effect (see relora_prune_ratio)."""
        if self.relora_prune_ratio is not None:
            return self.relora_prune_ratio
        return 0.999 if self.relora_prune_method == "reset" else 0.9
