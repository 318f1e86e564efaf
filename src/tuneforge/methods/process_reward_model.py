"""Process reward model (`process_reward_model: true`): token classification of reasoning steps.

The model is `AutoModelForTokenClassification` with two classes (the config fills in
`model_type` / `num_labels` when left out, from `config/methods.py`). Data is `stepwise_supervised`: the label of each step (0/1) sits on the
step's last token, every other token is -100. The loss is the cross-entropy of the head at the labelled
tokens, averaged over every labelled token of the optimizer step (as transformers' token-classification
loss, whose mean over a single micro-batch it equals). Packing works as for SFT: position ids restart
per document. Logged: loss and accuracy (argmax == label at the labelled tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.data.formats import IGNORE_INDEX

from .base import Batch, Objective
from .pairs import batch_shape, layout
from .reward_model import backbone_hidden


def collate_steps(rows: list[list[dict]], pad_id: int, *, pad_to: int | None = None,
                  multiple_of: int | None = None) -> Batch:
    """The usual layout plus `token_labels` [B, T]: labels at the token itself (not shifted), -100 on padding."""
    batch = layout([[(d["input_ids"], d["labels"]) for d in row] for row in rows], pad_id, pad_to=pad_to,
                   multiple_of=multiple_of)
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    for b, row in enumerate(rows):
        at = 0
        for d in row:
            labels[b, at : at + len(d["labels"])] = torch.as_tensor(d["labels"], dtype=torch.long)
            at += len(d["labels"])
    batch["token_labels"] = labels
    batch["num_labelled"] = int((labels != IGNORE_INDEX).sum())
    return batch


class ProcessRewardModelObjective(Objective):
    name = "process_reward_model"

    def collate(self, rows: list[list[dict]], pad_id: int, *, training: bool) -> Batch:
        _, pad_to = batch_shape(self.cfg, training)
        return collate_steps(rows, pad_id, pad_to=pad_to, multiple_of=self.cfg.pad_to_multiple_of)

    def num_items(self, batch: Batch) -> int:
        return int(batch["num_labelled"])

    def loss(self, model, batch: Batch, num_items: int) -> tuple[torch.Tensor, dict[str, float]]:
        hidden, head, dropout = backbone_hidden(model, batch)
        labels = batch["token_labels"]
        mask = labels != IGNORE_INDEX
        selected = hidden[mask]
        if dropout is not None:
            selected = dropout(selected)
        logits = head(selected).float()
        targets = labels[mask]
        total = F.cross_entropy(logits, targets, reduction="sum")
        correct = (logits.detach().argmax(-1) == targets).sum()
        return total / max(num_items, 1), {"loss": float(total.detach()), "labelled": float(mask.sum()),
                                           "correct": float(correct)}

    def summarize(self, sums: dict[str, float], num_items: int) -> dict[str, float]:
        n = max(num_items, 1)
        return {"loss": sums["loss"] / n, "accuracy": sums["correct"] / n}

    def summarize_eval(self, sums: dict[str, float]) -> dict[str, float]:
        return self.summarize(sums, int(sums.get("labelled", 1)))
