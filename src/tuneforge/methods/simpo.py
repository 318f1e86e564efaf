"""SimPO (`rl: simpo`): a reference-free margin loss on length-averaged log-probs, as TRL's CPOTrainer.

With l = mean log-prob per token of an answer:

  L = -(1-e) log sigmoid(beta (l_chosen - l_rejected) - gamma) - e log sigmoid(-(beta (l_c - l_r) - gamma))
      + cpo_alpha * NLL(chosen)

gamma = `simpo_gamma` (default 0.5), e = `dpo_label_smoothing` (default 0), beta = `rl_beta`/`trl.beta`
(default 0.1; the SimPO paper uses about 2-2.5), `cpo_alpha` (default 1.0 as in TRL's CPOConfig, which
Axolotl uses: set `cpo_alpha: 0` for the paper's SimPO without the behaviour-cloning term). NLL is the
mean per-token cross-entropy of the chosen answers of the micro-batch. Logged rewards are beta * l.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.config.schema import Config

from .base import Batch
from .pairs import sequence_logps
from .preference import PairObjective, beta_of, chosen_nll, reward_sums


class SimPOObjective(PairObjective):
    name = "simpo"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.beta = beta_of(cfg)
        self.gamma, self.alpha, self.eps = float(cfg.simpo_gamma), float(cfg.cpo_alpha), float(cfg.dpo_label_smoothing)

    def pair_losses(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        seq = sequence_logps(model, batch)
        c, r = batch["chosen_doc"], batch["rejected_doc"]
        avg_c = seq.logps[c] / seq.counts[c].clamp(min=1)
        avg_r = seq.logps[r] / seq.counts[r].clamp(min=1)
        z = self.beta * (avg_c - avg_r) - self.gamma
        per_pair = -(1 - self.eps) * F.logsigmoid(z) - self.eps * F.logsigmoid(-z)
        sums = reward_sums(self.beta * avg_c, self.beta * avg_r, avg_c, avg_r)
        if self.alpha:
            nll = chosen_nll(seq, batch)
            per_pair = per_pair + self.alpha * nll
            sums["nll_loss"] = float(nll.detach()) * len(c)
        return per_pair, sums
