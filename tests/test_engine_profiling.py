"""Run diagnostics: profiler_steps records the chosen window of steps where the docs say; gc_steps collects."""

from __future__ import annotations

import json

import pytest

from test_engine_support import make_config, make_rows, train


def test_the_profiled_window_holds_exactly_the_chosen_steps(tmp_path, tiny_model_dir):
    cfg = make_config(tmp_path, tiny_model_dir, make_rows(16), max_steps=5, save_strategy="no", profiler_steps=2,
                      profiler_steps_start=1)
    train(cfg)
    out = tmp_path / "out"
    events = json.loads((out / "profiler_trace.json").read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"step 2", "step 3"} <= names and not names & {"step 1", "step 4", "step 5"}
    assert any(str(n).startswith("aten::") for n in names)  # the step's operators are in the trace
    table = (out / "profiler_ops.txt").read_text()
    assert "Name" in table and "aten::" in table


def test_a_run_that_ends_inside_the_window_still_writes_it(tmp_path, tiny_model_dir):
    cfg = make_config(tmp_path, tiny_model_dir, make_rows(16), max_steps=2, save_strategy="no", profiler_steps=10)
    train(cfg)
    names = {e.get("name") for e in json.loads((tmp_path / "out" / "profiler_trace.json").read_text())["traceEvents"]}
    assert {"step 1", "step 2"} <= names


@pytest.mark.parametrize("keys, collects, empties", [
    ({"gc_steps": 2}, 2, 2),  # Axolotl's older key: both, after steps 2 and 4
    ({"gc_collect_steps": 3, "torch_empty_cache_steps": 2}, 1, 2),
    ({"gc_collect_steps": -1, "val_set_size": 4, "eval_steps": 2}, 3, 0),  # before the evaluations at 2, 4, end
])
def test_memory_release_steps(tmp_path, tiny_model_dir, monkeypatch, keys, collects, empties):
    """gc.collect / empty_cache after the configured steps of a 5-step run (which ends no epoch)."""
    from tuneforge.engine import memory

    calls = {"collect": 0, "empty": 0}
    monkeypatch.setattr(memory, "collect_garbage", lambda: calls.update(collect=calls["collect"] + 1))
    monkeypatch.setattr(memory, "empty_cuda_cache", lambda: calls.update(empty=calls["empty"] + 1))
    train(make_config(tmp_path, tiny_model_dir, make_rows(40), max_steps=5, save_strategy="no", **keys))
    assert (calls["collect"], calls["empty"]) == (collects, empties)
