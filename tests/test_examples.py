"""The shipped examples: every config validates, the toy data regenerates identically, and the main
example trains from scratch on CPU and reaches a held-out exact-match accuracy far above chance."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from test_engine_support import one_thread  # noqa: F401

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = sorted(EXAMPLES.glob("*.yaml"))
GPU_CONFIGS = sorted((EXAMPLES / "gpu").glob("*.yaml"))  # real models from the Hub: validated, not run here


def test_examples_exist():
    assert {p.name for p in GPU_CONFIGS} >= {"qwen2.5-1.5b-lora.yaml", "qwen2.5-0.5b-grpo-gsm8k.yaml"}
    names = {p.name for p in CONFIGS}
    assert {"sft-tiny.yaml", "lora-tiny.yaml", "alpaca-tiny.yaml"} <= names
    model = EXAMPLES / "tiny-llama"
    assert (model / "config.json").exists() and (model / "tokenizer.json").exists()
    assert not list(model.glob("*.safetensors")) and not list(model.glob("*.bin"))  # no weights shipped


@pytest.mark.parametrize("config", CONFIGS + GPU_CONFIGS, ids=lambda p: p.name)
def test_validate(config):
    from tuneforge.cli import app

    result = CliRunner().invoke(app, ["validate", str(config)])
    assert result.exit_code == 0, result.output
    assert "base_model:" in result.output  # the resolved config is printed


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_example_data_and_model_resolve(config):
    from tuneforge.config import load
    from tuneforge.models.tokenizer import model_source

    cfg = load(config)
    assert Path(model_source(cfg)).is_dir()
    for entry in [*(cfg.datasets or []), *(cfg.test_datasets or [])]:
        assert Path(cfg.resolve_path(entry.path)).is_file(), entry.path


def test_toy_data_is_regenerated_identically(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("make_toy", EXAMPLES / "data" / "make_toy.py")
    make_toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_toy)
    monkeypatch.setattr(make_toy, "HERE", tmp_path)
    make_toy.main()
    for f in tmp_path.glob("*.jsonl"):
        assert f.read_bytes() == (EXAMPLES / "data" / f.name).read_bytes(), f.name
    train = {json.dumps(json.loads(line)) for line in (tmp_path / "reverse_train.jsonl").read_text().splitlines()}
    test = {json.dumps(json.loads(line)) for line in (tmp_path / "reverse_test.jsonl").read_text().splitlines()}
    assert len(test) == 200 and not train & test  # held-out prompts never occur in training


@pytest.mark.slow
def test_sft_tiny_learns_the_held_out_task(tmp_path, monkeypatch):
    """`tuneforge train examples/sft-tiny.yaml` (one of its two epochs, to stay under a minute on a shared CPU)."""
    from tuneforge.config import load
    from tuneforge.engine.run import train

    monkeypatch.chdir(tmp_path)  # output_dir and the prepared-data cache are relative to the working directory
    overrides = ["--num-epochs", "1", "--generate-samples", "true", "--num-generation-samples", "4",
                 "--generation-do-sample", "false", "--do-causal-lm-eval", "true"]
    result = train(load(EXAMPLES / "sft-tiny.yaml", overrides), show_progress=False)
    accuracy = result.eval_metrics["eval_accuracy"]
    # Chance is about 16**-4.5 (a random 3-6 letter answer); the run reaches ~100% held-out.
    assert accuracy >= 0.9, result.eval_metrics
    assert result.train_metrics["loss"] < 0.5  # from ~6.9 (uniform over the vocabulary) at the start
    out = tmp_path / "outputs" / "sft-tiny"
    assert (out / "model.safetensors").exists()
    # generate_samples: greedy continuations of the first 4 test prompts at each evaluation; at the end
    # they are the references (greedy decoding is what the exact-match accuracy measures).
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in result.history if r["type"] == "eval"]
    assert [s["step"] for s in samples] == [step for step in evals for _ in range(4)]
    last = samples[-4:]
    assert all(s["prompt"].rstrip().endswith("assistant") and "reverse:" in s["prompt"] for s in last), last
    assert sum(s["completion"] == s["reference"] for s in last) >= 3, last
    # do_causal_lm_eval: every test row generated greedily and scored against its reference
    scores = [{k: r[k] for k in ("eval_sacrebleu", "eval_chrf", "eval_ter")} for r in result.history
              if r["type"] == "eval"]
    assert scores[0]["eval_chrf"] < scores[-1]["eval_chrf"] - 30  # mid-epoch the answers are still mostly wrong
    assert scores[-1]["eval_sacrebleu"] >= 90 and scores[-1]["eval_chrf"] >= 90 and scores[-1]["eval_ter"] <= 10


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_preprocess_debug(config, tmp_path):
    """`tuneforge preprocess --debug` runs on every example and shows at least one decoded sample."""
    from tuneforge.cli import app

    result = CliRunner().invoke(app, ["preprocess", str(config), "--debug",
                                      "--dataset-prepared-path", str(tmp_path / "prepared")])
    assert result.exit_code == 0, result.output
    assert "rows" in result.output or "prompts" in result.output
