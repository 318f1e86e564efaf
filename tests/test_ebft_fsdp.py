"""EBFT under FSDP2 (structured mode with full fine-tuning and LoRA, strided mode), run for real on two CPU
processes (torchrun, gloo).

Under FSDP2 the policy is sharded for the loss, and an online method generates from a whole copy of it
refreshed from the shards before each generation (engine/trainer.py). EBFT's feature network sits on
that side: with LoRA it is the generation copy with its adapter disabled, with full fine-tuning the
frozen copy of the starting weights (one whole copy per process, not sharded: docs/ebft.md). Either way
two sharded processes must give the same generations, feature-matching rewards and losses as data
parallelism on the same data (which replicates the model; sampling is seeded per process, so both runs
draw the same completions). Step 3 generates after two updates (structured mode reuses step 1's
generation for step 2, num_iterations 2; strided mode generates every step): a feature network
that moved with the policy (an adapter left enabled, a copy refreshed from the shards) would score
differently there, and a generation copy that was not refreshed would sample differently.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

FSDP = {"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}}
TOL = 1e-4  # fp32; the GRPO test of tests/test_fsdp.py uses the same tolerance
LORA = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True}
COMPARED = ("loss", "reward", "ebft/alignment", "ebft/diversity", "ebft/cfm_loss", "ebft/reward",
            "completions/mean_length")


def _run(tmp_path, name: str, keys: dict) -> dict[int, dict]:
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**keys, "output_dir": str(tmp_path / name)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                           "tuneforge.cli", "train", str(tmp_path / f"{name}.yaml")], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r["type"] == "train"}


ROOT = Path(__file__).resolve().parents[1]
STRIDED = {"ebft": {"mode": "strided", "stride": 4, "context_length": 4, "generate_max_len": 4,
                    "n_samples_per_prompt": 4, "temperature": 1.0, "embed_method": "mean_pooling",
                    "feature_layers": [0.0, 0.5]},
           "datasets": [{"path": str(ROOT / "examples" / "ebft-strided-tiny.jsonl"), "type": "completion"}],
           "sequence_len": 48, "micro_batch_size": 2}


@pytest.mark.slow
# Structured mode with LoRA (the feature network is the adapter-disabled generation copy) and strided mode with full
# fine-tuning (the unsharded frozen copy); structured full fine-tuning uses that same frozen copy, and CI time is
# kept for the two paths that differ.
# Structured mode also with trl.async_prefetch: the next generation runs in a background thread from a snapshot of
# the whole copy, while the feature network scores on the training thread.
@pytest.mark.parametrize("keys", [LORA, STRIDED, {**LORA, "async": True}],
                         ids=["structured-lora", "strided-full", "structured-lora-async"])
def test_ebft_under_fsdp2_matches_data_parallelism(tmp_path, tiny_model_dir, keys):
    rows = [{"prompt": f"copy: {w} ->", "ground_truth": f" {w}"} for w in ("the cat", "a dog", "one", "big house",
                                                                          "red", "two birds", "sun", "a b c")]
    (tmp_path / "gt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {"base_model": str(tiny_model_dir), "rl": "ebft", "datasets": [{"path": "gt.jsonl", "type": "prompt"}],
            "ebft": {"embed_method": "completion_mean", "feature_layers": [0.5, 1.0]},
            "trl": {"num_generations": 4, "max_completion_length": 6, "num_iterations": 2},
            "micro_batch_size": 4, "max_steps": 3, "learning_rate": 1e-2, "logging_steps": 1,
            "save_strategy": "no", "seed": 3, **keys}
    if base.pop("async", False):
        base["trl"]["async_prefetch"] = True
    plain, sharded = _run(tmp_path, "plain", base), _run(tmp_path, "fsdp", {**base, **FSDP})
    assert sorted(sharded) == sorted(plain) == [1, 2, 3]
    compared = [k for k in COMPARED if k in plain[1]]
    assert len(compared) >= 5, plain[1]
    for step in (1, 2, 3):
        for key in compared:
            assert abs(sharded[step][key] - plain[step][key]) <= TOL, (step, key, plain, sharded)
    # The run trained: step 3's generation comes from updated weights, so its features moved.
    assert plain[3]["ebft/alignment"] != plain[1]["ebft/alignment"]


def test_fsdp2_accepts_every_sampler_as_for_grpo(tiny_model_dir):
    from tuneforge.config import load

    base = {"base_model": str(tiny_model_dir), "rl": "ebft", "datasets": [{"path": "gt.jsonl", "type": "prompt"}],
            "trl": {"num_generations": 4}, "micro_batch_size": 4, **FSDP}
    load(data=base)  # synchronous sampling
    load(data={**base, "trl": {**base["trl"], "async_prefetch": True}})  # the embedded engine's prefetching
    load(data={**base, "trl": {**base["trl"], "use_vllm": True}})  # a generation server, fed from the whole copy


@pytest.mark.slow
def test_ebft_lora_under_fsdp2_with_a_generation_server(tmp_path, tiny_model_dir):
    """trl.use_vllm under FSDP2: both processes generate on the server, which gets the policy (adapter merged)
    from the first process's whole copy once per generation; the feature network scores on the trainer."""
    from transformers import AutoModelForCausalLM

    from tuneforge.rollout.generation_server import EmbeddedBackend, GenerationServer

    rows = [{"prompt": f"copy: {w} ->", "ground_truth": f" {w}"} for w in ("the cat", "a dog", "one", "red")]
    (tmp_path / "gt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    with GenerationServer(EmbeddedBackend(model)) as server:
        trl = {"num_generations": 4, "max_completion_length": 6, "num_iterations": 2, "use_vllm": True,
               "vllm_mode": "server", "vllm_server_host": server.host, "vllm_server_port": server.port,
               "vllm_server_timeout": 30}
        steps = _run(tmp_path, "fsdp", {
            "base_model": str(tiny_model_dir), "rl": "ebft", "datasets": [{"path": "gt.jsonl", "type": "prompt"}],
            "ebft": {"embed_method": "completion_mean", "feature_layers": [0.5, 1.0]}, "trl": trl,
            "micro_batch_size": 4, "max_steps": 3, "learning_rate": 1e-2, "logging_steps": 1, "save_strategy": "no",
            **LORA, **FSDP})
        paths = [p for p, _ in server.calls]
    assert sorted(steps) == [1, 2, 3] and all("ebft/alignment" in r for r in steps.values())
    assert paths.count("/generate/") == 4  # steps 1 and 3 generate (num_iterations 2), on both processes
    assert paths.count("/reset_prefix_cache/") == 2  # one push before each generation, by one process
