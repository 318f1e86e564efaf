"""`validate` checks what needs no model: dataset types, data files and their first rows, chat template
names; it prints the resolved config on stdout and notes/problems on stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuneforge.config import ConfigError, load
from tuneforge.data.validate_rows import check_without_model

ROOT = Path(__file__).resolve().parents[1]


def _problems(tmp_path, text: str) -> list:
    path = tmp_path / "c.yaml"
    path.write_text("base_model: some/model\n" + text)
    with pytest.raises(ConfigError) as exc:
        check_without_model(load(path))
    return exc.value.issues


def _rows(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_row_missing_a_field_names_row_field_and_line(tmp_path):
    _rows(tmp_path / "a.jsonl", [{"instruction": "q", "output": "a"}, {"instruction": "q2"}])
    (issue,) = _problems(tmp_path, "datasets:\n  - path: a.jsonl\n    type: alpaca\n")
    assert issue.path == "datasets.0.type" and issue.line == 4
    assert "a.jsonl row 1 has no `output` field" in issue.message and "(the row has: instruction)" in issue.message


def test_chat_rows_need_role_and_content_as_mapped(tmp_path):
    _rows(tmp_path / "c.jsonl", [{"conversations": [{"from": "human", "value": "hi"}]}])
    (issue,) = _problems(tmp_path, "datasets:\n  - path: c.jsonl\n    type: chat_template\n")
    assert "row 0, message 0 has no `role`" in issue.message and "message_property_mappings" in issue.message
    ok = tmp_path / "ok.yaml"
    ok.write_text("base_model: m\ndatasets:\n  - path: c.jsonl\n    type: chat_template\n"
                  "    message_property_mappings:\n      role: from\n      content: value\n")
    check_without_model(load(ok))  # mapped: no problem


def test_missing_file_unknown_type_and_unknown_template_are_reported_together(tmp_path):
    issues = _problems(tmp_path, "chat_template: chatmll\ndatasets:\n  - path: gone.jsonl\n    type: alpaca\n"
                       "  - path: owner/name\n    type: alpacca\n  - path: owner/other\n    type: nomod.fn\n")
    by_path = {i.path: i.message for i in issues}
    assert set(by_path) == {"chat_template", "datasets.0.path", "datasets.1.type", "datasets.2.type"}
    assert "Did you mean `chatml`" in by_path["chat_template"]
    assert "dataset file not found: gone.jsonl" in by_path["datasets.0.path"]
    assert "Did you mean `alpaca`" in by_path["datasets.1.type"]
    assert "nomod.py" in by_path["datasets.2.type"]


def test_a_module_type_is_found_on_the_import_path_without_importing_it(tmp_path, monkeypatch):
    (tmp_path / "mine.py").write_text("raise SystemExit('imported')\n")
    path = tmp_path / "c.yaml"
    path.write_text("base_model: m\ndatasets:\n  - path: owner/name\n    type: mine.rows\n")
    (issue,) = _problems_of(path)  # next to the config, but the data step imports from the import path
    assert "`mine`" in issue.message and "PYTHONPATH" in issue.message
    monkeypatch.syspath_prepend(str(tmp_path))
    check_without_model(load(path))  # found, and not run (it would exit)


def _problems_of(path):
    with pytest.raises(ConfigError) as exc:
        check_without_model(load(path))
    return exc.value.issues


def test_validate_prints_yaml_on_stdout_and_notes_on_stderr(tmp_path):
    _rows(tmp_path / "a.jsonl", [{"instruction": "q", "output": "a"}])
    path = tmp_path / "c.yaml"
    path.write_text("base_model: m\nplugins:\n  - axolotl.integrations.liger.LigerPlugin\nevals_per_epoch: 2\n"
                    "datasets:\n  - path: a.jsonl\n    type: alpaca\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "tuneforge.cli", "validate", str(path)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["base_model"] == "m"
    notes = [line for line in out.stderr.splitlines() if line.startswith("WARNING ")]
    assert len(notes) == 2 and "LigerPlugin" in notes[0] and "evals_per_epoch" in notes[1]
    assert "valid (2 note(s) above)" in out.stderr


def test_data_and_method_problems_are_reported_together(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tuneforge.cli import app

    (tmp_path / "rw.py").write_text("def const(completions, **kw):\n    return [0.0 for _ in completions]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "c.yaml"
    path.write_text("base_model: m\nrl: grpo\nmicro_batch_size: 3\ndatasets:\n  - path: gone.jsonl\n"
                    "trl:\n  reward_funcs: [rw.const]\n  num_generations: 4\n")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert isinstance(result.exception, ConfigError)
    by_path = {issue.path: issue.message for issue in result.exception.issues}
    assert "dataset file not found: gone.jsonl" in by_path["datasets.0.path"]  # the data check
    assert any("counts completions" in m for m in by_path.values())  # and GRPO's own batch geometry
