"""Exact resume: a run resumed from checkpoint-k produces the same per-step losses as the uninterrupted run.

Dropout is switched on (attention_dropout / lora_dropout) so that the RNG state is part of what must be
restored, the run spans two epochs with gradient accumulation, and the checkpoint falls mid-epoch.
"""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file

from test_engine_support import losses, make_config, make_rows, one_thread, train  # noqa: F401
from tuneforge.errors import TuneforgeError

RUN = {"micro_batch_size": 2, "gradient_accumulation_steps": 2, "num_epochs": 2, "save_steps": 3,
       "warmup_steps": 2, "learning_rate": 3e-3}


def _exact(tmp_path, tiny_model_dir, **keys):
    rows = make_rows(n=22, seed=5)
    keys = {**RUN, "save_steps": 1, **keys}
    full = train(make_config(tmp_path / "full", tiny_model_dir, rows, **keys))
    ref = losses(full)
    total = full.state.global_step
    assert len(ref) == total and total % 2 == 0 and total >= 4  # two epochs of equal length
    k = total // 2 + total // 4  # a checkpoint in the middle of the second epoch
    ckpt = tmp_path / "full" / "out" / f"checkpoint-{k}"
    assert (ckpt / "optimizer.pt").exists()
    resumed = train(make_config(tmp_path / "resumed", tiny_model_dir, rows, **keys, resume_from_checkpoint=str(ckpt)))
    got = losses(resumed)
    assert sorted(got) == list(range(k + 1, total + 1))
    for step in range(k + 1, total + 1):
        assert abs(got[step] - ref[step]) <= 1e-6, (step, got[step], ref[step])
    return full, resumed


def test_full_finetune_resume_is_exact(tmp_path, tiny_model_dir):
    _exact(tmp_path, tiny_model_dir, model_config={"attention_dropout": 0.2})
    a = load_file(str(tmp_path / "full" / "out" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "out" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_lora_resume_is_exact(tmp_path, tiny_model_dir):
    _exact(tmp_path, tiny_model_dir, adapter="lora", lora_r=4, lora_alpha=8, lora_dropout=0.3,
           lora_target_linear=True, sample_packing=True)


def test_resume_without_rng_state_is_not_exact(tmp_path, tiny_model_dir):
    """The exactness test can fail: dropping the RNG state changes the dropout masks and the losses."""
    rows = make_rows(n=22, seed=5)
    keys = {**RUN, "model_config": {"attention_dropout": 0.2}}
    full = train(make_config(tmp_path / "full", tiny_model_dir, rows, **keys))
    ckpt = tmp_path / "full" / "out" / "checkpoint-9"
    (ckpt / "rng_state_0.pt").unlink()
    resumed = train(make_config(tmp_path / "r", tiny_model_dir, rows, **keys, resume_from_checkpoint=str(ckpt)))
    assert abs(losses(resumed)[10] - losses(full)[10]) > 1e-6


def test_auto_resume_takes_the_newest_complete_checkpoint(tmp_path, tiny_model_dir):
    rows = make_rows(n=22, seed=5)
    full = train(make_config(tmp_path / "full", tiny_model_dir, rows, **RUN))
    out = tmp_path / "full" / "out"
    # Keep checkpoint-3 and a half-written checkpoint-6.tmp, as after a crash during the save at step 6.
    for name in ("checkpoint-6", "checkpoint-9", "checkpoint-12"):
        shutil.rmtree(out / name)
    (out / "checkpoint-6.tmp").mkdir()
    cfg = make_config(tmp_path / "full", tiny_model_dir, rows, name="again.yaml", **RUN,
                      auto_resume_from_checkpoints=True)
    again = train(cfg)
    assert not (out / "checkpoint-6.tmp").exists()
    got, ref = losses(again), losses(full)
    assert sorted(got) == list(range(1, 13))  # metrics.jsonl keeps steps 1-3, drops the stale 4-12, re-logs them
    assert all(abs(got[s] - ref[s]) <= 1e-6 for s in range(1, 13))


def test_resume_errors_are_clear(tmp_path, tiny_model_dir):
    rows = make_rows(n=22, seed=5)
    train(make_config(tmp_path / "full", tiny_model_dir, rows, **RUN, save_only_model=True))
    only_model = tmp_path / "full" / "out" / "checkpoint-3"
    assert not (only_model / "optimizer.pt").exists() and (only_model / "model.safetensors").exists()
    with pytest.raises(TuneforgeError, match="save_only_model"):
        train(make_config(tmp_path / "r1", tiny_model_dir, rows, **RUN, resume_from_checkpoint=str(only_model)))
    finished = tmp_path / "f2"
    train(make_config(finished, tiny_model_dir, rows, **RUN))
    with pytest.raises(TuneforgeError, match="nothing left to train"):
        train(make_config(tmp_path / "r2", tiny_model_dir, rows, **RUN,
                          resume_from_checkpoint=str(finished / "out" / "checkpoint-12")))
    with pytest.raises(TuneforgeError, match="does not exist"):
        train(make_config(tmp_path / "r3", tiny_model_dir, rows, **RUN, resume_from_checkpoint="nope/checkpoint-1"))
