"""Running out of GPU memory in a step (simulated on CPU by raising torch.OutOfMemoryError from the loss or
the optimizer): auto_find_batch_size retries the step in halves with the same update; otherwise the run
stops with the remedies and keeps the last completed step in a resumable checkpoint."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from test_engine_support import losses, make_config, make_rows, one_thread, train  # noqa: F401
from tuneforge.engine import memory

RUN = {"micro_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 4, "learning_rate": 3e-3,
       "save_strategy": "no"}


def _oom_when(monkeypatch, too_big):
    """SFT's loss raises CUDA's out-of-memory error for micro-batches where too_big(rows, call) holds."""
    from tuneforge.methods.sft import SFTObjective

    loss = SFTObjective.loss
    calls = []

    def failing(self, model, batch, num_items):
        calls.append(batch["input_ids"].shape[0])
        if too_big(batch["input_ids"].shape[0], len(calls)):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return loss(self, model, batch, num_items)

    monkeypatch.setattr(SFTObjective, "loss", failing)
    return calls


def _weights(folder):
    return load_file(str(folder / "out" / "model.safetensors"))


def test_split_cuts_each_micro_batch_into_runs_of_consecutive_rows():
    mbs = [[[0], [1], [2], [3], [4]], [[5, 6], [7]]]
    assert memory.split(mbs, 1) == mbs
    assert memory.split(mbs, 2) == [[[0], [1]], [[2], [3], [4]], [[5, 6]], [[7]]]
    assert memory.split(mbs, 8) == [[[0]], [[1]], [[2]], [[3]], [[4]], [[5, 6]], [[7]]]  # never an empty piece


def test_auto_find_batch_size_retries_in_halves_with_the_same_updates(tmp_path, tiny_model_dir, monkeypatch, caplog):
    rows = make_rows(n=16, seed=2)
    run = {**RUN, "gradient_accumulation_steps": 2}
    plain = train(make_config(tmp_path / "plain", tiny_model_dir, rows, **run))
    # Micro-batches of 4 rows do not fit, of 2 do; the first one of step 1 fits by luck, so its gradient is
    # already accumulated when the second fails, and must not count twice.
    calls = _oom_when(monkeypatch, lambda n, call: n > 2 and call > 1)
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        fitted = train(make_config(tmp_path / "fitted", tiny_model_dir, rows, **run, auto_find_batch_size=True))
    assert calls == [4, 4] + [2] * 16  # one failed attempt, then every micro-batch in two halves
    assert fitted.state.micro_batch_splits == 2
    assert sum("retrying it with each micro-batch in 2 pieces" in r.message for r in caplog.records) == 1
    for step, loss in losses(plain).items():
        assert abs(losses(fitted)[step] - loss) <= 1e-6, step
    # Four Adam steps magnify float summation-order differences (updates are ~lr = 3e-3 per weight)
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "fitted")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 5e-5


def test_out_of_memory_stops_with_the_remedies_and_keeps_the_last_step(tmp_path, tiny_model_dir, monkeypatch):
    rows = make_rows(n=16, seed=2)
    full = train(make_config(tmp_path / "full", tiny_model_dir, rows, **RUN))
    _oom_when(monkeypatch, lambda n, call: call == 3)  # the third step's micro-batch
    with pytest.raises(memory.OutOfMemory) as err:
        train(make_config(tmp_path / "oom", tiny_model_dir, rows, **RUN))
    message = str(err.value)
    saved = tmp_path / "oom" / "out" / "checkpoint-2"
    assert "forward/backward pass of step 3 (4 rows" in message
    assert str(saved) in message and "auto_find_batch_size: true" in message
    assert "gradient_checkpointing: true" in message and "micro_batch_size: lower it from 4" in message
    assert json.loads((saved / "trainer_state.json").read_text())["global_step"] == 2

    monkeypatch.undo()  # memory is back: the resumed run ends where the uninterrupted one did
    resumed = train(make_config(tmp_path / "oom", tiny_model_dir, rows, name="resume.yaml", **RUN,
                                resume_from_checkpoint=str(saved)))
    assert {s: v for s, v in losses(resumed).items() if s > 2} == {s: v for s, v in losses(full).items() if s > 2}
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "oom")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_out_of_memory_in_the_optimizer_update_saves_nothing(tmp_path, tiny_model_dir, monkeypatch):
    step = torch.optim.AdamW.step
    calls = []

    def failing(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", failing)
    cfg = make_config(tmp_path, tiny_model_dir, make_rows(n=16, seed=2), **RUN, auto_find_batch_size=True)
    with pytest.raises(memory.OutOfMemory) as err:
        train(cfg)
    message = str(err.value)
    assert "optimizer update of step 2" in message and "Nothing was saved" in message
    assert "adamw_8bit" in message and "retrying" not in message
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_the_diagnosis_leaves_out_what_is_already_set(tmp_path, tiny_model_dir):
    cfg = make_config(tmp_path, tiny_model_dir, gradient_checkpointing=True, adapter="lora", lora_r=4,
                      lora_alpha=8, lora_target_linear=True, auto_find_batch_size=True)
    text = memory.diagnosis(cfg, step=5, phase="forward/backward pass", rows=1, tokens=60,
                            retry_blocked="the micro-batches are down to one row each", saved=None)
    assert "could not retry: the micro-batches are down to one row each" in text
    assert "gradient_checkpointing" not in text and "adapter:" not in text
    assert "sequence_len: lower it from 64" in text


def test_out_of_memory_in_an_evaluation_keeps_the_step_before_it(tmp_path, tiny_model_dir, monkeypatch):
    from tuneforge.methods.sft import SFTObjective

    evaluate, calls = SFTObjective.evaluate, []

    def failing(self, model, batch):
        calls.append(1)
        if len(calls) > 2:  # the second evaluation (two batches each)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return evaluate(self, model, batch)

    monkeypatch.setattr(SFTObjective, "evaluate", failing)
    cfg = make_config(tmp_path, tiny_model_dir, make_rows(n=24, seed=2), **{**RUN, "max_steps": 6},
                      val_set_size=0.25, eval_steps=2, eval_batch_size=3)
    with pytest.raises(memory.OutOfMemory) as err:
        train(cfg)
    message = str(err.value)
    assert "evaluation after step 4" in message and "eval_batch_size: lower it from 3" in message
    assert str(tmp_path / "out" / "checkpoint-4") in message
    assert json.loads((tmp_path / "out" / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
