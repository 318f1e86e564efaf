"""Time to first step: the model is built (or loaded) on its target device directly, never as a full CPU
copy first (models/load.py `target_device`)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tuneforge.config import load
from tuneforge.models import load as model_load


class CpuTensors(TorchDispatchMode):
    """Records the size of every CPU tensor an operation creates."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self.sizes.append(t.numel())
        return out


def _cfg(model_dir, **keys):
    return load(data={"base_model": str(model_dir), **keys})


def _largest_weight(model) -> int:
    return max(p.numel() for p in model.parameters())


def test_no_target_device_on_cpu(tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert model_load.target_device(_cfg(tiny_model_dir)) is None


def test_random_init_goes_straight_to_the_target_device(tiny_model_dir, monkeypatch):
    """With the target device set (meta here, a GPU in training) every weight is created there: no CPU
    tensor as large as a weight matrix exists during load_model."""
    monkeypatch.setattr(model_load, "target_device", lambda cfg: torch.device("meta"))
    cfg = _cfg(tiny_model_dir, reinit_weights=True)
    with CpuTensors() as seen:
        model = model_load.load_model(cfg, None)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    smallest_matrix = min(p.numel() for p in model.parameters() if p.ndim == 2)
    assert max(seen.sizes, default=0) < smallest_matrix, max(seen.sizes)


def test_the_cpu_build_is_what_the_check_catches(tiny_model_dir, monkeypatch):
    """Control: without a target device the same check sees the full CPU weights."""
    monkeypatch.setattr(model_load, "target_device", lambda cfg: None)
    with CpuTensors() as seen:
        model = model_load.load_model(_cfg(tiny_model_dir, reinit_weights=True), None)
    assert max(seen.sizes) >= _largest_weight(model)


def test_saved_weights_load_with_a_device_map_to_the_target(tiny_model_dir, monkeypatch):
    """transformers builds the model on meta and puts each safetensors shard on device_map's device."""
    from transformers import AutoModelForCausalLM

    seen = {}

    class Spy:
        @staticmethod
        def from_pretrained(src, **kwargs):
            seen.update(kwargs)
            return AutoModelForCausalLM.from_pretrained(src, **kwargs)

    monkeypatch.setattr(model_load, "target_device", lambda cfg: torch.device("cpu"))
    monkeypatch.setattr(model_load, "auto_class", lambda cfg: Spy)
    model_load.load_model(_cfg(tiny_model_dir), None)
    assert seen["device_map"] == {"": torch.device("cpu")}
    seen.clear()
    model_load.load_model(_cfg(tiny_model_dir, device_map="auto"), None)  # the user's own map wins
    assert seen["device_map"] == "auto"


@pytest.mark.gpu
@pytest.mark.parametrize("reinit", [True, False])
def test_gpu_load_builds_no_cpu_copy(tiny_model_dir, reinit):
    cfg = _cfg(tiny_model_dir, reinit_weights=reinit)
    assert model_load.target_device(cfg) == torch.device("cuda", torch.cuda.current_device())
    with CpuTensors() as seen:
        model = model_load.load_model(cfg, None)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    if reinit:  # (loading stages each saved tensor through a CPU view of the file, one at a time)
        smallest_matrix = min(p.numel() for p in model.parameters() if p.ndim == 2)
        assert max(seen.sizes, default=0) < smallest_matrix, max(seen.sizes)
