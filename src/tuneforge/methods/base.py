"""The interface between the training loop and a training objective (SFT, DPO, GRPO, ...).

The loop in `tuneforge.engine.trainer` knows an objective only through this class (the contract, the
step shape and how to add a method: docs/objectives.md). What the trainer calls, per optimizer step:

    shape = objective.step_shape()          # once: how the planner cuts the rows into steps
    batches = [objective.collate(rows) for rows in the step's planned micro-batches]
    batches = objective.rollout_step(model, batches)   # online methods generate and score here
    n = sum(objective.num_items(b) for b in batches), summed over every data-parallel rank
    for b in batches:  loss, sums = objective.loss(model, b, n);  backward(loss)
    logged = objective.summarize(sum of sums over batches and ranks, n)

`loss` must return the objective's *sum* over the items of the micro-batch divided by `n`, the item
count of the whole optimizer step. Then gradient accumulation and data parallelism are exact: the
gradient of a step is the same however its rows are split into micro-batches and ranks.

`metrics` holds additive quantities (sums over items: `loss_sum`, `num_tokens`, ...); the loop adds
them over micro-batches and ranks and hands the totals to `summarize`, so means are token-weighted
over the whole step rather than averages of per-batch averages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tuneforge.config.methods import MethodFacts, method_facts
from tuneforge.config.schema import Config

Batch = dict[str, Any]


def config_error(key: str, message: str) -> Exception:
    """The error of a config value an objective cannot train with, reported like config/rules.py's."""
    from tuneforge.config.errors import ConfigError, ConfigIssue

    return ConfigError([ConfigIssue(key, message)])


@dataclass(frozen=True)
class StepShape:
    """How the step planner cuts the training rows into optimizer steps for an objective."""

    rows_per_micro_batch: int  # dataset rows in one planned micro-batch (GRPO: the prompts of a whole step)
    micro_batches_per_step: int  # planned micro-batches per step (GRPO: 1; `rollout_step` splits it after generation)


class Objective:
    """Base class of training objectives. Subclasses set `name` and implement `loss`."""

    name: str = "objective"
    # Dataset columns each document carries into `collate` (a dataset without one of them skips it):
    # preference pairs, KTO labels and cached reference log-probs travel this way.
    row_columns: tuple[str, ...] = ("input_ids", "labels")
    # Whether a planned micro-batch may be trained as several smaller ones with the same result (the contract
    # above); auto_find_batch_size relies on it. False where the loss couples the rows of a micro-batch.
    splits_micro_batches: bool = True

    def __init__(self, cfg: Config):
        self.cfg = cfg

    @property
    def facts(self) -> MethodFacts:
        """What lower layers know about this method (its rows, router loss, model head): config/methods.py."""
        return method_facts(self.cfg)

    def step_shape(self) -> StepShape:
        """Rows per planned micro-batch and planned micro-batches per optimizer step."""
        return StepShape(self.cfg.micro_batch_size, self.cfg.grad_accum)

    # ---- data -------------------------------------------------------------------------------------
    def prepare_data(self, tokenizer, *, rebuild: bool = False):
        """Tokenized train/eval datasets (`tuneforge.data.pipeline.PreparedData`); `rebuild` (the
        `preprocess` command) replaces the prepared-data cache entry instead of reusing it."""
        from tuneforge.data.pipeline import prepare

        return prepare(self.cfg, tokenizer, rebuild=rebuild)

    def collate(self, rows: list[list[dict]], pad_id: int, *, training: bool) -> Batch:
        """Tensors for one micro-batch: `rows` is a list of packed rows, each a list of documents."""
        from tuneforge.data.collate import collate

        pack = self.cfg.sample_packing if training else self.cfg.packing_for_eval
        pad_to = self.cfg.sequence_len if (self.cfg.pad_to_sequence_len or (self.cfg.pad_to_sequence_len is None
                                                                           and pack)) else None
        if not training and self.cfg.eval_sequence_len and pad_to:
            pad_to = self.cfg.eval_sequence_len
        return collate(rows, pad_id, pad_to=pad_to, multiple_of=self.cfg.pad_to_multiple_of)

    # ---- one optimizer step -----------------------------------------------------------------------
    def rollout_step(self, model, batches: list[Batch]) -> list[Batch]:
        """The micro-batches one optimizer step trains on, from its planned (collated) batches. Offline
        methods train on them as they are; online methods generate and score completions here, and may
        return a different number of micro-batches (GRPO splits one generation into several)."""
        return batches

    def num_items(self, batch: Batch) -> int:
        """How many items of this micro-batch the loss sums over (SFT: trained tokens)."""
        return int(batch["num_target_tokens"])

    def loss(self, model, batch: Batch, num_items: int) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss to backpropagate = sum over this batch's items / num_items, additive metrics)."""
        raise NotImplementedError

    def summarize(self, sums: dict[str, float], num_items: int) -> dict[str, float]:
        """Turn metric totals of a step (or of an evaluation) into logged values."""
        return {k: v / max(num_items, 1) for k, v in sums.items()}

    # ---- evaluation -------------------------------------------------------------------------------
    def evaluate(self, model, batch: Batch) -> dict[str, float]:
        """Additive evaluation metrics of one batch (no gradients); `summarize_eval` finishes them."""
        _, sums = self.loss(model, batch, 1)
        return sums

    def summarize_eval(self, sums: dict[str, float]) -> dict[str, float]:
        return self.summarize(sums, int(sums.get("num_tokens", 1)))

    def samples(self, model, tokenizer, documents: list[dict]) -> list[dict[str, str]]:
        """generate_samples: {prompt, completion, reference} texts for some evaluation documents, generated
        by `model` (in eval mode); empty where the objective has nothing to show."""
        return []

    def predictions(self, model, tokenizer, documents: list[dict]) -> list[tuple[str, str]]:
        """do_causal_lm_eval: (generated text, reference text) for each evaluation document, which the loop
        scores with eval_causal_lm_metrics; objectives without references return nothing."""
        return []

    # ---- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What this process's objective carries from one optimizer step to the next (empty for offline
        methods), saved in every checkpoint so that a resumed run continues exactly."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` from a checkpoint, before the first resumed step."""

    # ---- lifecycle --------------------------------------------------------------------------------
    def close(self) -> None:
        """Release what the objective started (generation workers, reward pools); called once at the end."""
