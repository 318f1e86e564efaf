"""Issue 20, items 9 (a custom format's cache key covers the local code it imports), 10 (modules next to
the config import from the `tuneforge` command without PYTHONPATH) and 14 (`validate` runs no user code)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _command(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`tuneforge ARGS` as the installed command runs: no PYTHONPATH but tuneforge's own, and neither the
    working directory nor the config's folder on sys.path (-P)."""
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    code = "import sys; from tuneforge.cli import main; sys.argv = ['tuneforge', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-P", "-c", code, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)


def _project(tmp_path: Path, tiny_model_dir: Path, config: dict) -> Path:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "qa_fmt_next_to_config.py").write_text(textwrap.dedent("""
        from qa_helpers_next_to_config import SEPARATOR

        def build(row, tokenizer, cfg):
            p = tokenizer(row["q"] + SEPARATOR, add_special_tokens=False)["input_ids"]
            a = tokenizer(row["a"], add_special_tokens=False)["input_ids"]
            return {"input_ids": p + a, "labels": [-100] * len(p) + a}
    """))
    (proj / "qa_helpers_next_to_config.py").write_text('SEPARATOR = ":"\n')
    (proj / "data.jsonl").write_text('{"q": "Name a color", "a": " blue"}\n')
    (proj / "c.yaml").write_text(yaml.safe_dump({"base_model": str(tiny_model_dir),
                                                 "output_dir": str(tmp_path / "out"), **config}))
    (tmp_path / "elsewhere").mkdir()
    return proj


def test_a_format_next_to_the_config_imports_and_its_helpers_key_the_cache(tmp_path, tiny_model_dir):
    proj = _project(tmp_path, tiny_model_dir, {
        "datasets": [{"path": "data.jsonl", "type": "qa_fmt_next_to_config.build"}],
        "dataset_prepared_path": str(tmp_path / "prepared")})
    run = _command(["preprocess", str(proj / "c.yaml"), "--debug"], tmp_path / "elsewhere")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[[Name a color:]] blue" in run.stdout + run.stderr
    # Editing only the helper module the format imports must prepare the data again, not reuse the cache.
    (proj / "qa_helpers_next_to_config.py").write_text('SEPARATOR = " ->"\n')
    run = _command(["preprocess", str(proj / "c.yaml"), "--debug"], tmp_path / "elsewhere")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[[Name a color ->]] blue" in run.stdout + run.stderr


def test_validate_locates_reward_modules_without_running_them(tmp_path, tiny_model_dir):
    proj = _project(tmp_path, tiny_model_dir, {
        "rl": "grpo", "datasets": [{"path": "data.jsonl", "type": "prompt"}], "micro_batch_size": 4,
        "trl": {"num_generations": 2, "reward_funcs": ["side_effects.reward"]}})
    marker = tmp_path / "ran"
    (proj / "side_effects.py").write_text(f"open({str(marker)!r}, 'w').write('top-level code ran')\n"
                                          "def reward(completions, **kw):\n    return [0.0] * len(completions)\n")
    run = _command(["validate", str(proj / "c.yaml")], tmp_path / "elsewhere")
    assert run.returncode == 0, run.stderr[-3000:]
    assert not marker.exists(), "validate imported the reward module"
    (proj / "c.yaml").write_text((proj / "c.yaml").read_text().replace("side_effects.reward", "missing_mod.reward"))
    run = _command(["validate", str(proj / "c.yaml")], tmp_path / "elsewhere")
    assert run.returncode == 2
    assert ("error: trl.reward_funcs: module `missing_mod` for `missing_mod.reward` was not found. Put it next to "
            "the config file or where you run tuneforge, or on PYTHONPATH.") in run.stderr


def test_train_finds_the_reward_module_next_to_the_config(tmp_path, tiny_model_dir):
    from tuneforge.config import load
    from tuneforge.methods.rewards import RewardSet

    proj = _project(tmp_path, tiny_model_dir, {
        "rl": "grpo", "datasets": [{"path": "data.jsonl", "type": "prompt"}],
        "trl": {"reward_funcs": ["rewards_beside_cfg.one"]}})
    (proj / "rewards_beside_cfg.py").write_text("def one(completions, **kw):\n    return [1.0] * len(completions)\n")
    assert str(proj) not in sys.path
    rs = RewardSet.from_config(load(proj / "c.yaml"))
    assert rs.compute(["q"], ["a"], [[1]], {}).tolist() == [[1.0]]
