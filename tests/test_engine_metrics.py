"""Evaluation metrics (accuracy == greedy decoding), FLOP accounting, trackers and the objective registry."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from test_engine_support import make_config, one_thread, train  # noqa: F401
from tuneforge.data.collate import collate
from tuneforge.engine.metrics import FlopCounter
from tuneforge.errors import NotSupportedYet, TuneforgeError
from tuneforge.methods import SFTObjective, get_objective


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()


def test_eval_accuracy_is_greedy_exact_match(model, tiny_model_dir):
    """Documents whose answer is the model's own greedy continuation count as exact; perturbed ones do not."""
    g = torch.Generator().manual_seed(0)
    docs, expected = [], 0
    for i in range(6):
        prompt = torch.randint(10, 900, (4 + i,), generator=g)
        greedy = model.generate(prompt[None], max_new_tokens=5, do_sample=False, attention_mask=torch.ones(1, len(prompt)),
                                pad_token_id=0)[0, len(prompt):]
        answer = greedy.clone()
        if i % 2:  # wrong in the last answer token: greedy decoding would not produce it
            answer[-1] = (answer[-1] + 1) % 1000
        else:
            expected += 1
        ids = prompt.tolist() + answer.tolist()
        docs.append({"input_ids": ids, "labels": [-100] * len(prompt) + answer.tolist()})
    objective = SFTObjective(None)
    for rows in ([[d] for d in docs], [docs[:3], docs[3:]]):  # unpacked and packed
        sums = objective.evaluate(model, collate(rows, pad_id=0))
        assert sums["documents"] == 6 and sums["exact_documents"] == expected
        assert sums["num_tokens"] == 6 * 5  # every answer token is a target (predicted from the position before)
    summary = objective.summarize_eval(sums)
    assert summary["accuracy"] == pytest.approx(expected / 6)


def test_flops_closed_form(model):
    c = model.config
    counter = FlopCounter(model, adapter=False)
    d, kv = c.hidden_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * c.intermediate_size  # q,o + k,v + gate,up,down
    n_mm = c.num_hidden_layers * per_layer + c.vocab_size * d
    assert counter.n_mm == n_mm
    tokens, sq = 100, 60 * 60 + 40 * 40
    assert counter.step_flops(tokens, sq) == 6 * n_mm * tokens + 12 * c.num_hidden_layers * d * sq


def test_missing_tracker_package_is_clear(tmp_path, tiny_model_dir):
    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed")
    cfg = make_config(tmp_path, tiny_model_dir, max_steps=1, use_tensorboard=True)
    with pytest.raises(TuneforgeError, match="pip install tensorboard"):
        train(cfg)


def test_unimplemented_method_fails_before_loading(tmp_path, monkeypatch):
    from tuneforge import methods
    from tuneforge.config import load

    monkeypatch.delitem(methods._REGISTRY, "ebft")  # a method the config accepts without an objective
    cfg = load(data={"base_model": str(tmp_path / "does-not-exist"), "rl": "ebft"})
    with pytest.raises(NotSupportedYet, match="rl: ebft"):
        train(cfg)  # the base model folder does not exist: the method check comes first
    assert get_objective(load(data={"base_model": "x"})).name == "sft"
