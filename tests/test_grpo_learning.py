"""End-to-end GRPO on CPU through `tuneforge train`'s code path: a tiny random Llama learns a toy
verifiable task, and a constant reward leaves the weights exactly where they were.

Task: the reward is 1 when the 8-token completion's text contains the digit "7", else 0. 17 of the
tiny tokenizer's 1000 tokens contain a 7, so at init that happens by chance ~13% of the time
(1 - (1 - 17/1000)^8) and most groups of 8 have reward variance from the first step.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch


@pytest.fixture
def toy(tmp_path, write_jsonl, monkeypatch):
    (tmp_path / "toy_rewards.py").write_text(textwrap.dedent("""
        def hits(completions, **kwargs):
            return [1.0 if "7" in c else 0.0 for c in completions]

        def constant(completions, **kwargs):
            return [1.0] * len(completions)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    write_jsonl([{"prompt": f"hello {i}"} for i in range(64)], "prompts.jsonl")
    return tmp_path


def _config(write_config, reward: str, loss_type: str, steps: int, lr: float = 6e-3, **trl):
    from tuneforge.config import load

    path = write_config({
        "rl": "grpo",
        "datasets": [{"path": "prompts.jsonl", "type": "prompt"}],
        "trl": {"num_generations": 8, "max_completion_length": 8, "reward_funcs": [f"toy_rewards.{reward}"],
                "loss_type": loss_type, **trl},
        "micro_batch_size": 64, "gradient_accumulation_steps": 1, "max_steps": steps, "learning_rate": lr,
        "lr_scheduler": "constant", "optimizer": "adamw_torch", "weight_decay": 0.0, "logging_steps": 1,
        "save_strategy": "no", "seed": 0,
    })
    return load(path)


def _train(cfg):
    from tuneforge.engine.run import train

    return train(cfg, show_progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_reward_rises_from_chance_to_above_0_8(toy, write_config, loss_type):
    result = _train(_config(write_config, "hits", loss_type, steps=25))
    rewards = [r["reward"] for r in result.history if r["type"] == "train"]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-10:]) / 10
    assert first < 0.4, rewards  # near chance at the start
    assert last > 0.8, rewards


@pytest.mark.slow
def test_async_prefetch_with_importance_correction_still_learns(toy, write_config):
    """Off-policy learning: completions sampled with weights one step old, token_truncate IS with C = 3."""
    cfg = _config(write_config, "hits", "dapo", steps=25, async_prefetch=True,
                  vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_cap=3.0)
    train = [r for r in _train(cfg).history if r["type"] == "train"]
    rewards = [r["reward"] for r in train]
    assert sum(rewards[-10:]) / 10 > 0.8, rewards
    ratios = [r["sampling/importance_sampling_ratio/mean"] for r in train[1:]]  # step 1 is on-policy
    assert all(0.8 < w < 1.2 for w in ratios), ratios


def test_constant_reward_leaves_weights_bitwise_unchanged(toy, write_config, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    cfg = _config(write_config, "constant", "dapo", steps=3, log_completions=True, num_completions_to_print=2)
    result = _train(cfg)
    before = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).state_dict()
    after = result.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    train = [r for r in result.history if r["type"] == "train"]
    assert all(r["frac_reward_zero_std"] == 1.0 and r["skipped_batches"] == 1.0 for r in train)
    assert (cfg.output_path() / "metrics.jsonl").exists()
    assert json.loads((cfg.output_path() / "metrics.jsonl").read_text().splitlines()[0])["reward"] == 1.0
    logged = [json.loads(x) for x in (cfg.output_path() / "completions.jsonl").read_text().splitlines()]
    assert len(logged) == 6 and all(r["reward"] == 1.0 and r["advantage"] == 0.0 for r in logged)
    assert logged[0]["prompt"].startswith("hello ")


def test_grpo_resume_is_exact(toy, write_config):
    """Interrupted at step 3 and resumed: the same completions (sampling RNG restored), rewards and losses."""
    from tuneforge.config import load

    def run(name: str, **extra):
        cfg = _config(write_config, "hits", "dapo", steps=6)
        path = write_config({**cfg.model_dump(exclude_unset=True, exclude={"base_model", "output_dir"}),
                             "output_dir": str(toy / name), "save_strategy": "steps", "save_steps": 1, **extra}, name=f"{name}.yaml")
        return [r for r in _train(load(path)).history if r["type"] == "train"]

    full = run("full")
    ckpt = toy / "full" / "checkpoint-3"
    assert (ckpt / "optimizer.pt").exists()
    resumed = run("resumed", resume_from_checkpoint=str(ckpt))
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert len({r["reward"] for r in full}) > 1  # the rewards vary, so equality below is informative
    for a, b in zip(full[3:], resumed, strict=True):
        assert a["reward"] == b["reward"] and abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
