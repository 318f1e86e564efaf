"""Gradient accumulation through the real loop: micro_batch_size 4 x 1 == 1 x 4, packed == unpacked.

One optimizer step of plain SGD with lr 1 (no clipping, no schedule, no decay) moves every weight by
exactly minus its gradient, so comparing the saved weights compares the step's gradients.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from test_engine_support import make_config, make_rows, one_thread, train  # noqa: F401

SGD = {"optimizer": "sgd", "learning_rate": 1.0, "lr_scheduler": "constant", "max_grad_norm": None,
       "max_steps": 1, "shuffle_merged_datasets": False,
       "bf16": False, "tf32": False}  # exact fp32 arithmetic on GPUs too


def _update(tmp_path, tiny_model_dir, name: str, **keys) -> tuple[dict, float]:
    cfg = make_config(tmp_path / name, tiny_model_dir, make_rows(n=8, seed=3), **SGD, **keys)
    result = train(cfg)
    after = load_file(str(tmp_path / name / "out" / "model.safetensors"))
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    return {k: after[k] - before[k] for k in before}, result.train_metrics["loss"]


def test_four_by_one_equals_one_by_four(tmp_path, tiny_model_dir):
    big, loss_big = _update(tmp_path, tiny_model_dir, "a", micro_batch_size=4, gradient_accumulation_steps=1)
    small, loss_small = _update(tmp_path, tiny_model_dir, "b", micro_batch_size=1, gradient_accumulation_steps=4)
    assert abs(loss_big - loss_small) < 1e-6
    worst = max((big[k] - small[k]).abs().max().item() for k in big)
    assert worst < 1e-6
    assert max(v.abs().max().item() for v in big.values()) > 1e-3  # the step did move the weights


def test_batch_size_key_sets_accumulation(tmp_path, tiny_model_dir):
    big, _ = _update(tmp_path, tiny_model_dir, "a", micro_batch_size=4, gradient_accumulation_steps=1)
    via_batch_size, _ = _update(tmp_path, tiny_model_dir, "c", micro_batch_size=2, batch_size=4)
    assert max((big[k] - via_batch_size[k]).abs().max().item() for k in big) < 1e-6


def test_packed_step_equals_unpacked_step(tmp_path, tiny_model_dir):
    # All 8 rows in one step either way: 8 unpacked rows, or packed rows of up to 64 tokens.
    plain, loss_plain = _update(tmp_path, tiny_model_dir, "p0", micro_batch_size=8)
    packed, loss_packed = _update(tmp_path, tiny_model_dir, "p1", micro_batch_size=8, sample_packing=True)
    assert abs(loss_plain - loss_packed) < 1e-6
    assert max((plain[k] - packed[k]).abs().max().item() for k in plain) < 1e-6


def test_flattened_batches_step_like_padded_ones(tmp_path, tiny_model_dir):
    """batch_flattening: 2 micro-batches of 4 rows, each put back to back into one row, give the padded
    step's gradient (documents attend only to themselves in both)."""
    plain, loss_plain = _update(tmp_path, tiny_model_dir, "f0", micro_batch_size=4, gradient_accumulation_steps=2)
    flat, loss_flat = _update(tmp_path, tiny_model_dir, "f1", micro_batch_size=4, gradient_accumulation_steps=2,
                              batch_flattening=True)
    assert abs(loss_plain - loss_flat) < 1e-6
    assert max((plain[k] - flat[k]).abs().max().item() for k in plain) < 1e-6


def test_bf16_autocast_on_cpu_tracks_fp32(tmp_path, tiny_model_dir):
    """`bf16: true` runs the forward under CPU autocast (fp32 master weights); the losses stay close to fp32."""
    rows = make_rows(n=8, seed=3)
    fp32 = train(make_config(tmp_path / "fp32", tiny_model_dir, rows, max_steps=2, bf16=False))
    bf16 = train(make_config(tmp_path / "bf16", tiny_model_dir, rows, max_steps=2, bf16=True))
    assert bf16.model.dtype == torch.float32
    a, b = fp32.history[0]["loss"], bf16.history[0]["loss"]
    assert a != b and abs(a - b) < 2e-2
    again = train(make_config(tmp_path / "again", tiny_model_dir, rows, max_steps=2, bf16=False))
    assert again.history[0]["loss"] == a  # a later fp32 run in the same process is unaffected
