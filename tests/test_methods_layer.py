"""The methods layer's contract with the layers below it: method facts, the step shape, preprocess
through the objective, GRPO's prompt split, the reference log-prob cache and the samples writer."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from tuneforge.config.methods import METHODS, method_facts


@pytest.fixture
def prompts(tmp_path, write_jsonl, write_config, monkeypatch):
    (tmp_path / "layer_rewards.py").write_text(textwrap.dedent("""
        def constant(completions, **kwargs):
            return [1.0] * len(completions)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    write_jsonl([{"prompt": f"hello {i}"} for i in range(4)], "p.jsonl")

    def config(**top):
        from tuneforge.config import load

        return load(write_config({"rl": "grpo", "datasets": [{"path": "p.jsonl", "type": "prompt"}],
                                  "trl": {"num_generations": 2, "reward_funcs": ["layer_rewards.constant"]},
                                  **top}))

    return config


def test_every_registered_objective_has_its_facts_and_every_rl_value_is_declared():
    from typing import get_args

    from tuneforge import methods
    from tuneforge.config.rl import RLMethod

    assert set(methods._REGISTRY) <= set(METHODS)
    assert set(get_args(RLMethod)) <= set(METHODS)
    assert [name for name, facts in METHODS.items() if facts.supervised] == ["sft"]
    assert [name for name, facts in METHODS.items() if facts.router_loss] == ["sft"]
    assert {name for name, facts in METHODS.items() if facts.head} == {"reward_model", "process_reward_model"}


def test_sft_only_keys_are_refused_for_every_other_method(tiny_model_dir):
    from tuneforge.config import load
    from tuneforge.config.errors import ConfigError

    base = {"base_model": str(tiny_model_dir), "datasets": [{"path": "x"}]}
    assert method_facts(load(data=base)).supervised
    for method in ({"rl": "dpo"}, {"rl": "grpo"}, {"reward_model": True}, {"process_reward_model": True}):
        with pytest.raises(ConfigError, match="neftune_noise_alpha"):
            load(data={**base, **method, "neftune_noise_alpha": 5})


def test_preprocess_prepares_grpo_prompts_through_the_objective(prompts, tiny_model_dir, capsys):
    from tuneforge.data.preprocess import run

    data = run(prompts(), debug=True)
    assert len(data.train) == 4 and "prompt_json" in data.train.column_names
    out = capsys.readouterr().out
    assert "train: 4 prompts (from 4 rows)" in out and "--- prompt 0" in out


def test_grpo_validation_split_that_leaves_no_training_prompts_is_refused(prompts, tiny_tokenizer):
    from tuneforge.errors import DataError
    from tuneforge.methods import get_objective

    with pytest.raises(DataError, match=r"val_set_size 4(\.0)? leaves no training prompts \(4 prompts in all\)"):
        get_objective(prompts(val_set_size=4)).prepare_data(tiny_tokenizer)
    data = get_objective(prompts(val_set_size=1)).prepare_data(tiny_tokenizer)
    assert (len(data.train), len(data.eval)) == (3, 1)


def test_grpo_step_shape_is_one_planned_micro_batch_of_the_steps_prompts(prompts):
    from tuneforge.methods import get_objective
    from tuneforge.methods.base import StepShape

    obj = get_objective(prompts(micro_batch_size=2, gradient_accumulation_steps=3))
    assert obj.facts is METHODS["grpo"] and obj.facts.rows == "prompts"
    assert obj.step_shape() == StepShape(rows_per_micro_batch=3, micro_batches_per_step=1)  # 6 completions / 2


def test_reference_log_prob_cache_is_published_atomically_without_drawing_from_torchs_rng(tmp_path):
    import numpy as np

    from tuneforge.methods.reference import _load_npz, _save_npz

    path = tmp_path / "ref_logps-k-train.npz"
    values = {"ref_chosen_logps": np.array([-1.5, -2.0]), "ref_rejected_logps": np.array([-3.0, -4.0])}
    torch.manual_seed(3)
    before = torch.get_rng_state()
    _save_npz(path, values)
    _save_npz(path, {k: v + 1 for k, v in values.items()})  # replacing an existing file
    assert torch.equal(torch.get_rng_state(), before)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no partial file left behind
    loaded = _load_npz(path, 2)
    assert loaded is not None and np.array_equal(loaded["ref_chosen_logps"], [-0.5, -1.0])
    assert _load_npz(path, 3) is None  # another row count: recomputed


def test_samples_writer_appends_json_lines_and_survives_an_unwritable_folder(tmp_path, caplog):
    from tuneforge.engine.samples_writer import SamplesWriter

    writer = SamplesWriter(tmp_path / "out" / "completions.jsonl")
    writer.write([{"step": 1, "completion": "a"}])
    writer.write([{"step": 2, "completion": "b"}])
    lines = [json.loads(x) for x in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "completion": "a"}, {"step": 2, "completion": "b"}]
    (tmp_path / "file").write_text("")
    SamplesWriter(tmp_path / "file" / "samples.jsonl").write([{"step": 1}])  # a file where a folder should be
    assert "could not write samples.jsonl" in caplog.text
