"""The offline preference objectives' common part (DPO/IPO, SimPO, ORPO, reward models): `PairObjective`
(data preparation, collation, the reference's log-probs, loss and metrics over pairs), beta, and the
metric sums TRL logs. The pair layout is `pairs.py`, the reference model `reference.py`.
"""

from __future__ import annotations

import torch

from tuneforge.config.schema import Config

from .base import Batch, Objective
from .pairs import (
    PAIR_COLUMNS,
    SequenceLogps,
    batch_shape,
    collate_pairs,
    drop_unpackable,
    pair_lengths,
    require_columns,
    sequence_logps,
)
from .reference import Reference, disable_dropout, precompute_columns

DEFAULT_BETA = 0.1


def beta_of(cfg: Config, default: float = DEFAULT_BETA) -> float:
    """beta: `trl.beta` wins over `rl_beta` (Axolotl's precedence)."""
    if cfg.trl is not None and cfg.trl.beta is not None:
        return float(cfg.trl.beta)
    return float(cfg.rl_beta) if cfg.rl_beta is not None else default


def prepare_checked(cfg: Config, tokenizer, reference: Reference | None, columns: tuple[str, ...], what: str,
                    fix: str, *, rebuild: bool = False):
    """Prepared data of a preference-style method, every split checked for the columns it trains on."""
    from tuneforge.data.pipeline import prepare

    if reference is not None:
        reference.tokenizer = tokenizer
    data = prepare(cfg, tokenizer, rebuild=rebuild)
    def checked(ds, split):
        require_columns(ds, split, columns, what, fix)
        return ds

    map_splits(data, checked)
    return data


def map_splits(data, fn) -> None:
    """Replace each present split (train, eval) of prepared `data` by `fn(dataset, split_name)`."""
    for split in ("train", "eval"):
        ds = getattr(data, split)
        if ds is not None:
            setattr(data, split, fn(ds, split))


class PairObjective(Objective):
    """Base of the objectives trained on chosen/rejected pairs; subclasses implement `pair_losses`.

    `num_items` is the number of pairs: the loss of a micro-batch is the sum of its per-pair losses over
    the pairs of the whole optimizer step, so accumulation and data parallelism give the mean over the step.
    Terms that TRL averages over tokens (an NLL on the chosen answers) are averaged over the micro-batch's
    tokens and weighted by its pairs; with one micro-batch per step that is exactly TRL's loss.
    """

    row_columns = (*PAIR_COLUMNS, "margin", "ref_chosen_logps", "ref_rejected_logps")
    uses_reference = False

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.reference = Reference(cfg) if self.uses_reference else None
        self._ready: set[int] = set()

    @property
    def full_targets(self) -> bool:
        """Whether batches carry `full_target_ids` (an NLL over prompt and answer)."""
        return False

    # ---- data
    def prepare_data(self, tokenizer, *, rebuild: bool = False):
        data = prepare_checked(self.cfg, tokenizer, self.reference, ("chosen_input_ids", "rejected_input_ids"),
                               f"{self.name} trains on preference pairs",
                               "Use a preference dataset type such as chatml.intel, chat_template.default, or rows "
                               "with prompt/chosen/rejected.", rebuild=rebuild)
        def lengths_and_packing(ds, split):
            ds = pair_lengths(ds)
            packed = self.cfg.sample_packing if split == "train" else self.cfg.packing_for_eval
            return drop_unpackable(ds, self.cfg, split) if packed else ds

        map_splits(data, lengths_and_packing)
        if self.uses_reference and self.cfg.precompute_ref_log_probs:
            splits = precompute_columns(
                self.cfg, tokenizer, {"train": data.train, "eval": data.eval}, PAIR_COLUMNS,
                lambda rows: collate_pairs(rows, tokenizer.pad_token_id or 0, packed=False),
                self._reference_columns, data.cache_dir, "pairs",
            )
            data.train, data.eval = splits["train"], splits["eval"]
        return data

    @staticmethod
    def _reference_columns(net, batch: Batch) -> dict[str, torch.Tensor]:
        seq = sequence_logps(net, batch)
        return {"ref_chosen_logps": seq.logps[batch["chosen_doc"]], "ref_rejected_logps": seq.logps[batch["rejected_doc"]]}

    def collate(self, rows: list[list[dict]], pad_id: int, *, training: bool) -> Batch:
        packed, pad_to = batch_shape(self.cfg, training)
        return collate_pairs(rows, pad_id, packed=packed, pad_to=pad_to, multiple_of=self.cfg.pad_to_multiple_of,
                             full_targets=self.full_targets)

    def num_items(self, batch: Batch) -> int:
        return int(batch["num_pairs"])

    # ---- loss
    def setup(self, model) -> None:
        """Once per model: no dropout (policy and reference must agree at init, as in TRL)."""
        if id(model) not in self._ready:
            disable_dropout(model)
            self._ready.add(id(model))

    def reference_logps(self, model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        if self.reference is None:
            raise RuntimeError(f"{self.name} has no reference model")
        with self.reference.network(model) as net:
            seq = sequence_logps(net, batch)
        return seq.logps[batch["chosen_doc"]], seq.logps[batch["rejected_doc"]]

    def pair_losses(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """(per-pair loss [P], additive metric sums) for one micro-batch."""
        raise NotImplementedError

    def loss(self, model, batch: Batch, num_items: int) -> tuple[torch.Tensor, dict[str, float]]:
        self.setup(model)
        per_pair, sums = self.pair_losses(model, batch)
        total = per_pair.sum()
        return total / max(num_items, 1), {"loss": float(total.detach()), "pairs": float(batch["num_pairs"]), **sums}

    def summarize(self, sums: dict[str, float], num_items: int) -> dict[str, float]:
        n = max(num_items, 1)
        return {k: v / n for k, v in sums.items() if k != "pairs"}

    def summarize_eval(self, sums: dict[str, float]) -> dict[str, float]:
        return self.summarize(sums, int(sums.get("pairs", 1)))


def reward_sums(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                rejected_logps: torch.Tensor) -> dict[str, float]:
    """Sums over pairs of the metrics TRL logs (the objective divides by the pair count)."""
    c, r = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": float(c.sum()),
        "rewards/rejected": float(r.sum()),
        "rewards/margins": float((c - r).sum()),
        "rewards/accuracies": float((c > r).float().sum()),
        "logps/chosen": float(chosen_logps.detach().float().sum()),
        "logps/rejected": float(rejected_logps.detach().float().sum()),
    }


def chosen_nll(seq: SequenceLogps, batch: Batch, *, full: bool = False) -> torch.Tensor:
    """Mean negative log-likelihood per token of the chosen sequences of this micro-batch."""
    idx = batch["chosen_doc"]
    if full:
        return seq.full_nll[idx].sum() / seq.full_counts[idx].sum().clamp(min=1)
    return -seq.logps[idx].sum() / seq.counts[idx].sum().clamp(min=1)


__all__ = ["PairObjective", "beta_of", "chosen_nll", "prepare_checked", "reward_sums"]
