"""ORPO (`rl: orpo`): supervised NLL plus an odds-ratio preference term, no reference model (TRL's ORPOTrainer).

With l = mean log-prob per token of an answer and log odds(y) = l - log(1 - e^l):

  L = NLL(chosen) - lambda * log sigmoid(log odds(chosen) - log odds(rejected))

lambda = `orpo_alpha` (Axolotl passes it to TRL as beta; default 0.1, and `rl_beta`/`trl.beta` are used
when orpo_alpha is not set). NLL is the mean per-token cross-entropy over the chosen sequences of the
micro-batch: over the answer tokens by default, so that lambda = 0 is exactly SFT on the chosen answers;
with `train_on_inputs: true` over prompt and answer, as TRL computes it. Logged: rewards = lambda * l,
nll_loss, log_odds_ratio (mean log sigmoid term), log_odds_chosen (mean log-odds difference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.config.schema import Config

from .base import Batch
from .pairs import sequence_logps
from .preference import PairObjective, beta_of, chosen_nll, reward_sums

DEFAULT_LAMBDA = 0.1


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate on both sides of -ln 2 (Maechler's switch)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class ORPOObjective(PairObjective):
    name = "orpo"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.lam = float(cfg.orpo_alpha) if cfg.orpo_alpha is not None else beta_of(cfg, DEFAULT_LAMBDA)

    @property
    def full_targets(self) -> bool:
        return bool(self.cfg.train_on_inputs)

    def pair_losses(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        full = self.full_targets
        seq = sequence_logps(model, batch, full=full)
        c, r = batch["chosen_doc"], batch["rejected_doc"]
        avg_c = (seq.logps[c] / seq.counts[c].clamp(min=1)).float()
        avg_r = (seq.logps[r] / seq.counts[r].clamp(min=1)).float()
        log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
        ratio = F.logsigmoid(log_odds)
        nll = chosen_nll(seq, batch, full=full)
        per_pair = nll - self.lam * ratio
        sums = reward_sums(self.lam * avg_c, self.lam * avg_r, avg_c, avg_r)
        n = len(c)
        sums.update({"nll_loss": float(nll.detach()) * n, "log_odds_ratio": float(ratio.detach().sum()),
                     "log_odds_chosen": float(log_odds.detach().sum())})
        return per_pair, sums
