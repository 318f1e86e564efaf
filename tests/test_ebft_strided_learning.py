"""A tiny EBFT strided run on CPU through `tuneforge train`'s code path learns to match the features of the
documents' own continuations.

Task: documents cycle through a fixed sentence of ten words, starting at a different word each; every
block's ground truth is the next four tokens of the cycle. The tiny Llama starts random, so its sampled
blocks are noise whose features (the frozen initial network's, mean-pooled over each block) point
elsewhere: alignment ~0.35 at the start. With the default coefficients (diversity included), 8 samples
per block and no cross-entropy (the rise comes from the REINFORCE term alone), 20 steps lift the alignment
above 0.48 and cut the conditional feature-matching loss by more than 15% (measured: alignment
0.33 -> 0.54 (mean of the first 2 / last 5 steps), cfm_loss 0.72 -> 0.52).
"""

from __future__ import annotations

import pytest

WORDS = ["the", "cat", "sat", "on", "the", "mat", "and", "the", "dog", "ran"]


@pytest.fixture
def strided_config(write_config, write_jsonl, monkeypatch):
    from tuneforge import methods
    from tuneforge.config import load
    from tuneforge.methods.ebft.strided import StridedEBFTObjective

    # `rl: ebft` dispatches on ebft.mode in methods/__init__.py; name this objective directly here.
    monkeypatch.setitem(methods._REGISTRY, "ebft", StridedEBFTObjective)
    docs = [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(30)) for i in range(36)]
    write_jsonl([{"text": d} for d in docs], "docs.jsonl")

    def make(steps: int, **extra):
        return load(write_config({
            "rl": "ebft", "datasets": [{"path": "docs.jsonl", "type": "completion"}], "sequence_len": 64,
            "ebft": {"mode": "strided", "stride": 4, "context_length": 4, "generate_max_len": 4,
                     "n_samples_per_prompt": 8, "temperature": 1.0, "embed_method": "mean_pooling"},
            "micro_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": steps, "learning_rate": 3e-2,
            "lr_scheduler": "constant", "optimizer": "adamw_torch", "weight_decay": 0.0, "logging_steps": 1,
            "save_strategy": "no", "seed": 0, **extra}))

    return make


@pytest.mark.slow
def test_alignment_rises_and_cfm_loss_falls(strided_config):
    from tuneforge.engine.run import train

    result = train(strided_config(20, val_set_size=4, eval_steps=20), show_progress=False)
    records = [r for r in result.history if r["type"] == "train"]
    align = [r["ebft/alignment"] for r in records]
    cfm = [r["ebft/cfm_loss"] for r in records]
    first, last = sum(align[:2]) / 2, sum(align[-5:]) / 5
    print("alignment", [round(a, 3) for a in align], "cfm_loss", [round(c, 3) for c in cfm])
    assert first < 0.42, align  # measured 0.33
    assert last > 0.48, align  # measured 0.54
    assert sum(cfm[-5:]) / 5 < 0.85 * sum(cfm[:2]) / 2, cfm
    evals = [r for r in result.history if r["type"] == "eval"]
    assert evals and 0.0 < evals[-1]["eval_ebft/alignment"] <= 1.0  # held-out documents scored too


def test_the_shipped_example_validates_and_trains(monkeypatch, tmp_path):
    from pathlib import Path

    from typer.testing import CliRunner

    from tuneforge import methods
    from tuneforge.cli import app
    from tuneforge.config import load
    from tuneforge.engine.run import train
    from tuneforge.methods.ebft.strided import StridedEBFTObjective

    monkeypatch.setitem(methods._REGISTRY, "ebft", StridedEBFTObjective)
    example = Path(__file__).resolve().parents[1] / "examples" / "ebft-strided-tiny.yaml"
    result = CliRunner().invoke(app, ["validate", str(example)])
    assert result.exit_code == 0, result.output
    cfg = load(example, {"max_steps": 2, "eval_steps": 2, "output_dir": str(tmp_path / "out")})
    history = train(cfg, show_progress=False).history
    assert [r["step"] for r in history if r["type"] == "train"] == [1, 2]
    assert any("eval_ebft/alignment" in r for r in history)
