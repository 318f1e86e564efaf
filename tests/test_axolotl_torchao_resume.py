"""torchao's low-bit AdamW (adamw_torch_8bit / adamw_torch_4bit, Axolotl's names) resumes exactly from a
checkpoint read with weights_only loading: its quantized optimizer state comes back as torchao's own state
tensors (not dequantized to float32), and the resumed losses equal the uninterrupted run's."""

from __future__ import annotations

import pytest

from test_engine_support import losses, make_config, make_rows, one_thread, train  # noqa: F401

pytest.importorskip("torchao.optim")

RUN = {"micro_batch_size": 2, "max_steps": 4, "save_steps": 2, "learning_rate": 3e-3, "bf16": False}


@pytest.mark.parametrize(("optimizer", "state_class"), [("adamw_torch_8bit", "OptimState8bit"),
                                                        ("adamw_torch_4bit", "OptimState4bit")])
def test_torchao_optimizer_resumes_exactly(tmp_path, tiny_model_dir, monkeypatch, optimizer, state_class):
    import torch

    from tuneforge.engine import checkpoint

    rows = make_rows(n=16, seed=6)
    keys = {**RUN, "optimizer": optimizer}
    full = train(make_config(tmp_path / "full", tiny_model_dir, rows, **keys))
    ckpt = tmp_path / "full" / "out" / "checkpoint-2"
    saved = checkpoint.load_plain(ckpt / "optimizer.pt")  # weights_only=True
    kinds = {type(v).__name__ for s in saved["state"].values() for v in s.values() if isinstance(v, torch.Tensor)}
    assert state_class in kinds

    loaded: list = []
    real = torch.optim.Optimizer.load_state_dict

    def spy(self, state_dict):
        real(self, state_dict)
        loaded.extend(type(v).__name__ for s in self.state.values() for v in s.values() if isinstance(v, torch.Tensor))

    monkeypatch.setattr(torch.optim.Optimizer, "load_state_dict", spy)
    resumed = train(make_config(tmp_path / "resumed", tiny_model_dir, rows, **keys, resume_from_checkpoint=str(ckpt)))
    assert state_class in loaded  # the optimizer holds torchao's quantized state again
    ref, got = losses(full), losses(resumed)
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert abs(got[step] - ref[step]) <= 1e-6, (step, got[step], ref[step])


def test_without_torchao_the_state_is_refused_with_what_to_install(tmp_path):
    import subprocess
    import sys

    import torch
    from torchao.optim import AdamW8bit

    model = torch.nn.Linear(256, 256)
    opt = AdamW8bit(model.parameters(), lr=1e-3)
    model(torch.ones(2, 256)).sum().backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    code = ("import sys; sys.modules['torchao'] = None\n"  # torchao cannot be imported in this process
            "from tuneforge.engine.checkpoint import load_plain\n"
            "from tuneforge.errors import TuneforgeError\n"
            f"try:\n    load_plain(__import__('pathlib').Path({str(tmp_path / 'optimizer.pt')!r}))\n"
            "except TuneforgeError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "torchao is not installed here: pip install torchao" in out.stdout, out.stdout + out.stderr
