"""`activation_offloading` (Axolotl's key): every micro-batch's forward and backward run under
torch.autograd.graph.save_on_cpu, and training is otherwise unchanged (the same losses, bit for bit)."""

from __future__ import annotations

import torch

from test_engine_support import losses, make_config, make_rows, one_thread, train  # noqa: F401


def _counting_save_on_cpu(monkeypatch) -> list[bool]:
    entered: list[bool] = []
    real = torch.autograd.graph.save_on_cpu

    class Counting(real):
        def __init__(self, pin_memory: bool = False, device_type: str = "cuda") -> None:
            entered.append(pin_memory)
            super().__init__(pin_memory=pin_memory, device_type=device_type)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Counting)
    return entered


def test_offloading_wraps_every_micro_batch_and_keeps_the_losses(tmp_path, tiny_model_dir, monkeypatch):
    rows = make_rows(n=16, seed=3)
    run = {"max_steps": 2, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "bf16": False}
    plain = train(make_config(tmp_path / "plain", tiny_model_dir, rows, **run))
    entered = _counting_save_on_cpu(monkeypatch)
    assert not entered
    offloaded = train(make_config(tmp_path / "off", tiny_model_dir, rows, activation_offloading=True, **run))
    assert entered == [False] * 4  # 2 steps x 2 micro-batches; no pinned memory without CUDA
    assert losses(offloaded) == losses(plain)


def test_offloading_with_gradient_checkpointing(tmp_path, tiny_model_dir, monkeypatch):
    rows = make_rows(n=8, seed=4)
    run = {"max_steps": 2, "micro_batch_size": 2, "bf16": False, "gradient_checkpointing": True}
    plain = train(make_config(tmp_path / "plain", tiny_model_dir, rows, **run))
    entered = _counting_save_on_cpu(monkeypatch)
    offloaded = train(make_config(tmp_path / "off", tiny_model_dir, rows, activation_offloading="legacy", **run))
    assert len(entered) == 2 and losses(offloaded) == losses(plain)


def test_checkpointed_layer_inputs_are_what_is_offloaded(tmp_path, tiny_model_dir, monkeypatch):
    """With gradient checkpointing, the tensors handed to the offload hooks are each layer's input (kept for its
    recompute) and the few saved outside the layers, not every activation: gradient_checkpointing: offload
    moves the layer inputs to CPU memory."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    packed: dict[bool, list[tuple[int, ...]]] = {}

    def recording(into: list):
        class Recording(torch.autograd.graph.saved_tensors_hooks):
            def __init__(self, pin_memory: bool = False, device_type: str = "cuda") -> None:
                super().__init__(lambda t: into.append(tuple(t.shape)) or t, lambda t: t)

        return Recording

    rows = make_rows(n=4, seed=5)
    for gc in (False, True):
        packed[gc] = []
        monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", recording(packed[gc]))
        keys = {"max_steps": 1, "micro_batch_size": 2, "bf16": False, "activation_offloading": True}
        train(make_config(tmp_path / f"gc{gc}", tiny_model_dir, rows, gradient_checkpointing=gc, **keys))
    hidden = [s for s in packed[True] if s[-1] == config.hidden_size]
    assert len(hidden) >= config.num_hidden_layers  # one input per checkpointed layer, at least
    assert len(packed[True]) < len(packed[False]) / 3  # not the layers' inner activations
