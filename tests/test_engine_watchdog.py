"""The loss watchdog: NaN/inf always stops the run before the update, with a diagnosis; nothing broken is saved."""

from __future__ import annotations

import math

import pytest
from safetensors.torch import load_file

from test_engine_support import make_config, one_thread, train  # noqa: F401
from tuneforge.engine.watchdog import LossWatchdog, TrainingDiverged
from tuneforge.methods import SFTObjective


def test_unit_rules():
    dog = LossWatchdog(threshold=2.0, patience=2, precision="no")
    dog.check(1.0, 0.5, 1, 1e-3, None)
    dog.check(3.0, 0.5, 2, 1e-3, None)  # one strike
    dog.check(1.5, 0.5, 3, 1e-3, None)  # reset
    dog.check(3.0, 0.5, 4, 1e-3, None)
    with pytest.raises(TrainingDiverged, match="stayed above"):
        dog.check(3.0, 0.5, 5, 1e-3, "out/checkpoint-4")
    with pytest.raises(TrainingDiverged, match="non-finite loss nan"):
        LossWatchdog(None, 3, "no").check(math.nan, 1.0, 1, 1e-3, None)
    with pytest.raises(TrainingDiverged, match="gradient norm inf"):
        LossWatchdog(None, 3, "no").check(1.0, math.inf, 1, 1e-3, None)


def test_nan_loss_stops_the_run_and_saves_nothing(tmp_path, tiny_model_dir, monkeypatch):
    """Step 3's loss turns NaN: the run stops before that update; no final model, checkpoint-2 stays good."""
    real = SFTObjective.loss
    calls = {"n": 0}

    def poisoned(self, model, batch, num_items):
        calls["n"] += 1
        loss, metrics = real(self, model, batch, num_items)
        if calls["n"] >= 3:
            return loss * float("nan"), {**metrics, "loss_sum": float("nan")}
        return loss, metrics

    monkeypatch.setattr(SFTObjective, "loss", poisoned)
    cfg = make_config(tmp_path, tiny_model_dir, max_steps=6, save_steps=2, learning_rate=2e-3)
    with pytest.raises(TrainingDiverged) as exc:
        train(cfg)
    message = str(exc.value)
    assert "step 3" in message and "learning rate" in message and "precision" in message and "data" in message
    assert "checkpoint-2" in message
    out = tmp_path / "out"
    assert not (out / "model.safetensors").exists()  # no final outputs from a diverged run
    assert not (out / "checkpoint-3").exists()
    weights = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    assert all(bool(w.isfinite().all()) for w in weights.values())


def test_threshold_watchdog_through_the_config(tmp_path, tiny_model_dir):
    cfg = make_config(tmp_path, tiny_model_dir, max_steps=10, loss_watchdog_threshold=0.5, loss_watchdog_patience=2)
    with pytest.raises(TrainingDiverged, match="for 2 consecutive steps \\(step 2\\)"):
        train(cfg)
