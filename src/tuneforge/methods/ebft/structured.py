"""EBFT's structured mode (`rl: ebft`, `ebft.mode: structured`): GRPO with the feature-matching reward.

Rows are a prompt and its `ground_truth` completion (ground_truth.py). Each step samples
`trl.num_generations` completions per prompt exactly as GRPO does (same samplers, async prefetch,
vLLM server), then scores them without reward functions: the frozen feature network (the model
before training: the adapter disabled with LoRA, a frozen copy with full fine-tuning) embeds
prompt+completion and prompt+ground_truth (features.py), and reward.py turns the features into the
rewards of the paper's eq. 7. GRPO's advantages, clipped surrogate, loss types, buffer and
checkpointing then apply unchanged: only `_score` (and the per-prompt generation cap) differ.

Multi-turn rows (`remaining_turns`) have their later turns rolled out before scoring (multiturn.py).
`trl.reward_funcs` and `trl.reward_weights` are refused: the feature-matching reward is the whole signal
(as in Axolotl, whose EBFT trainer passes only that reward to GRPO), and a verifiable reward belongs to
`rl: grpo` (docs/ebft.md).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from tuneforge.config.ebft import EBFTBlock
from tuneforge.config.schema import Config
from tuneforge.data.formats.grpo import tokenize_prompt

from ..base import Batch, config_error
from ..grpo import GRPOObjective
from ..grpo.metrics import mean_std
from ..reference import Reference
from . import features as feats
from . import multiturn
from .ground_truth import COLUMN, IDS_COLUMN, add_ground_truth, cap_rollout, length_cap
from .reward import GroupRewards, group_rewards

log = logging.getLogger("tuneforge")

# `ebft:` keys read only by the strided mode (structured mode samples with the trl: keys instead).
STRIDED_ONLY = {
    "ce_coef": None, "rl_coef": None, "stride": None, "context_length": None, "generate_max_len": None,
    "n_samples_per_prompt": "trl.num_generations", "temperature": "trl.temperature", "top_p": "trl.top_p",
    "advantage_estimator": "trl.scale_rewards", "min_completion_prefix": None,
}
# Per-completion EBFT values carried in a scored rollout (split with it) and summed into the metrics.
_LOGGED = ("alignment", "diversity", "cfm_loss", "reward")


class StructuredEBFTObjective(GRPOObjective):
    name = "ebft"
    row_columns = (*GRPOObjective.row_columns, IDS_COLUMN)

    def __init__(self, cfg: Config):
        for key in ("reward_funcs", "reward_weights"):
            if cfg.trl is not None and getattr(cfg.trl, key):
                raise config_error(f"trl.{key}", "rl: ebft's only reward is feature matching with the ground truth "
                                   "(Axolotl's EBFT trainer does not read trl.reward_funcs or trl.reward_weights "
                                   "either); remove them, or use rl: grpo for a verifiable reward.")
        self.ebft = cfg.ebft or EBFTBlock()
        _warn_strided_keys(self.ebft)
        super().__init__(cfg)
        # The feature network: the GRPO reference when there is one (beta != 0), else its own handle on the
        # same starting point (one frozen copy at most with full fine-tuning).
        self.feature_net = self.reference if self.reference is not None else Reference(cfg)
        self._model = None
        self._scores: GroupRewards | None = None

    def _reward_set(self, cfg: Config) -> FeatureRewards:
        return FeatureRewards()

    # ---- data
    def prepare_data(self, tokenizer, *, rebuild: bool = False):
        data = super().prepare_data(tokenizer, rebuild=rebuild)
        self.feature_net.tokenizer = tokenizer
        stops = self.params.stop_token_ids
        data.train = add_ground_truth(data.train, tokenizer, self.cfg, stops, "datasets")
        data.eval = add_ground_truth(data.eval, tokenizer, self.cfg, stops,
                                     "test_datasets" if self.cfg.test_datasets else "datasets")
        return data

    def collate(self, rows: list[list[dict]], pad_id: int, *, training: bool) -> Batch:
        batch = super().collate(rows, pad_id, training=training)
        batch["gt_ids"] = [list(d[IDS_COLUMN]) for row in rows for d in row]
        return batch

    # ---- generation: GRPO's, with the ground truth's length as each prompt's limit
    def _setup(self, model) -> None:
        self._model = model  # the policy whose adapter-disabled self is the feature network (LoRA)
        super()._setup(model)

    def caps(self, batch: Batch) -> list[int]:
        e, limit = self.ebft, self.settings.max_completion_length
        if not e.adaptive_max_tokens:
            return [limit] * len(batch["gt_ids"])
        return [length_cap(len(gt), e.gt_length_multiplier, limit) for gt in batch["gt_ids"]]

    def _generate(self, model, batch: Batch):
        if not self.ebft.adaptive_max_tokens:
            return super()._generate(model, batch)
        # The samplers take one limit per call: generate up to the step's largest cap, then cut each prompt's
        # completions at its own (cap_rollout), which is the same as sampling each with its own limit.
        full = self.params
        self.params = replace(full, max_tokens=max(self.caps(batch)))
        try:
            rollout, off_policy, source = super()._generate(model, batch)
        finally:
            self.params = full
        return cap_rollout(rollout, self.caps(source)), off_policy, source

    # ---- scoring: the feature-matching reward in place of reward functions
    def _score(self, source: Batch, rollout, step: int | None = None) -> tuple[list[str], torch.Tensor]:
        G = self.settings.num_generations
        texts = self.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        prompts = [p for p in rollout.prompt_ids for _ in range(G)]
        completions, truths = rollout.completion_ids, source["gt_ids"]
        if any(c.get(multiturn.COLUMN) for c in source["columns"]):
            completions, truths = self._conversations(source, texts, completions, truths)
        with self.feature_net.network(self._model) as net:
            generated = self.features(net, prompts, completions, source["pad_id"])
            truth = self.features(net, rollout.prompt_ids, truths, source["pad_id"])
        self._scores = self.rewards_of(generated, truth)
        return texts, self._scores.rewards.double().unsqueeze(1)

    def _conversations(self, source: Batch, texts: list[str], completions, truths):
        """(completions, ground truths) with each multi-turn row's replaced by its whole conversation after
        the prompt: the samples' rolled out with the policy, the reference's as written (multiturn.py)."""
        G, stops = self.settings.num_generations, self.params.stop_token_ids
        rows = [i for i, c in enumerate(source["columns"]) if c.get(multiturn.COLUMN)]
        samples = [j for i in rows for j in range(i * G, (i + 1) * G)]
        prompts = [source["prompts"][j // G] for j in samples]
        rolled = multiturn.roll_out(self._reply, lambda m: tokenize_prompt(m, self.tokenizer, self.cfg), prompts,
                                    [texts[j] for j in samples],
                                    [source["columns"][j // G][multiturn.COLUMN] for j in samples])
        completions, truths = list(completions), list(truths)
        for j, prompt, turns in zip(samples, prompts, rolled, strict=True):
            completions[j] = multiturn.conversation_ids(prompt, turns, self.tokenizer, self.cfg, stops)
        for i in rows:
            reference = multiturn.reference_turns(source["columns"][i][COLUMN], source["columns"][i][multiturn.COLUMN])
            truths[i] = multiturn.conversation_ids(source["prompts"][i], reference, self.tokenizer, self.cfg, stops)
        return completions, truths

    def _reply(self, prompt_ids: list[list[int]]) -> list[str]:
        """One sampled reply per conversation, with the current weights (the later turns of multi-turn rows)."""
        rollout = self.sampler.generate(prompt_ids, 1, self.params)
        return self.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)

    def features(self, net, prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> torch.Tensor:
        """[N, D] pooled features of prompt+completion rows, `micro_batch_size` rows per forward."""
        layers = feats.layer_indices(self.ebft.feature_layers, feats.num_layers_of(net))
        device = next(net.parameters()).device
        size = max(1, self.completions_per_micro_batch)
        out = []
        for start in range(0, len(prompts), size):
            ids, valid, completion = _right_padded(prompts[start:start + size], completions[start:start + size],
                                                   pad_id)
            ids, valid, completion = ids.to(device), valid.to(device), completion.to(device)
            states = feats.hidden_features(net, ids, valid.long(), layers)
            out.append(feats.pool(states, valid, self.ebft.embed_method, completion))
        return torch.cat(out)

    def rewards_of(self, generated: torch.Tensor, truth: torch.Tensor) -> GroupRewards:
        """Eq. 7 per prompt group; cfm_loss comes back per completion (its group's value) so that it splits
        with the rollout into micro-batches and averages over groups in the logged metric."""
        G, e = self.settings.num_generations, self.ebft
        groups = [group_rewards(generated[i * G:(i + 1) * G].cpu(), truth[i].cpu(), alignment_coef=e.alignment_coef,
                                diversity_coef=e.diversity_coef, whitening=e.use_whitening)
                  for i in range(truth.shape[0])]
        return GroupRewards(rewards=torch.cat([g.rewards for g in groups]),
                            alignment=torch.cat([g.alignment for g in groups]),
                            diversity=torch.cat([g.diversity for g in groups]),
                            cfm_loss=torch.stack([g.cfm_loss for g in groups]).repeat_interleave(G))

    @torch.no_grad()
    def _generate_and_score(self, model, batch: Batch) -> Batch:
        scored = super()._generate_and_score(model, batch)
        s = self._scores
        scored.update({f"ebft_{k}": getattr(s, "rewards" if k == "reward" else k).double() for k in _LOGGED})
        return scored

    # ---- metrics
    def loss(self, model, batch: Batch, num_items: int):
        total, sums = super().loss(model, batch, num_items)
        return total, {**sums, **_ebft_sums(batch)}

    def summarize(self, sums: dict[str, float], num_items: int) -> dict[str, float]:
        return {**super().summarize(sums, num_items), **_ebft_logged(sums)}

    @torch.no_grad()
    def evaluate(self, model, batch: Batch) -> dict[str, float]:
        sums = super().evaluate(model, batch)  # scores the held-out completions through _score
        s = self._scores
        return {**sums, **_ebft_sums({f"ebft_{k}": getattr(s, "rewards" if k == "reward" else k) for k in _LOGGED})}

    def summarize_eval(self, sums: dict[str, float]) -> dict[str, float]:
        return {**super().summarize_eval(sums), **_ebft_logged(sums)}


class FeatureRewards:
    """What GRPO reads of its RewardSet, for the one feature-matching reward (weight 1, logged as
    `rewards/ebft`); `_score` computes the values itself."""

    names = short_names = ["ebft"]

    def __init__(self):
        self.weights = torch.ones(1)

    def close(self) -> None:
        pass


def _right_padded(prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """(ids, valid, completion) [N, T]: prompt+completion rows padded on the right, and masks of real and
    completion tokens. Right padding keeps the real tokens at positions 0..len-1 (as in generation), and
    under causal attention no real token can attend to a pad, whatever the kernel does with the mask."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool)
    completion = torch.zeros_like(valid)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + list(c), dtype=torch.long)
        valid[i, : len(p) + len(c)] = True
        completion[i, len(p): len(p) + len(c)] = True
    return ids, valid, completion


def _ebft_sums(batch) -> dict[str, float]:
    values = {k: batch[f"ebft_{k}"].double() for k in _LOGGED}
    sums = {f"ebft/{k}_sum": float(v.sum()) for k, v in values.items()}
    sums.update({f"ebft/{k}_sq": float((v ** 2).sum()) for k, v in values.items()})
    sums["ebft/n"] = float(len(values["reward"]))
    return sums


def _ebft_logged(sums: dict[str, float]) -> dict[str, float]:
    logged = {}
    for k in _LOGGED:
        logged.update(mean_std(f"ebft/{k}", sums.get(f"ebft/{k}_sum", 0.0), sums.get(f"ebft/{k}_sq", 0.0),
                               sums.get("ebft/n", 0.0)))
    return logged


def _warn_strided_keys(block: EBFTBlock) -> None:
    set_keys = [k for k in STRIDED_ONLY if k in block.model_fields_set]
    if block.mode != "structured" or not set_keys:
        return
    hints = [f"{k} (use {STRIDED_ONLY[k]})" if STRIDED_ONLY[k] else k for k in set_keys]
    log.warning("ebft.mode is structured, where these ebft: keys do nothing (they are strided-mode keys): %s",
                ", ".join(hints))
