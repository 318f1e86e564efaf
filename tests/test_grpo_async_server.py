"""`trl.async_prefetch` with a generation server (`use_vllm`, `vllm_mode: server`): the server generates the
next prompts while the current step trains, from weights pushed once per step; against tuneforge's own
server (which speaks vLLM's endpoints) on the toy task of test_grpo_learning.py."""

from __future__ import annotations

import json
import textwrap

import pytest


@pytest.fixture
def served(tmp_path, write_jsonl, monkeypatch, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tuneforge.rollout.generation_server import EmbeddedBackend, GenerationServer

    (tmp_path / "srv_toy_rewards.py").write_text(textwrap.dedent("""
        def hits(completions, **kwargs):
            return [1.0 if "7" in c else 0.0 for c in completions]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    write_jsonl([{"prompt": f"hello {i}"} for i in range(64)], "prompts.jsonl")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    with GenerationServer(EmbeddedBackend(model)) as server:
        yield server


def _config(write_config, server, steps: int, **trl):
    from tuneforge.config import load

    return load(write_config({
        "rl": "grpo", "datasets": [{"path": "prompts.jsonl", "type": "prompt"}],
        "trl": {"num_generations": 4, "max_completion_length": 6, "reward_funcs": ["srv_toy_rewards.hits"],
                "loss_type": "dapo", "use_vllm": True, "vllm_mode": "server", "vllm_server_host": server.host,
                "vllm_server_port": server.port, "vllm_server_timeout": 30, "log_completions": True,
                "num_completions_to_print": 64, **trl},
        "micro_batch_size": 16, "max_steps": steps, "learning_rate": 6e-3, "lr_scheduler": "constant",
        "optimizer": "adamw_torch", "logging_steps": 1, "save_strategy": "no", "seed": 0,
    }))


def test_server_generates_the_next_batch_one_step_behind(served, write_config):
    from tuneforge.engine.run import train

    cfg = _config(write_config, served, steps=4, async_prefetch=True)
    history = [r for r in train(cfg, show_progress=False).history if r["type"] == "train"]
    paths = [p for p, _ in served.calls]
    assert paths.count("/reset_prefix_cache/") == 4  # one weight push per step, each before a submission
    assert paths.count("/generate/") >= 4  # step 0's own batch, then one submission per step
    logged = [json.loads(x) for x in (cfg.output_path() / "completions.jsonl").read_text().splitlines()]
    prompts = {}
    for row in logged:
        prompts.setdefault(row["step"], []).append(row["prompt"])
    assert sorted(prompts) == [1, 2, 3, 4], sorted(prompts)
    # Step 1 generates its own prompts; step 2 trains on the same prompts, generated in the background
    # during step 1 with the weights pushed before it; from then on each step trains the previous prompts.
    assert sorted(prompts[1]) == sorted(prompts[2]) and sorted(prompts[3]) != sorted(prompts[2])
    ratios = [r["sampling/importance_sampling_ratio/mean"] for r in history]
    assert abs(ratios[0] - 1) < 1e-4, ratios  # generated from the weights just pushed


def test_deeper_prefetch_is_refused(served, write_config):
    from tuneforge.errors import TuneforgeError
    from tuneforge.methods.grpo.settings import GRPOSettings

    with pytest.raises(TuneforgeError, match="prefetch_depth: 1"):
        GRPOSettings.from_config(_config(write_config, served, 2, async_prefetch=True, prefetch_depth=2))
