"""DPO and its variants (`rl: dpo`, `rl: ipo`), with a reference model.

With h = log pi(y|x) - log pi_ref(y|x) summed over the answer tokens and Delta = h_chosen - h_rejected,
the per-pair losses of `dpo_loss_type` (default [sigmoid]; `rl: ipo` means [ipo]) are, as in TRL:

  sigmoid   -log sigmoid(beta Delta)                                   (DPO)
  hinge     relu(1 - beta Delta)                                       (SLiC)
  ipo       (Delta_avg - 1/(2 beta))^2, Delta_avg from per-token-averaged h    (IPO)
  robust    [-(1-e) log sigmoid(beta Delta) + e log sigmoid(-beta Delta)] / (1 - 2e), e = dpo_label_smoothing
  exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, sigmoid_norm   (TRL's definitions)
  sft       mean NLL per token of the chosen answers (RPO = [sigmoid, sft] with weights [1, alpha])

Several types combine as sum_k w_k mean(L_k) with `dpo_loss_weights` (default 1 each). As in TRL >= 0.29,
`dpo_label_smoothing` only affects robust and exo_pair (a warning says so when it is set for others).
Logged: rewards/chosen = beta h_chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/*.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from tuneforge.config.schema import Config
from tuneforge.errors import NotSupportedYet

from .base import Batch, config_error
from .pairs import sequence_logps
from .preference import PairObjective, beta_of, chosen_nll, reward_sums

log = logging.getLogger("tuneforge")

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
              "apo_down", "sigmoid_norm", "sft")
_SMOOTHED = ("robust", "exo_pair")


def dpo_pair_loss(kind: str, beta: float, eps: float, h_c: torch.Tensor, h_r: torch.Tensor, n_c: torch.Tensor,
                  n_r: torch.Tensor) -> torch.Tensor:
    """Per-pair loss of one DPO variant from the log-ratios h and the answer token counts n."""
    delta = h_c - h_r
    if kind == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if kind == "hinge":
        return torch.relu(1 - beta * delta)
    if kind == "ipo":
        avg = h_c / n_c.clamp(min=1) - h_r / n_r.clamp(min=1)
        return (avg - 1 / (2 * beta)) ** 2
    if kind == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    if kind == "exo_pair":
        return (torch.sigmoid(beta * delta) * (F.logsigmoid(beta * delta) - math.log1p(-eps))
                + torch.sigmoid(-beta * delta) * (F.logsigmoid(-beta * delta) - math.log(eps)))
    if kind == "nca_pair":
        rc, rr = beta * h_c, beta * h_r
        return -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)
    if kind == "bco_pair":
        return -F.logsigmoid(beta * h_c) - F.logsigmoid(-beta * h_r)
    if kind == "sppo_hard":
        return (h_c - 0.5 / beta) ** 2 + (h_r + 0.5 / beta) ** 2
    if kind == "apo_zero":
        return 1 - torch.sigmoid(beta * h_c) + torch.sigmoid(beta * h_r)
    if kind == "apo_down":
        return torch.sigmoid(beta * h_c) + 1 - torch.sigmoid(beta * delta)
    if kind == "sigmoid_norm":
        return -F.logsigmoid(beta * (h_c / n_c.clamp(min=1) - h_r / n_r.clamp(min=1)))
    raise ValueError(kind)


class DPOObjective(PairObjective):
    name = "dpo"
    uses_reference = True

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.beta = beta_of(cfg)
        self.loss_types = list(cfg.dpo_loss_type or (["ipo"] if cfg.rl == "ipo" else ["sigmoid"]))
        unknown = [t for t in self.loss_types if t not in LOSS_TYPES]
        if unknown:
            raise config_error("dpo_loss_type", f"{unknown} not supported; choose from {', '.join(LOSS_TYPES)}.")
        self.weights = list(cfg.dpo_loss_weights or [1.0] * len(self.loss_types))
        if len(self.weights) != len(self.loss_types):
            raise config_error("dpo_loss_weights", "needs one weight per entry of dpo_loss_type.")
        self.eps = float(cfg.dpo_label_smoothing)
        if "exo_pair" in self.loss_types and self.eps == 0:
            raise config_error("dpo_label_smoothing", "dpo_loss_type exo_pair needs it > 0 (the EXO paper uses 1e-3).")
        if self.eps and not set(self.loss_types) & set(_SMOOTHED):
            log.warning("dpo_label_smoothing has no effect on %s (as in TRL >= 0.29 it is used by robust and "
                        "exo_pair only); use dpo_loss_type: [robust] for label-smoothed DPO.", self.loss_types)
        if cfg.dpo_use_weighting:
            raise NotSupportedYet("dpo_use_weighting (WPO) is not implemented yet; remove the key.")
        if self.beta <= 0:
            raise config_error("rl_beta", f"beta must be positive for DPO, got {self.beta} (rl_beta / trl.beta).")

    def pair_losses(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        seq = sequence_logps(model, batch)
        c, r = batch["chosen_doc"], batch["rejected_doc"]
        ref_c, ref_r = self.reference_logps(model, batch)
        h_c, h_r = seq.logps[c] - ref_c, seq.logps[r] - ref_r
        per_pair = torch.zeros_like(h_c)
        sums: dict[str, float] = {}
        for kind, weight in zip(self.loss_types, self.weights, strict=True):
            if kind == "sft":
                nll = chosen_nll(seq, batch)
                term = nll.expand_as(h_c)
                sums["nll_loss"] = float(nll.detach()) * len(h_c)
            else:
                term = dpo_pair_loss(kind, self.beta, self.eps, h_c, h_r, seq.counts[c], seq.counts[r])
            per_pair = per_pair + weight * term
        sums.update(reward_sums(self.beta * h_c, self.beta * h_r, seq.logps[c], seq.logps[r]))
        return per_pair, sums
