"""fp16 loss scaling: the scaler's state travels with checkpoints, FSDP2 agrees on overflow across shards
(engine/loss_scaling.py). The training runs need CUDA (fp16 is refused on CPU) and are marked gpu."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tuneforge.engine import loss_scaling


def _scaler(**kw):
    return torch.amp.GradScaler("cpu", **kw)


def test_state_round_trips_and_restores_the_scale():
    a = SimpleNamespace(scaler=_scaler(init_scale=1024.0, growth_interval=7))
    a.scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    a.scaler.update(new_scale=256.0)
    saved = loss_scaling.state_dict(a)
    assert saved["scale"] == 256.0 and saved["growth_interval"] == 7
    b = SimpleNamespace(scaler=_scaler())
    loss_scaling.load_state_dict(b, saved)
    assert b.scaler.get_scale() == 256.0 and b.scaler.get_growth_interval() == 7


def test_no_scaler_means_no_state():
    assert loss_scaling.state_dict(SimpleNamespace(scaler=None)) is None
    assert loss_scaling.state_dict(SimpleNamespace(scaler=_scaler(enabled=False))) is None
    loss_scaling.load_state_dict(SimpleNamespace(scaler=None), {"scale": 2.0})  # nothing to restore into


def test_fsdp2_gets_a_sharded_scaler_with_the_same_settings():
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    acc = SimpleNamespace(scaler=_scaler(init_scale=4096.0, growth_factor=3.0, backoff_factor=0.25,
                                         growth_interval=11))
    loss_scaling.shard_aware(acc)
    s = acc.scaler
    assert isinstance(s, ShardedGradScaler)
    assert (s.get_scale(), s.get_growth_factor(), s.get_backoff_factor(), s.get_growth_interval()) == (
        4096.0, 3.0, 0.25, 11)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 training needs CUDA")
@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "fsdp2"])
def test_fp16_resume_is_exact_and_restores_the_scale(tmp_path, tiny_model_dir, sharded):
    import json

    from test_engine_support import losses, make_config, make_rows, train

    keys = {"micro_batch_size": 2, "gradient_accumulation_steps": 2, "num_epochs": 1, "save_steps": 1,
            "learning_rate": 3e-3, "fp16": True, "bf16": False, "max_grad_norm": 1.0}
    if sharded:
        keys.update(fsdp_version=2, fsdp_config={"reshard_after_forward": True})
    rows = make_rows(n=24, seed=3)
    full = train(make_config(tmp_path / "full", tiny_model_dir, rows, **keys))
    ref, total = losses(full), full.state.global_step
    k = total // 2
    ckpt = tmp_path / "full" / "out" / f"checkpoint-{k}"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["grad_scaler"]
    assert saved["scale"] > 0
    resumed = train(make_config(tmp_path / "resumed", tiny_model_dir, rows, **keys, resume_from_checkpoint=str(ckpt)))
    got = losses(resumed)
    for step in range(k + 1, total + 1):
        assert abs(got[step] - ref[step]) <= 1e-6, (step, got[step], ref[step])
