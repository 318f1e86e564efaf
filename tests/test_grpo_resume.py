"""Exact resume for GRPO: a run resumed from checkpoint-3 logs the same losses and rewards and ends with
the same weights as the uninterrupted run, also when generations outlive a step (async prefetch trains
on the previous step's completions; num_iterations reuses one generation for several steps)."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from test_grpo_learning import _train, toy  # noqa: F401 - the fixture


def _config(write_config, out, trl: dict, **extra):
    from tuneforge.config import load

    return load(write_config({
        "rl": "grpo", "datasets": [{"path": "prompts.jsonl", "type": "prompt"}],
        "trl": {"num_generations": 4, "max_completion_length": 6, "reward_funcs": ["toy_rewards.hits"], **trl},
        "micro_batch_size": 16, "max_steps": 5, "learning_rate": 5e-3, "lr_scheduler": "constant",
        "optimizer": "adamw_torch", "logging_steps": 1, "save_strategy": "steps", "save_steps": 1, "seed": 0,
        "output_dir": str(out), **extra}))


def _steps(result) -> dict[int, dict]:
    return {r["step"]: r for r in result.history if r["type"] == "train"}


def _run_and_resume(write_config, tmp_path, trl: dict, drop_objective_state: bool = False):
    full = _steps(_train(_config(write_config, tmp_path / "full", trl)))
    ckpt = tmp_path / "full" / "checkpoint-3"
    if drop_objective_state:
        (ckpt / "objective_state_0.pt").unlink()
    resumed = _steps(_train(_config(write_config, tmp_path / "resumed", trl, resume_from_checkpoint=str(ckpt))))
    return full, resumed


@pytest.mark.parametrize("trl", [{}, {"async_prefetch": True}, {"num_iterations": 2}],
                         ids=["on-policy", "async-prefetch", "num-iterations-2"])
@pytest.mark.usefixtures("toy")
def test_grpo_resume_is_exact(write_config, tmp_path, trl):
    full, resumed = _run_and_resume(write_config, tmp_path, trl)
    assert sorted(resumed) == [4, 5]
    assert any(full[s]["loss"] != 0 for s in (4, 5))  # something was trained after the checkpoint
    for s in (4, 5):
        assert resumed[s]["reward"] == full[s]["reward"], (s, full[s], resumed[s])
        assert abs(resumed[s]["loss"] - full[s]["loss"]) <= 1e-6, (s, full[s], resumed[s])
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.usefixtures("toy")
def test_without_the_objective_state_async_resume_is_not_exact(write_config, tmp_path):
    """The test above can fail: without the prefetched completions the resumed run generates the step's
    own batch synchronously, and trains on other completions than the original run."""
    full, resumed = _run_and_resume(write_config, tmp_path, {"async_prefetch": True}, drop_objective_state=True)
    assert any(abs(resumed[s]["loss"] - full[s]["loss"]) > 1e-6 or resumed[s]["reward"] != full[s]["reward"]
               for s in (4, 5))
