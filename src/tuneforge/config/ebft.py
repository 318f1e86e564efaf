"""The `ebft:` block: Energy-Based Fine-Tuning (feature matching, Jelassi et al. 2026, arXiv 2603.12248).

Declared here so that configs validate and `docs/configuration.md` shows the defaults; the objectives
that read it live in `tuneforge.methods.ebft` (docs/ebft.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .base import Section


class EBFTBlock(Section):
    mode: Literal["structured", "strided"] = Field(
        "structured", description="structured: prompt + ground_truth rows, GRPO's rollouts and loss with the "
        "feature-matching reward; strided: unstructured text, blocks generated at anchors every `stride` tokens.")
    feature_layers: list[float] = Field(
        [0.25, 0.5, 0.75], min_length=1, description="Depths (fractions of the layer count) whose hidden states "
        "form the features; layer int(f x num_layers), 0 being the embedding output.")
    embed_method: Literal["last_token", "mean_pooling", "completion_mean", "concat"] = Field(
        "last_token", description="How a sequence's hidden states are pooled into one feature vector (strided mode: "
        "last_token or mean_pooling).")
    use_whitening: bool = Field(False, description="Whiten features per prompt group (SVD of the generated features) "
                                "instead of L2-normalising them.")
    alignment_coef: float = Field(1.0, ge=0, description="Weight of the cosine alignment with the ground truth.")
    diversity_coef: float = Field(1.0, ge=0, description="Weight of the similarity penalty between samples of a group.")
    ce_coef: float = Field(0.0, ge=0, description="Strided mode: weight of the cross-entropy on ground-truth tokens.")
    rl_coef: float = Field(1.0, ge=0, description="Strided mode: weight of the REINFORCE term.")
    adaptive_max_tokens: bool = Field(True, description="Structured mode: cap generation at the ground truth's length "
                                      "x gt_length_multiplier (never above trl.max_completion_length).")
    gt_length_multiplier: float = Field(1.5, gt=0, description="See adaptive_max_tokens.")
    stride: int = Field(8, ge=1, description="Strided mode: tokens between anchors.")
    context_length: int = Field(8, ge=1, description="Strided mode: document tokens a block is conditioned on.")
    generate_max_len: int = Field(8, ge=1, description="Strided mode: tokens generated per block.")
    n_samples_per_prompt: int = Field(4, ge=1, description="Strided mode: samples per document (1 disables the "
                                      "diversity term and forces advantage_estimator: reinforce).")
    temperature: float = Field(0.6, ge=0, description="Strided mode: sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Strided mode: nucleus sampling threshold.")
    advantage_estimator: Literal["rloo", "group_norm", "reinforce"] = Field(
        "rloo", description="Strided mode: rloo (reward minus the mean of the other samples), group_norm, or "
        "reinforce (the raw reward).")
    min_completion_prefix: int = Field(0, ge=0, description="Strided mode, structured data: completion tokens kept "
                                       "as context before the first anchor.")

    @field_validator("feature_layers")
    @classmethod
    def _fractions(cls, layers: list[float]) -> list[float]:
        bad = [f for f in layers if not 0.0 <= f <= 1.0]
        if bad:
            raise ValueError(f"each entry is a fraction of the model's depth in [0, 1]; got {bad}")
        return layers
