"""metric_for_best_model: early stopping and load_best_model_at_end."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from test_engine_support import make_config, make_rows, train
from tuneforge.config import load
from tuneforge.engine.best import BestEvaluation
from tuneforge.errors import TuneforgeError


def _tracker(**keys) -> BestEvaluation:
    return BestEvaluation(load(data={"base_model": "x", "val_set_size": 0.1, **keys}))


def test_lower_is_better_for_losses_higher_for_the_rest_unless_told():
    assert not _tracker(metric_for_best_model="loss").greater
    assert not _tracker(metric_for_best_model="eval_perplexity").greater
    assert _tracker(metric_for_best_model="accuracy").greater
    assert _tracker(metric_for_best_model="sacrebleu").greater
    assert not _tracker(metric_for_best_model="eval_ter").greater  # do_causal_lm_eval's translation error rate
    assert not _tracker(metric_for_best_model="accuracy", greater_is_better=False).greater


def test_patience_counts_evaluations_that_do_not_beat_the_best_by_the_threshold():
    best = _tracker(early_stopping_patience=2, early_stopping_threshold=0.01)
    seen = [best.update({"step": s, "eval_loss": v}) for s, v in ((1, 1.0), (2, 0.995), (3, 0.9), (4, 0.895))]
    assert seen == [True, False, True, False]
    assert (best.value, best.record["step"], best.since, best.patience_ran_out) == (0.9, 3, 1, False)
    best.update({"step": 5, "eval_loss": 2.0})
    assert best.patience_ran_out and "not improved for 2 evaluations" in best.stop_message()


def test_a_missing_metric_is_an_error_only_where_it_is_used():
    record = {"step": 1, "eval_loss": 1.0, "eval_accuracy": 0.5}
    with pytest.raises(TuneforgeError, match="eval_acuracy is not among .*eval_loss, eval_accuracy"):
        _tracker(metric_for_best_model="acuracy", load_best_model_at_end=True).update(record)
    assert _tracker(metric_for_best_model="acuracy").update(record) is False  # nothing asked for it


def test_early_stopping_ends_the_run_when_evaluations_stop_improving(tmp_path, tiny_model_dir):
    keys = dict(max_steps=20, learning_rate=1e-9, val_set_size=4, eval_steps=1, save_strategy="no", logging_steps=1)
    result = train(make_config(tmp_path, tiny_model_dir, make_rows(20), early_stopping_patience=2,
                               early_stopping_threshold=1e-3, **keys))
    evals = [r["step"] for r in result.history if r["type"] == "eval"]
    assert result.state.global_step == 3 and evals == [1, 2, 3]  # best at 1, then two without a 1e-3 gain


def test_load_best_model_at_end_ends_with_the_best_evaluations_weights(tmp_path, tiny_model_dir):
    """Ranking by the highest eval loss makes the first evaluation the best of a run that learns: the final
    model must be checkpoint-1's weights, not the last step's, and its checkpoint must survive rotation."""
    rows = make_rows(20)
    keys = dict(max_steps=4, learning_rate=1e-2, val_set_size=4, eval_steps=1, save_steps=1, save_total_limit=1,
                logging_steps=1)
    result = train(make_config(tmp_path / "best", tiny_model_dir, rows, load_best_model_at_end=True,
                               greater_is_better=True, **keys))
    train(make_config(tmp_path / "last", tiny_model_dir, rows, **keys))
    out = tmp_path / "best" / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-4"]
    final, first = (load_file(str(d / "model.safetensors")) for d in (out, out / "checkpoint-1"))
    plain = load_file(str(tmp_path / "last" / "out" / "model.safetensors"))
    assert all(torch.equal(final[k], first[k]) for k in first)
    assert not all(torch.equal(final[k], plain[k]) for k in plain)  # the last step's weights differ
    evals = {r["step"]: r["eval_loss"] for r in result.history if r["type"] == "eval"}
    assert max(evals, key=evals.get) == 1 and result.eval_metrics["step"] == 1
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["best"]["checkpoint"].endswith("checkpoint-1") and state["best"]["record"]["step"] == 1


def test_best_model_keys_need_evaluations():
    from tuneforge.config.errors import ConfigError

    with pytest.raises(ConfigError, match="early_stopping_patience.*set val_set_size or test_datasets"):
        load(data={"base_model": "x", "early_stopping_patience": 3})
    with pytest.raises(ConfigError, match="load_best_model_at_end.*remove eval_strategy: no"):
        load(data={"base_model": "x", "val_set_size": 0.1, "eval_strategy": "no", "load_best_model_at_end": True})


def test_a_resumed_run_keeps_counting_patience_from_its_checkpoint(tmp_path, tiny_model_dir):
    """Best value and evaluations since it are in the checkpoint: stopped at step 2 and resumed, the run
    stops at step 3 as the uninterrupted one does (starting afresh it would run to step 5)."""
    keys = dict(learning_rate=1e-9, lr_scheduler="constant", val_set_size=4, eval_steps=1, save_steps=1,
                logging_steps=1, early_stopping_patience=2, early_stopping_threshold=1e-3)
    rows = make_rows(20)
    whole = train(make_config(tmp_path / "whole", tiny_model_dir, rows, max_steps=20, **keys))
    train(make_config(tmp_path / "split", tiny_model_dir, rows, max_steps=2, **keys))
    resumed = train(make_config(tmp_path / "split", tiny_model_dir, rows, max_steps=20,
                                resume_from_checkpoint=str(tmp_path / "split" / "out" / "checkpoint-2"), **keys))
    assert whole.state.global_step == resumed.state.global_step == 3
