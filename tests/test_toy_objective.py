"""The objective contract, shown by a new method: REINFORCE with a constant baseline.

`ReinforceObjective` below is what a contributor writes as one new file in `src/tuneforge/methods/`
(docs/objectives.md walks through it); the test's `monkeypatch.setitem(_REGISTRY, ...)` is the one
registry line in `methods/__init__.py`. It is kept test-only: a shipped method would also need its
docs and user-facing keys, and this one exists to prove the contract, not to train models. It is
registered as `rl: reinforce`, a name no shipped method uses: the test adds its row to
config/methods.py's METHODS as a new method would, and sets `rl` on a validated config directly
(a shipped method adds its name to config/rl.py's RLMethod instead).

Per prompt, `num_generations` completions y_i are sampled; with reward r_i and the constant baseline b
(0.5 here) the loss of the step is

    L = -(1/N) sum_i (r_i - b) log pi(y_i | x_i)        N = completions of the whole optimizer step

so `loss` returns the micro-batch's sum over its completions divided by N, as the contract requires.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from tuneforge.methods.base import Batch, Objective
from tuneforge.methods.grpo.layout import completion_logps, training_layout
from tuneforge.methods.rewards import RewardSet

BASELINE = 0.5


class ReinforceObjective(Objective):
    """REINFORCE with a constant baseline over sampled completions of prompt rows."""

    name = "reinforce"
    row_columns = ("input_ids", "prompt_json", "columns_json", "_row")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.samples = cfg.trl.num_generations
        self.rewards = RewardSet.from_config(cfg)
        self.tokenizer = self.params = self.sampler = None

    def prepare_data(self, tokenizer, *, rebuild: bool = False):
        from tuneforge.data.formats.grpo import prepare_prompts
        from tuneforge.rollout.base import SamplingParams

        self.tokenizer = tokenizer
        self.params = SamplingParams.from_trl(self.cfg.trl, tokenizer, self.cfg.trl.max_completion_length or 8)
        return prepare_prompts(self.cfg, tokenizer)

    def collate(self, rows: list[list[dict]], pad_id: int, *, training: bool) -> Batch:
        docs = [d for row in rows for d in row]
        return {"prompt_ids": [list(d["input_ids"]) for d in docs],
                "prompts": [json.loads(d["prompt_json"]) for d in docs], "pad_id": pad_id}

    def rollout_step(self, model, batches: list[Batch]) -> list[Batch]:
        if self.sampler is None:
            from tuneforge.rollout.factory import build_samplers

            self.sampler = build_samplers(self.cfg, model, self.tokenizer, use_vllm=False, fp8_kv_cache=False,
                                          async_prefetch=False, prefetch_depth=1).sampler
        return [self._sample(model, b) for b in batches]

    @torch.no_grad()
    def _sample(self, model, batch: Batch) -> Batch:
        n = self.samples
        rollout = self.sampler.generate(batch["prompt_ids"], n, self.params)
        texts = self.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        prompts = [p for p in batch["prompts"] for _ in range(n)]
        rewards = self.rewards.compute(prompts, texts, rollout.completion_ids, {}).nan_to_num(0.0)
        combined = (rewards * self.rewards.weights.to(rewards)).sum(1).float()
        prompt_ids = [p for p in rollout.prompt_ids for _ in range(n)]
        out = training_layout(prompt_ids, rollout.completion_ids, batch["pad_id"])
        device = next(model.parameters()).device
        out = {k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}
        out["reward"] = combined.to(device)
        return out

    def num_items(self, batch: Batch) -> int:
        return len(batch["reward"])  # the loss is a mean over the completions of the step

    def loss(self, model, batch: Batch, num_items: int):
        logps = completion_logps(model, batch, 1.0)  # [N, C], 0 outside the completion
        sequence_logps = logps.sum(-1)
        total = -((batch["reward"] - BASELINE) * sequence_logps).sum()
        sums = {"loss_sum": float(total.detach()), "reward_sum": float(batch["reward"].sum()),
                "completions": float(len(batch["reward"]))}
        return total / max(num_items, 1), sums

    def summarize(self, sums: dict[str, float], num_items: int) -> dict[str, float]:
        return {"loss": sums["loss_sum"] / max(num_items, 1),
                "reward": sums["reward_sum"] / max(sums["completions"], 1.0)}

    def close(self) -> None:
        self.rewards.close()


@pytest.fixture
def toy(tmp_path, write_jsonl, write_config, monkeypatch):
    from tuneforge import methods
    from tuneforge.config import load
    from tuneforge.config.methods import METHODS, MethodFacts

    monkeypatch.setitem(methods._REGISTRY, "reinforce", ReinforceObjective)  # the one registry line
    monkeypatch.setitem(METHODS, "reinforce", MethodFacts(rows="prompts"))  # its row in config/methods.py
    (tmp_path / "toy_rewards.py").write_text(textwrap.dedent("""
        def hits(completions, **kwargs):
            return [1.0 if "7" in c else 0.0 for c in completions]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    write_jsonl([{"prompt": f"hello {i}"} for i in range(32)], "prompts.jsonl")

    def config(**top):
        cfg = load(write_config({
            "rl": "grpo", "datasets": [{"path": "prompts.jsonl", "type": "prompt"}],
            "trl": {"num_generations": 4, "max_completion_length": 6, "reward_funcs": ["toy_rewards.hits"]},
            "micro_batch_size": 2, "seed": 0, "save_strategy": "no", "logging_steps": 1, **top}))
        return cfg.model_copy(update={"rl": "reinforce"})  # RLMethod lists shipped methods only

    return config


def test_the_toy_loss_is_the_reinforce_sum_over_the_step(toy, tiny_tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tuneforge.methods import get_objective

    obj = get_objective(toy(gradient_accumulation_steps=2))
    assert isinstance(obj, ReinforceObjective)
    assert obj.step_shape().rows_per_micro_batch == 2 and obj.step_shape().micro_batches_per_step == 2
    data = obj.prepare_data(tiny_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    torch.manual_seed(0)
    planned = [obj.collate([[data.train[i]], [data.train[i + 1]]], 0, training=True) for i in (0, 2)]
    batches = obj.rollout_step(model, planned)
    n = sum(obj.num_items(b) for b in batches)
    assert n == 2 * 2 * 4  # 2 micro-batches x 2 prompts x 4 completions
    for b in batches:
        loss, sums = obj.loss(model, b, n)
        # closed form, from the full logits of a plain forward of each prompt+completion
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits.float()
        token = logits.log_softmax(-1).gather(-1, b["target_ids"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        per_row = (token * (b["target_ids"] != -100)).sum(-1)
        expected = -((b["reward"] - BASELINE) * per_row).sum() / n
        assert torch.allclose(loss.detach(), expected, atol=1e-5), (loss, expected)
        assert sums["completions"] == 8.0


def test_the_toy_objective_trains_through_the_real_loop(toy):
    from tuneforge.engine.run import train

    result = train(toy(max_steps=3, learning_rate=1e-3), show_progress=False)
    records = [r for r in result.history if r["type"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(0.0 <= r["reward"] <= 1.0 and "loss" in r for r in records)
