"""GRPO and GDPO (`rl: grpo`, `rl: gdpo`): online RL with group-relative advantages, as an objective.

One optimizer step of the engine loop, for this objective:

    rollout_step([prompts])     sample num_generations completions per prompt (embedded engine, the
                                async prefetcher, or vLLM; `rollout/factory.py`), score them with the
                                reward functions; no-grad passes for pi_old (when needed) and pi_ref
                                (beta != 0); importance weights for off-policy samples. Then the
                                advantages (statistics of the whole generation, over every process for
                                scale_rewards: batch and GDPO), and the split into micro-batches of
                                `micro_batch_size` completions
    num_items(micro-batch)      the loss items of `loss_type`
    loss(micro-batch)           one forward over prompt+completion rows, per-token log-probs of the
                                completion at the sampling temperature, the clipped surrogate
                                (loss.token_loss) and the aggregation of `loss_type`

Batch geometry (as in TRL with `steps_per_generation` = gradient accumulation): `micro_batch_size`
counts completions. One generation per optimizer step covers `micro_batch_size x
gradient_accumulation_steps / num_generations` prompts (the step shape: one planned micro-batch of
them); their advantages are computed over the whole generation, then the completions are split into
micro-batches of `micro_batch_size` (a group may span two micro-batches). `num_iterations: mu` reuses
one generation for mu optimizer steps (`buffer.GenerationBuffer`; the prompts the loop hands in
meanwhile are skipped), with pi_old fixed at generation.

pi_old: on-policy with num_iterations 1, pi_old = pi.detach() (ratio exactly 1, REINFORCE with a group
baseline). Otherwise, and for off-policy samplers, a no-grad pass at rollout time with the current
weights gives pi_old, and the sampler's own log-probs give the importance weight pi_old / pi_sampler.
"""

from __future__ import annotations

import json
import logging
import time
from types import SimpleNamespace

import torch

from tuneforge.config.schema import Config
from tuneforge.distributed import collectives

from ..base import Batch, Objective, StepShape
from ..reference import Reference, disable_dropout
from ..rewards import RewardSet
from . import loss as grpo_loss
from . import metrics
from .buffer import GenerationBuffer
from .layout import completion_logps, split_rollout, training_layout
from .settings import GRPOSettings, completions_per_micro_batch

log = logging.getLogger("tuneforge")


class GRPOObjective(Objective):
    name = "grpo"
    row_columns = ("input_ids", "prompt_json", "columns_json", "_row")
    # A step's prompts are one planned batch whose rewards are normalised together (scale_rewards: batch);
    # its completions are cut into micro-batches of micro_batch_size after generation instead.
    splits_micro_batches = False

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.settings = GRPOSettings.from_config(cfg)
        self.rewards = self._reward_set(cfg)  # import errors surface before any model loads
        self.completions_per_micro_batch = completions_per_micro_batch(cfg, self.settings.num_generations)
        log.info("GRPO: %d prompts x %d generations per optimizer step, in micro-batches of %d completions",
                 self.step_shape().rows_per_micro_batch, self.settings.num_generations,
                 self.completions_per_micro_batch)
        self.reference = Reference(cfg) if self.settings.beta != 0.0 else None
        self.buffer = GenerationBuffer(self.settings.num_iterations)
        self.tokenizer = None
        self.params = None  # rollout.base.SamplingParams, once the tokenizer is known
        self.sampler = None
        self.prefetcher = None
        self._ready: set[int] = set()  # models set up for generation (id)
        self._restored_prefetch: dict | None = None
        self._train_clock: float | None = None
        self._last_train_seconds = 0.0
        self._completions = None  # engine.samples_writer.SamplesWriter with trl.log_completions

    def _reward_set(self, cfg: Config) -> RewardSet:
        """The rewards the completions are scored with (EBFT replaces the reward functions)."""
        return RewardSet.from_config(cfg)

    def step_shape(self) -> StepShape:
        # The step's prompts arrive as one planned micro-batch (checked to divide); rollout_step splits
        # their completions into micro-batches of micro_batch_size.
        prompts = self.completions_per_micro_batch * self.cfg.grad_accum // self.settings.num_generations
        return StepShape(rows_per_micro_batch=prompts, micro_batches_per_step=1)

    # ---- data
    def prepare_data(self, tokenizer, *, rebuild: bool = False):
        from tuneforge.data.formats.grpo import prepare_prompts
        from tuneforge.rollout.base import SamplingParams

        self.tokenizer = tokenizer
        if self.reference is not None:
            self.reference.tokenizer = tokenizer
        self.params = SamplingParams.from_trl(self.cfg.trl, tokenizer, self.settings.max_completion_length)
        return prepare_prompts(self.cfg, tokenizer)  # prompts are not cached: nothing to rebuild

    def collate(self, rows: list[list[dict]], pad_id: int, *, training: bool) -> Batch:
        docs = [d for row in rows for d in row]
        return {
            "prompt_ids": [list(d["input_ids"]) for d in docs],
            "prompts": [json.loads(d["prompt_json"]) for d in docs],
            "columns": [json.loads(d["columns_json"]) for d in docs],
            "rows": [int(d.get("_row", -1)) for d in docs],
            "pad_id": pad_id,
            "num_target_tokens": 0,
        }

    # ---- one optimizer step
    def rollout_step(self, model, batches: list[Batch]) -> list[Batch]:
        self._setup(model)
        if self._train_clock is not None:
            self._last_train_seconds = time.perf_counter() - self._train_clock
        if self.buffer.start_step():
            rolled = [self.buffer.replayed(i) for i in range(len(batches))]
        else:
            rolled = [self._generate_and_score(model, b) for b in batches]
            for rollout in rolled:
                self.buffer.add(rollout)
        self._set_advantages(self.buffer.end_step())  # over the whole generation, before it is split
        self._train_clock = time.perf_counter()
        return [chunk for b in rolled for chunk in split_rollout(b, self.completions_per_micro_batch)]

    def _setup(self, model) -> None:
        if id(model) in self._ready:
            return
        from tuneforge.rollout.factory import build_samplers

        disable_dropout(model)  # pi_old, pi and pi_ref must agree on the same tokens
        self._ready.add(id(model))
        s = self.settings
        built = build_samplers(self.cfg, model, self.tokenizer, use_vllm=s.use_vllm, fp8_kv_cache=s.rounded_kv_cache,
                               async_prefetch=s.async_prefetch, prefetch_depth=s.prefetch_depth)
        self.sampler, self.prefetcher = built.sampler, built.prefetcher
        if self.prefetcher is not None and self._restored_prefetch:
            self.prefetcher.load_state_dict(self._restored_prefetch)
        self.buffer.to(next(model.parameters()).device)

    def _generate(self, model, batch: Batch):
        """(rollout, off-policy?, the prompt batch the rollout belongs to)."""
        s, prompts = self.settings, batch["prompt_ids"]
        if self.prefetcher is not None:
            rollout, queued, batch = self.prefetcher.step(model, prompts, s.num_generations, self.params, tag=batch)
            return rollout, queued or s.use_vllm or s.rounded_kv_cache, batch
        if not s.use_vllm or self.buffer.rollouts % s.sync_interval == 0:
            self.sampler.sync_weights(model)  # embedded: a no-op, or the half-precision copy's refresh
        return self.sampler.generate(prompts, s.num_generations, self.params), s.use_vllm or s.rounded_kv_cache, batch

    @torch.no_grad()
    def _generate_and_score(self, model, batch: Batch) -> Batch:
        s, G = self.settings, self.settings.num_generations
        # A prefetched rollout belongs to earlier prompts: their columns and rows come back with it.
        rollout, off_policy, source = self._generate(model, batch)
        self.buffer.rollouts += 1
        texts, per_func = self._score(source, rollout, step=self.buffer.rollouts - 1)
        prompt_ids = [p for p in rollout.prompt_ids for _ in range(G)]
        device = next(model.parameters()).device
        scored = {k: v.to(device) if torch.is_tensor(v) else v
                  for k, v in training_layout(prompt_ids, rollout.completion_ids, source["pad_id"]).items()}
        truncated = torch.tensor([not f for f in rollout.finished], device=device)
        mask = scored["token_valid"].clone()
        if s.mask_truncated:
            mask &= ~truncated.unsqueeze(1)
        sampler_logps = torch.zeros(mask.shape, device=device)
        for i, lp in enumerate(rollout.logprobs):
            sampler_logps[i, : len(lp)] = torch.tensor(lp, device=device)
        scored.update(mask=mask, truncated=truncated, rewards_per_func=per_func, sampler_logps=sampler_logps,
                      off_policy=off_policy, gen_seconds=rollout.seconds, gen_tokens=rollout.num_tokens, texts=texts,
                      prompt_texts=[p if isinstance(p, str) else p[-1]["content"] for p in source["prompts"]])
        if s.num_iterations > 1 or (off_policy and s.correct_is) or s.opsm is not None:
            scored["old_logps"] = completion_logps(model, scored, s.temperature)
        if off_policy and s.correct_is:
            scored["is_weights"] = grpo_loss.importance_weights(scored["old_logps"], sampler_logps, mask, s.is_mode,
                                                                cap=s.is_cap, floor=s.is_floor)
        if self.reference is not None:
            with self.reference.network(model) as net:
                scored["ref_logps"] = completion_logps(net, scored, s.temperature)
        scored["advantages"] = torch.zeros(len(prompt_ids), device=device)  # set by _set_advantages
        return scored

    def _score(self, source: Batch, rollout, step: int | None = None) -> tuple[list[str], torch.Tensor]:
        """(completion texts, rewards [N, reward functions]) of a rollout of `source`'s prompts."""
        G = self.settings.num_generations
        prompts = [p for p in source["prompts"] for _ in range(G)]
        columns = {k: [c.get(k) for c in source["columns"] for _ in range(G)] for k in _keys(source["columns"])}
        rows = [r for r in source["rows"] for _ in range(G)]
        texts = self.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        chat = bool(prompts) and isinstance(prompts[0], list)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
        extra = None if step is None else {"trainer_state": SimpleNamespace(global_step=step),
                                           "max_completion_length": self.settings.max_completion_length}
        per_func = self.rewards.compute(prompts, completions, rollout.completion_ids, columns, rows, extra=extra)
        return texts, per_func

    def _set_advantages(self, pending: list[Batch]) -> None:
        """Advantages of this step's new rollouts (batch statistics span all of them and every process)."""
        if not pending:
            return
        s, weights = self.settings, self.rewards.weights.to(torch.float64)
        stats = None
        if grpo_loss.needs_batch_stats(s.scale_rewards, s.aggregation):
            every = torch.cat([b["rewards_per_func"] for b in pending])
            whole = grpo_loss.group_advantages(every, weights, s.num_generations, scale_rewards=s.scale_rewards,
                                               aggregation=s.aggregation)
            stats = grpo_loss.batch_mean_std(whole.rewards, collectives.sum_tensor)  # TRL gathers over processes too
        for b in pending:
            adv = grpo_loss.group_advantages(b["rewards_per_func"], weights, s.num_generations,
                                             scale_rewards=s.scale_rewards, aggregation=s.aggregation,
                                             batch_stats=stats)
            b["advantages"] = adv.advantages.to(b["mask"].device, torch.float32)
            b["combined_rewards"] = adv.rewards
            b["std_is_zero"] = adv.std_is_zero
        if s.log_completions:
            self._log_completions(pending[0])

    def num_items(self, batch: Batch) -> int:
        return grpo_loss.loss_items(self.settings.loss_type, batch["mask"])

    # ---- loss
    def loss(self, model, batch: Batch, num_items: int) -> tuple[torch.Tensor, dict[str, float]]:
        s, adv, mask = self.settings, batch["advantages"], batch["mask"]
        sums = metrics.rollout_sums(batch, self.rewards.short_names, self._last_train_seconds)
        if s.skip_zero_advantage and s.beta == 0.0 and not bool(adv.any()):
            # No policy-gradient signal: skip the forward, but touch every trainable parameter with a zero
            # so data-parallel gradient reduction still sees all of them.
            zero = sum((p.reshape(-1)[:1] * 0.0).sum() for p in model.parameters() if p.requires_grad)
            return zero, {**sums, "skipped_batches": 1.0}
        logps = completion_logps(model, batch, s.temperature)
        keep = None
        if s.opsm is not None:
            sampled = batch["sampler_logps"] if batch["off_policy"] else batch["old_logps"]
            keep = grpo_loss.off_policy_keep(adv, logps, sampled, mask, s.opsm)
        terms = grpo_loss.token_loss(logps, batch.get("old_logps"), adv, mask, epsilon_low=s.epsilon,
                                     epsilon_high=s.epsilon_high, delta=s.delta, level=s.level, beta=s.beta,
                                     ref_logps=batch.get("ref_logps"), is_weights=batch.get("is_weights"), keep=keep,
                                     bias_corrected_kl=s.bias_corrected_kl)
        total = grpo_loss.loss_sum(terms.loss, mask, s.loss_type, s.max_completion_length)
        sums.update(metrics.loss_sums(total, terms, mask))
        return total / max(num_items, 1), sums

    def summarize(self, sums: dict[str, float], num_items: int) -> dict[str, float]:
        return metrics.summarize(sums, num_items)

    # ---- evaluation: mean reward of sampled completions on held-out prompts
    @torch.no_grad()
    def evaluate(self, model, batch: Batch) -> dict[str, float]:
        self._setup(model)
        rollout = self.sampler.generate(batch["prompt_ids"], self.settings.num_generations, self.params)
        _, per_func = self._score(batch, rollout)
        combined = grpo_loss.combine_rewards(per_func, self.rewards.weights.to(torch.float64))
        ok = ~torch.isnan(combined)
        return {"reward_sum": float(combined[ok].sum()), "reward_count": float(ok.sum()),
                "length_sum": float(sum(len(c) for c in rollout.completion_ids)), "completions": float(len(combined))}

    def summarize_eval(self, sums: dict[str, float]) -> dict[str, float]:
        return {"reward": sums.get("reward_sum", 0.0) / max(sums.get("reward_count", 0.0), 1.0),
                "completions/mean_length": sums.get("length_sum", 0.0) / max(sums.get("completions", 0.0), 1.0)}

    # ---- logging
    def _log_completions(self, batch: Batch) -> None:
        from tuneforge.engine.samples_writer import SamplesWriter  # engine sits beside methods: imported late

        k, G = min(self.settings.completions_to_print, len(batch["texts"])), self.settings.num_generations
        records = [{"step": self.buffer.rollouts, "prompt": batch["prompt_texts"][i // G],
                    "completion": batch["texts"][i], "reward": metrics.finite(batch["combined_rewards"][i]),
                    "advantage": float(batch["advantages"][i])} for i in range(k)]
        for r in records:
            log.info("completion (reward %s, advantage %.3f): %r", r["reward"], r["advantage"], r["completion"][:200])
        if self._completions is None:
            self._completions = SamplesWriter(self.cfg.output_path() / "completions.jsonl")
        self._completions.write(records)

    # ---- checkpoints: the generations still to be trained on travel with the checkpoint
    def state_dict(self) -> dict:
        state = self.buffer.state_dict()
        if self.prefetcher is not None:  # waits for the rollouts in flight (before the RNG state is saved)
            state["prefetch"] = self.prefetcher.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state)
        self._restored_prefetch = state.get("prefetch")  # the prefetcher is built with the first rollout

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.rewards.close()


class GDPOObjective(GRPOObjective):
    """GRPO with each reward normalised within its group before the weighted sum (normalize_then_sum)."""

    name = "gdpo"


def _keys(columns: list[dict]) -> list[str]:
    keys: dict[str, None] = {}
    for c in columns:
        keys.update(dict.fromkeys(c))
    return [k for k in keys if k not in ("prompt", "completion", "completion_ids", "prompts", "completions")]
