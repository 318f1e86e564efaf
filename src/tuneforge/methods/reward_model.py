"""Outcome reward model (`reward_model: true`): a Bradley-Terry loss on a sequence-classification head.

The model is `AutoModelForSequenceClassification` with one output (the config fills in `model_type` and
`num_labels: 1` when left out: `config/methods.py`, the head is part of the method's facts). The reward r of a sequence is the head's output at its last
token, as TRL's RewardTrainer reads it. Per pair:

  L = -log sigmoid(r_chosen - r_rejected - margin) + center_rewards_coefficient * (r_chosen + r_rejected)^2

`margin` is a per-row column (0 when absent). Any preference dataset type works; bradley_terry.chat_template
is Axolotl's. Pairs are laid out and packed like the DPO family (one forward per micro-batch).
Logged: accuracy (share of pairs with r_chosen > r_rejected), margin, rewards/chosen, rewards/rejected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.config.schema import Config
from tuneforge.errors import ModelError
from tuneforge.models import attention
from tuneforge.models.losses import unwrap_peft

from .base import Batch
from .preference import PairObjective


def classifier_parts(model) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module | None]:
    """(backbone, head, dropout) of a transformers *ForSequenceClassification / *ForTokenClassification model."""
    base = unwrap_peft(model)
    backbone = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    head = getattr(base, "score", None) or getattr(base, "classifier", None)
    if backbone is None or head is None:
        raise ModelError(f"{type(base).__name__} has no classification head (`score` or `classifier`); reward models "
                         "need model_type AutoModelForSequenceClassification / AutoModelForTokenClassification.")
    return backbone, head, getattr(base, "dropout", None)


def backbone_hidden(model, batch: Batch) -> tuple[torch.Tensor, torch.nn.Module, torch.nn.Module | None]:
    """Hidden states of the classifier's backbone (per-sequence attention from position ids), its head and dropout."""
    backbone, head, dropout = classifier_parts(model)
    extra = {}
    if getattr(unwrap_peft(model).config, "_attn_implementation", None) == attention.NAME and "cu_seqlens" in batch:
        extra = attention.varlen_kwargs(batch)  # sequence boundaries for the varlen kernel (CUDA)
    outputs = backbone(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **extra)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    return hidden, head, dropout


def sequence_scores(model, batch: Batch) -> torch.Tensor:
    """The head's output at the last token of every sequence of the batch, [D]."""
    hidden, head, _ = backbone_hidden(model, batch)
    last = hidden.flatten(0, 1)[batch["doc_last"]]
    return head(last).float()[:, 0]


class RewardModelObjective(PairObjective):
    name = "reward_model"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.center = float(cfg.center_rewards_coefficient)

    def setup(self, model) -> None:
        pass  # keep the model's dropout: TRL's RewardTrainer does not disable it

    def pair_losses(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        scores = sequence_scores(model, batch)
        r_c, r_r = scores[batch["chosen_doc"]], scores[batch["rejected_doc"]]
        margin = batch.get("margin")
        diff = r_c - r_r - (margin.to(r_c) if margin is not None else 0.0)
        per_pair = -F.logsigmoid(diff)
        if self.center:
            per_pair = per_pair + self.center * (r_c + r_r) ** 2
        c, r = r_c.detach(), r_r.detach()
        return per_pair, {"accuracy": float((c > r).float().sum()), "margin": float((c - r).sum()),
                          "rewards/chosen": float(c.sum()), "rewards/rejected": float(r.sum())}
