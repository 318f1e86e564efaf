"""scripts/measure_axolotl_examples.py on a small git repository shaped like Axolotl's: each config lands in
the bucket its problems call for, and the counts are printed."""

from __future__ import annotations

import subprocess

from script_support import load_script

CONFIGS = {
    "examples/a/ok.yaml": "base_model: acme/m\ndatasets:\n  - path: acme/chat\n    type: chat_template\n",
    "examples/a/local_data.yml": "base_model: acme/m\ndatasets:\n  - path: ./data/train.jsonl\n    type: alpaca\n",
    "examples/b/vision.yaml": "base_model: acme/v\nprocessor_type: AutoProcessor\n",
    "examples/b/cp.yaml": "base_model: acme/m\ncontext_parallel_size: 2\n",
    "examples/c/bad.yaml": "base_model: acme/m\nuse_ray: true\n",
    "examples/c/no_model.yaml": "datasets: []\n",  # not a training config: skipped
    "examples/c/notes.txt": "not a config\n",
}


def _repo(tmp_path):
    for name, text in CONFIGS.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    return tmp_path


def test_buckets_and_counts(tmp_path, capsys, monkeypatch):
    import logging
    import os

    measure = load_script("scripts/measure_axolotl_examples.py")
    monkeypatch.chdir(tmp_path)
    assert measure.main([str(_repo(tmp_path / "repo")), "--verbose"]) == 0
    assert logging.getLogger("tuneforge").isEnabledFor(logging.WARNING)  # logging is left as it was found
    assert os.getcwd() == str(tmp_path)
    out = capsys.readouterr().out
    assert "pass: examples/a/ok.yaml" in out
    assert "pass (local file absent): examples/a/local_data.yml" in out
    assert "refused-multimodal: examples/b/vision.yaml" in out
    assert "refused-context-parallel: examples/b/cp.yaml" in out
    assert "failed: examples/c/bad.yaml" in out and "no_model" not in out
    assert ": 5 example configs with a base_model" in out
    assert "passing: 2 of 3 (66.7%)" in out
    assert "   1  use_ray: Axolotl key" in out  # the reasons of the failed ones, by frequency
