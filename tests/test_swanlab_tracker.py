"""SwanLab logging (use_swanlab): the swanlab_* keys, and what a run sends to a recording `swanlab` module."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types

import pytest

from config_support import issues_of, notes_of
from test_engine_support import make_config, one_thread, train  # noqa: F401
from tuneforge.engine import trackers
from tuneforge.errors import TuneforgeError


class _Table:
    def add(self, headers, rows):
        self.headers, self.rows = list(headers), [list(r) for r in rows]
        return self


@pytest.fixture
def fake_swanlab(monkeypatch):
    """A `swanlab` module that records every call in order."""
    calls: list[tuple] = []
    module = types.ModuleType("swanlab")
    module.__spec__ = importlib.machinery.ModuleSpec("swanlab", None)
    module.login = lambda **kw: calls.append(("login", kw))
    module.init = lambda **kw: calls.append(("init", kw)) or object()
    module.config = types.SimpleNamespace(update=lambda values: calls.append(("config", dict(values))))
    module.log = lambda values, step=None: calls.append(("log", dict(values), step))
    module.finish = lambda: calls.append(("finish",))
    module.echarts = types.SimpleNamespace(Table=_Table)
    monkeypatch.setitem(sys.modules, "swanlab", module)
    return calls


def test_a_run_sends_its_metrics_config_and_samples_to_swanlab(tmp_path, tiny_model_dir, fake_swanlab):
    cfg = make_config(tmp_path, tiny_model_dir, max_steps=3, val_set_size=4, eval_steps=2, logging_steps=1,
                      save_strategy="no", generate_samples=True, num_generation_samples=2,
                      generation_max_new_tokens=3, use_swanlab=True, swanlab_project="proj",
                      swanlab_experiment_name="exp", swanlab_description="why", swanlab_mode="local",
                      swanlab_workspace="team", swanlab_completion_log_interval=2)
    train(cfg)
    out = tmp_path / "out"
    calls = fake_swanlab
    assert calls[0] == ("init", {"project": "proj", "experiment_name": "exp", "description": "why", "mode": "local",
                                 "workspace": "team"})
    assert calls[1][0] == "config" and calls[1][1]["learning_rate"] == 1e-3 and calls[1][1]["swanlab_project"] == "proj"
    assert calls[-1] == ("finish",)
    # every metrics.jsonl record, under type/key, at its step, in order
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [({f"{r['type']}/{k}": v for k, v in r.items() if isinstance(v, int | float) and k not in ("step", "type")},
                 r["step"]) for r in records]
    metrics = [(c[1], c[2]) for c in calls if c[0] == "log" and "samples" not in c[1]]
    assert metrics == expected
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3]
    # the samples table: step 2's evaluation's rows uploaded at the next log call after the interval (step 3's
    # train record) under their own step, and at the end with step 3's evaluation's rows too
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    tables = [(c[2], c[1]["samples"]) for c in calls if c[0] == "log" and "samples" in c[1]]
    assert [step for step, _ in tables] == [2, 3]
    train3 = next(i for i, c in enumerate(calls) if c[0] == "log" and c[2] == 3 and "train/loss" in c[1])
    assert calls[train3 + 1][1].keys() == {"samples"} and calls[train3 + 1][2] == 2
    assert [r["step"] for r in samples] == [2, 2, 3, 3]
    last = tables[-1][1]
    assert last.headers == list(samples[0])
    assert last.rows == [[s[h] for h in last.headers] for s in samples]
    assert len(tables[0][1].rows) == 2


def test_the_table_keeps_the_newest_rows_and_waits_for_a_whole_line(tmp_path):
    from tuneforge.engine.swanlab_tracker import TableFollower

    path = tmp_path / "samples.jsonl"
    follower = TableFollower(path, "samples", max_rows=2)
    assert follower.read_new() is False  # no file yet
    path.write_text('{"step": 1, "prompt": "a"}\n{"step": 2, "prompt": "b", "extra": [1]}\n{"step": 3')
    assert follower.read_new() is True
    assert follower.headers_and_rows() == (["step", "prompt", "extra"], [[1, "a", ""], [2, "b", "[1]"]])
    assert (follower.upload_step(now=5), follower.upload_step(now=5)) == (2, None)  # filed under its rows' step
    with path.open("a") as f:
        f.write(', "prompt": "c"}\n')
    assert follower.read_new() is True and follower.headers_and_rows()[1] == [[2, "b", "[1]"], [3, "c", ""]]
    assert follower.read_new() is False
    assert follower.upload_step(now=5) == 3
    with path.open("a") as f:
        f.write('{"step": 3, "prompt": "late"}\n')
    assert follower.read_new() is True and follower.upload_step(now=5) is None  # SwanLab would drop step 3 again


def test_login_with_an_api_key_and_host(tmp_path, tiny_model_dir, fake_swanlab):
    from tuneforge.engine.swanlab_tracker import SwanLabTracker

    cfg = make_config(tmp_path, tiny_model_dir, use_swanlab=True, swanlab_api_key="k", swanlab_api_host="https://h")
    tracker = SwanLabTracker(cfg, tmp_path)
    tracker.start()
    assert fake_swanlab == [("login", {"api_key": "k", "host": "https://h"}), ("init", {"project": "out"})]


def test_a_failed_start_is_one_message_with_the_fixes(tmp_path, tiny_model_dir, fake_swanlab):
    from tuneforge.engine.swanlab_tracker import SwanLabTracker

    def refuse(**kw):
        raise RuntimeError("no API key was provided")

    sys.modules["swanlab"].init = refuse
    tracker = SwanLabTracker(make_config(tmp_path, tiny_model_dir, use_swanlab=True), tmp_path)
    with pytest.raises(TuneforgeError, match=r"SwanLab did not start \(RuntimeError: no API key was provided\); "
                                             r"set swanlab_api_key or SWANLAB_API_KEY, run `swanlab login` once"):
        tracker.start()


def test_swanlab_is_requested_unless_disabled_and_a_missing_package_is_one_message(tmp_path, tiny_model_dir):
    cfg = make_config(tmp_path, tiny_model_dir, use_swanlab=True)
    assert trackers.requested(cfg) == ["swanlab"]
    off = make_config(tmp_path, tiny_model_dir, name="off.yaml", use_swanlab=True, swanlab_mode="disabled")
    assert trackers.requested(off) == []
    if importlib.util.find_spec("swanlab") is not None:
        pytest.skip("swanlab is installed")
    with pytest.raises(TuneforgeError, match=r"`use_swanlab` is set but the swanlab package is not installed: "
                                             r"pip install swanlab"):
        trackers.check_installed(trackers.requested(cfg))


def test_axolotl_swanlab_configs_load_with_notes_for_the_unused_keys(tmp_path, caplog):
    cfg, notes = notes_of(tmp_path, caplog, "plugins:\n  - axolotl.integrations.swanlab.SwanLabPlugin\n"
                          "swanlab_project: p\nswanlab_mode: cloud\nswanlab_lark_webhook_url: https://x\n"
                          "swanlab_log_model: true\nswanlab_completion_max_buffer: 256\n")
    assert cfg.use_swanlab and cfg.swanlab_mode == "cloud" and cfg.swanlab_completion_max_buffer == 256
    assert any("SwanLabPlugin" in n and "use_swanlab on" in n for n in notes)
    assert "`swanlab_lark_webhook_url` is not used: no Lark notifications are sent" in notes
    assert any(n.startswith("`swanlab_log_model` is not used") for n in notes)
    cfg, _ = notes_of(tmp_path, caplog, "plugins: [axolotl.integrations.swanlab.SwanLabPlugin]\nuse_swanlab: false\n")
    assert cfg.use_swanlab is False  # the config's own setting wins over the plugin
    _, notes = notes_of(tmp_path, caplog, "swanlab_project: p\n")
    assert "`swanlab_project` set but SwanLab is off: add use_swanlab: true" in notes
    [issue] = issues_of(tmp_path, "use_swanlab: true\nswanlab_mode: clod\n")
    assert issue.path == "swanlab_mode"
