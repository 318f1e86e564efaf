"""`save_strategy: best` (transformers' meaning): a checkpoint only at an evaluation that improves
metric_for_best_model, judged by greater_is_better."""

from __future__ import annotations

import pytest

from test_engine_support import make_config, make_rows, one_thread, train  # noqa: F401
from tuneforge.config import load
from tuneforge.config.errors import ConfigError


@pytest.mark.parametrize("greater", [False, True])
def test_checkpoints_exactly_at_the_improving_evaluations(tmp_path, tiny_model_dir, greater):
    cfg = make_config(tmp_path, tiny_model_dir, make_rows(20), max_steps=4, learning_rate=1e-2, val_set_size=4,
                      eval_steps=1, logging_steps=2, save_strategy="best", greater_is_better=greater)
    result = train(cfg)
    evals = [(r["step"], r["eval_loss"]) for r in result.history if r["type"] == "eval"]
    assert [s for s, _ in evals] == [1, 2, 3, 4]
    expected, best = [], None
    for step, value in evals:
        if best is None or (value > best if greater else value < best):
            expected.append(step)
            best = value
    out = tmp_path / "out"
    assert sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) == expected
    if greater:  # the run learns, so only the first evaluation is the best by the highest loss
        assert expected == [1]
    assert (out / "model.safetensors").exists()  # the final model is written as always


def test_best_needs_evaluations_and_excludes_a_step_cadence():
    with pytest.raises(ConfigError) as exc:
        load(data={"base_model": "x", "save_strategy": "best"})
    assert [(i.path, i.message) for i in exc.value.issues] == [(
        "save_strategy", "best saves a checkpoint when metric_for_best_model improves at an evaluation, and this "
        "run has none: set val_set_size or test_datasets, or choose save_strategy: steps.")]
    with pytest.raises(ConfigError, match="save_strategy.*remove eval_strategy: no"):
        load(data={"base_model": "x", "val_set_size": 0.1, "eval_strategy": "no", "save_strategy": "best"})
    with pytest.raises(ConfigError, match=r'save_steps.*save_strategy is "best" \(checkpoints at better evaluations'):
        load(data={"base_model": "x", "val_set_size": 0.1, "save_strategy": "best", "save_steps": 10})
    cfg = load(data={"base_model": "x", "val_set_size": 0.1, "save_strategy": "best"})
    assert cfg.save_strategy == "best" and cfg.metric_for_best_model == "eval_loss"


def test_best_on_the_command_line_supersedes_the_files_step_cadence(tmp_path, caplog):
    import logging

    path = tmp_path / "c.yaml"
    path.write_text("base_model: x\nval_set_size: 0.1\nsave_steps: 10\n")
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        cfg = load(path, ["--save-strategy", "best"])
    assert (cfg.save_strategy, cfg.save_steps) == ("best", None)
    assert "save_steps: 10 from the file is not used: --save-strategy best on the command line takes precedence" in [
        r.getMessage() for r in caplog.records]
