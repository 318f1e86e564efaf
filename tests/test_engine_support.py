"""Helpers shared by the engine tests (tiny pre-tokenized data, configs, runs) and checks of the step plan."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train faster on one thread, and the test machine's cores are shared; import this fixture."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_rows(n: int = 24, seed: int = 0, lo: int = 6, hi: int = 28, prompt: int = 3, vocab: int = 900) -> list[dict]:
    """Pre-tokenized rows of varied length whose first `prompt` tokens are not trained."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [rng.randint(10, vocab) for _ in range(rng.randint(lo, hi))]
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def make_config(folder: Path, model_dir: Path, rows: list[dict] | None = None, name: str = "config.yaml", **keys):
    """Write data + YAML into `folder` and load it through the real config loader."""
    from tuneforge.config import load

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in (rows or make_rows())))
    base = {
        "base_model": str(model_dir),
        "output_dir": str(folder / "out"),
        "datasets": [{"path": str(data)}],
        "sequence_len": 64,
        "micro_batch_size": 2,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "seed": 7,
    }
    base.update(keys)
    path = folder / name
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return load(path)


def grpo_task(folder: Path, model_dir: Path, **trl) -> dict:
    """A 3-step GRPO run's config (without output_dir): 16 prompts and a reward counting the letter a, written to
    `folder` (the reward module, `grpo_rewards`, must be importable there); generation after two updates at step
    3 (num_iterations 2), seeded, so runs of different layouts can be compared step by step."""
    (folder / "grpo_rewards.py").write_text("def hits(completions, **kw):\n"
                                            "    return [float(c.count('a')) for c in completions]\n")
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"hi {i}"}) + "\n" for i in range(16)))
    return {"base_model": str(model_dir), "rl": "grpo", "datasets": [{"path": "prompts.jsonl", "type": "prompt"}],
            "trl": {"num_generations": 4, "max_completion_length": 6, "reward_funcs": ["grpo_rewards.hits"],
                    "num_iterations": 2, **trl}, "micro_batch_size": 4, "max_steps": 3, "learning_rate": 1e-3,
            "logging_steps": 1, "save_strategy": "no", "seed": 3}


def check_server_pushes(folder: Path, model_dir: Path, sharding: dict, torchrun) -> None:
    """GRPO with a generation server (trl.use_vllm, vllm_mode: server) on 2 training processes laid out by
    `sharding` (config keys), run by `torchrun(config path) -> CompletedProcess`: both processes generate from
    the server, one process pushes once per sync, the first push is the starting model exactly (whole
    tensors, gathered where the weights are sharded) and the second the model after one update."""
    import torch
    from transformers import AutoModelForCausalLM

    from tuneforge.rollout.generation_server import EmbeddedBackend, GenerationServer

    class RecordingBackend(EmbeddedBackend):
        pushes = []

        def load_weights(self, named):
            super().load_weights(named)
            self.pushes.append({name: t.clone() for name, t in named})

    # rewards that differ within a group (completion lengths), so every step updates the weights
    (folder / "srv_rewards.py").write_text("def hits(completions, **kw):\n"
                                           "    return [float(len(c)) for c in completions]\n")
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"hi {i}"}) + "\n" for i in range(16)))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    backend = RecordingBackend(model)
    with GenerationServer(backend) as server:
        config = folder / "grpo.yaml"
        config.write_text(yaml.safe_dump({
            "base_model": str(model_dir), "output_dir": str(folder / "out"), "rl": "grpo",
            "datasets": [{"path": "prompts.jsonl", "type": "prompt"}],
            "trl": {"num_generations": 4, "max_completion_length": 6, "reward_funcs": ["srv_rewards.hits"],
                    "use_vllm": True, "vllm_mode": "server", "vllm_server_host": server.host,
                    "vllm_server_port": server.port, "vllm_server_timeout": 30},
            "micro_batch_size": 8, "max_steps": 2, "learning_rate": 1e-3, "logging_steps": 1,
            "save_strategy": "no", **sharding}))
        done = torchrun(str(config))
        assert done.returncode == 0, done.stderr[-3000:]
        paths = [p for p, _ in server.calls]
    assert paths.count("/generate/") == 4  # 2 steps x 2 processes
    assert paths.count("/reset_prefix_cache/") == 2  # one sync per step, by one process
    first, second = backend.pushes  # the tiny model fits one HTTP chunk: one call per push
    assert all(torch.equal(t, start[name]) for name, t in first.items())
    assert any(not torch.equal(t, start[name]) for name, t in second.items())


def train(cfg, argv=None):
    from tuneforge.engine.run import train as run_train

    return run_train(cfg, argv, show_progress=False)


def losses(result) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in result.history if r["type"] == "train"}


# ---------------------------------------------------------------- the step plan itself
def test_plan_counts_steps_from_every_epoch_and_partial_accumulation(tmp_path, tiny_model_dir):
    from tuneforge.engine.plan import Position, StepPlan

    cfg = make_config(tmp_path, tiny_model_dir, micro_batch_size=3, gradient_accumulation_steps=2, num_epochs=2)
    lengths = [10] * 20  # 7 micro-batches per epoch (3,3,3,3,3,3,2) -> 4 steps, the last with one micro-batch
    plan = StepPlan(cfg, lengths)
    assert [len(plan.epoch(e)) for e in (0, 1)] == [7, 7]
    assert plan.total_steps == 8
    pos, seen, ends = Position(), [], []
    for _ in range(plan.total_steps):
        mbs, pos, end = plan.next_step(pos)
        seen.append(len(mbs))
        ends.append(end)
    assert seen == [2, 2, 2, 1, 2, 2, 2, 1]
    assert ends == [False, False, False, True] * 2
    assert pos.epoch == 2 and pos.index == 0
    # every row appears exactly once per epoch
    assert sorted(i for mb in plan.epoch(1) for row in mb for i in row) == list(range(20))


def test_plan_fractional_epochs_and_max_steps(tmp_path, tiny_model_dir):
    from tuneforge.engine.plan import StepPlan

    cfg = make_config(tmp_path, tiny_model_dir, micro_batch_size=2, num_epochs=1.5)
    plan = StepPlan(cfg, [10] * 20)  # 10 micro-batches per epoch; half of the second
    assert plan.total_steps == 15
    cfg2 = make_config(tmp_path, tiny_model_dir, name="b.yaml", micro_batch_size=2, max_steps=33)
    assert StepPlan(cfg2, [10] * 20).total_steps == 33
    assert StepPlan(cfg2, [10] * 20).cadence(0.25, None).every == 9  # a fraction of total steps, rounded up


def test_per_epoch_cadence_ends_on_the_epoch_boundary():
    from tuneforge.engine.plan import Cadence

    twice = Cadence(per_epoch=2)
    assert [s for s in range(1, 126) if twice.due(s, s, 125)] == [62, 125]
    thrice = Cadence(per_epoch=3)
    assert [s for s in range(1, 8) if thrice.due(s, s, 7)] == [2, 5, 7]
    assert [s for s in range(1, 20) if Cadence(every=5).due(s, 0, 0)] == [5, 10, 15]


def test_plan_shards_micro_batches_across_ranks(tmp_path, tiny_model_dir):
    from tuneforge.engine.plan import StepPlan

    cfg = make_config(tmp_path, tiny_model_dir, micro_batch_size=1)
    plans = [StepPlan(cfg, [10] * 9, world_size=2, rank=r) for r in (0, 1)]
    a, b = (p.epoch(0) for p in plans)
    assert len(a) == len(b) == 4  # 9 micro-batches -> 4 each, the odd one dropped so ranks stay in step
    assert not {i for mb in a for r in mb for i in r} & {i for mb in b for r in mb for i in r}


def sigterm_one_worker(command: list[str], metrics: Path, *, after_lines: int) -> str:
    """Start `command` (a launcher with two workers), send SIGTERM to one worker once `metrics` has
    `after_lines` lines, and return the launcher's stderr after every process stopped. A run that does not
    stop (a rank stuck in a collective) is killed and fails the test."""
    import os
    import signal
    import subprocess
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < after_lines):
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(max(workers, key=int)), signal.SIGTERM)  # one worker only
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers
        pytest.fail("the processes did not stop after SIGTERM (a rank is stuck in a collective)")
    return err
