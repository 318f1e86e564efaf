"""Checkpoints: atomic writes, rotation, save_first_step, contents."""

from __future__ import annotations

import json

import pytest
import torch

from test_engine_support import make_config, make_rows, one_thread, train  # noqa: F401
from tuneforge.engine import checkpoint as ckpt
from tuneforge.errors import TuneforgeError


def test_crash_mid_save_leaves_no_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt") and "checkpoint-4.tmp" in str(f):
            raise OSError("disk full (simulated)")
        calls["n"] += 1
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    cfg = make_config(tmp_path, tiny_model_dir, save_steps=2, max_steps=6)
    with pytest.raises(OSError, match="disk full"):
        train(cfg)
    out = tmp_path / "out"
    assert (out / "checkpoint-2" / "trainer_state.json").exists()
    assert not (out / "checkpoint-4").exists()  # never a half-written checkpoint-N
    assert (out / "checkpoint-4.tmp").exists()
    assert ckpt.latest_checkpoint(out) == out / "checkpoint-2"
    with pytest.raises(Exception, match="unfinished save"):
        ckpt.read_state(out / "checkpoint-4.tmp")
    ckpt.clean_partial(out)
    assert not (out / "checkpoint-4.tmp").exists()


def test_checkpoint_contents_and_rotation(tmp_path, tiny_model_dir):
    cfg = make_config(tmp_path, tiny_model_dir, save_steps=2, max_steps=7, save_total_limit=2)
    train(cfg)
    out = tmp_path / "out"
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    c = out / "checkpoint-6"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "optimizer.pt", "scheduler.pt",
                 "rng_state_0.pt", "trainer_state.json"):
        assert (c / name).exists(), name
    state = json.loads((c / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and state["resumable"] is True and state["total_steps"] == 7
    assert (state["epoch"], state["index"]) == (0, 6)  # 12 micro-batches per epoch, one per step
    assert not list(out.glob("*.tmp"))


def test_save_first_step_and_epoch_strategy(tmp_path, tiny_model_dir):
    train(make_config(tmp_path / "a", tiny_model_dir, save_first_step=True, save_strategy="epoch", num_epochs=2,
                      micro_batch_size=4))
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "a" / "out")]
    assert names == ["checkpoint-1", "checkpoint-6", "checkpoint-12"]  # 24 rows / 4 = 6 steps per epoch
    train(make_config(tmp_path / "b", tiny_model_dir, save_strategy="no", max_steps=3))
    assert ckpt.list_checkpoints(tmp_path / "b" / "out") == []


def test_adapter_checkpoint_holds_only_the_adapter(tmp_path, tiny_model_dir):
    cfg = make_config(tmp_path, tiny_model_dir, rows=make_rows(8), adapter="lora", lora_target_linear=True,
                      save_steps=2, max_steps=2)
    train(cfg)
    c = tmp_path / "out" / "checkpoint-2"
    assert (c / "adapter_model.safetensors").exists() and (c / "adapter_config.json").exists()
    assert not (c / "model.safetensors").exists() and not (c / "README.md").exists()


@pytest.mark.parametrize("interval, name, saved", [(1, "", "checkpoint-1"), (2, "save.now", "checkpoint-2")])
def test_a_trigger_file_asks_for_a_checkpoint_and_training_goes_on(tmp_path, tiny_model_dir, interval, name, saved):
    """dynamic_checkpoint: the file is noticed at the first step the interval checks, a resumable checkpoint
    is written, the file is removed (so it is one checkpoint per request) and the run continues."""
    cfg = make_config(tmp_path, tiny_model_dir, make_rows(16), max_steps=4, save_strategy="no",
                      dynamic_checkpoint={"enabled": True, "check_interval": interval, "trigger_file_path": name})
    trigger = tmp_path / "out" / (name or "axolotl_checkpoint.save")
    trigger.parent.mkdir(parents=True)
    trigger.touch()
    result = train(cfg)
    assert result.state.global_step == 4
    assert [p.name for p in (tmp_path / "out").glob("checkpoint-*")] == [saved]
    assert (tmp_path / "out" / saved / "optimizer.pt").exists() and not trigger.exists()


class _Payload:
    """Unpickling this runs a command (what a crafted checkpoint file does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["rng_state_0.pt", "objective_state_0.pt", "optimizer.pt"])
def test_a_crafted_checkpoint_file_is_refused_not_run(tmp_path, name):
    from tuneforge.engine.checkpoint import load_plain

    marker = tmp_path / "pwned"
    file = tmp_path / name
    torch.save({"state": _Payload(marker)}, file)
    with pytest.raises(TuneforgeError, match=f"{name}: refused to load"):
        load_plain(file)
    assert not marker.exists()


def test_plain_states_and_rollouts_load(tmp_path):
    from tuneforge.engine.checkpoint import load_plain, rng_state
    from tuneforge.rollout.base import Rollout

    state = {"rng": rng_state(), "rollouts": [Rollout([[1]], [[2, 3]], [[-0.5, -0.1]], [True], n=1, meta={"k": 1.0})]}
    torch.save(state, tmp_path / "s.pt")
    back = load_plain(tmp_path / "s.pt")
    assert back["rollouts"][0] == state["rollouts"][0]
    assert back["rng"]["python"] == state["rng"]["python"]
