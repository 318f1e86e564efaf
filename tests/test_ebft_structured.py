"""EBFT's structured mode (methods/ebft/structured.py): the feature-matching reward inside GRPO.

Rewards are checked against reward.batch_rewards of features computed here by hand (one unpadded
forward per sequence of the frozen network); the feature network is the adapter-disabled model with
LoRA and the frozen starting copy with full fine-tuning (a policy whose weights moved scores exactly
as the untouched model). The ground truth's tokens, the per-prompt generation cap, the config checks
and the logged metrics are checked too; test_ebft_structured_learning.py runs the method end to end.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from tuneforge.methods.ebft import features as feats
from tuneforge.methods.ebft.ground_truth import cap_rollout, length_cap
from tuneforge.methods.ebft.reward import batch_rewards
from tuneforge.rollout.base import Rollout

G = 4


@pytest.fixture
def ebft(write_config, write_jsonl):
    from tuneforge.config import load
    from tuneforge.methods import get_objective

    rows = [{"prompt": f"copy: {w} ->", "ground_truth": f" {w}"} for w in ("the cat", "a dog", "one", "big house")]
    write_jsonl(rows, "gt.jsonl")

    def make(ebft=None, trl=None, **top):
        cfg = load(write_config({"rl": "ebft", "datasets": [{"path": "gt.jsonl", "type": "prompt"}],
                                 "trl": {"num_generations": G, "max_completion_length": 6, **(trl or {})},
                                 "ebft": {"embed_method": "completion_mean", **(ebft or {})},
                                 "micro_batch_size": 8, "seed": 0, "save_strategy": "no", **top}))
        return get_objective(cfg)

    return make


def _hand_features(model, prompts, completions, layers_f, method):
    """Pooled features, one sequence at a time (no padding at all)."""
    layers = feats.layer_indices(layers_f, feats.num_layers_of(model))
    out = []
    for p, c in zip(prompts, completions, strict=True):
        ids = torch.tensor([p + c])
        states = feats.hidden_features(model, ids, torch.ones_like(ids), layers)[0]  # [T, D]
        pooled = {"completion_mean": states[len(p):].mean(0), "mean_pooling": states.mean(0), "last_token": states[-1]}
        out.append(pooled[method])
    return torch.stack(out)


def _rollout_of(obj, batch, with_truth=True):
    """A fixed rollout: G completions per prompt of various lengths, the first the ground truth itself."""
    completions = []
    for i, gt in enumerate(batch["gt_ids"]):
        completions += [list(gt) if with_truth else [3, 4 + i], [5 + i, 9], [7, 8, 2 + i], [11]]
    n = len(completions)
    return Rollout(prompt_ids=batch["prompt_ids"], completion_ids=completions, logprobs=[[0.0] * len(c) for c in completions],
                   finished=[True] * n, n=G)


def _scored(obj, policy, tokenizer, with_truth=True):
    data = obj.prepare_data(tokenizer)
    batch = obj.collate([[data.train[i] for i in range(2)]], tokenizer.pad_token_id, training=True)
    rollout = _rollout_of(obj, batch, with_truth)
    obj._model = policy
    _, per_func = obj._score(batch, rollout)
    return batch, rollout, per_func


@pytest.mark.parametrize(("method", "whitening"), [("completion_mean", False), ("last_token", True),
                                                   ("mean_pooling", False)])
def test_rewards_are_batch_rewards_of_the_frozen_copys_features(ebft, tiny_model_dir, tiny_tokenizer, method,
                                                                 whitening):
    """Full fine-tuning: the feature network is a frozen copy of the starting weights, so a policy whose
    weights moved still gets the untouched model's rewards."""
    from transformers import AutoModelForCausalLM

    obj = ebft(ebft={"embed_method": method, "diversity_coef": 0.5, "use_whitening": whitening})
    start = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    policy = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # training moved the policy
    # Whitened, a group containing the ground truth scores [2, 0, 0, 0] whatever the features: leave it out.
    batch, rollout, per_func = _scored(obj, policy, tiny_tokenizer, with_truth=not whitening)
    prompts = [p for p in batch["prompt_ids"] for _ in range(G)]
    layers = obj.ebft.feature_layers
    gen = _hand_features(start, prompts, rollout.completion_ids, layers, method)
    truth = _hand_features(start, batch["prompt_ids"], batch["gt_ids"], layers, method)
    expected = batch_rewards(gen, truth, G, alignment_coef=1.0, diversity_coef=0.5, whitening=whitening)
    assert per_func.shape == (2 * G, 1)
    assert torch.allclose(per_func[:, 0].float(), expected.rewards, atol=1e-5)
    assert torch.allclose(obj._scores.alignment, expected.alignment, atol=1e-5)
    if not whitening:
        assert obj._scores.alignment[0] == pytest.approx(1.0, abs=1e-6)  # the ground truth itself: alignment 1
    # the moved policy's own features would score differently: the comparison above can fail
    moved = batch_rewards(_hand_features(policy, prompts, rollout.completion_ids, layers, method),
                          _hand_features(policy, batch["prompt_ids"], batch["gt_ids"], layers, method), G,
                          diversity_coef=0.5, whitening=whitening)
    assert not torch.allclose(moved.rewards, expected.rewards, atol=1e-3)


def test_lora_features_come_from_the_adapter_disabled_model(ebft, tiny_model_dir, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    obj = ebft()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                            LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    _, _, before = _scored(obj, policy, tiny_tokenizer)
    with torch.no_grad():  # the adapter trains
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch, rollout, after = _scored(obj, policy, tiny_tokenizer)
    assert torch.equal(before, after)  # features do not change as the adapter trains
    prompts = [p for p in batch["prompt_ids"] for _ in range(G)]
    layers = obj.ebft.feature_layers
    expected = batch_rewards(_hand_features(base, prompts, rollout.completion_ids, layers, "completion_mean"),
                             _hand_features(base, batch["prompt_ids"], batch["gt_ids"], layers, "completion_mean"), G)
    assert torch.allclose(after[:, 0].float(), expected.rewards, atol=1e-5)
    adapted = _hand_features(policy, prompts, rollout.completion_ids, layers, "completion_mean")
    plain = _hand_features(base, prompts, rollout.completion_ids, layers, "completion_mean")
    assert not torch.allclose(adapted, plain, atol=1e-3)  # the adapter does change the policy's own features


def test_ground_truth_tokens_end_like_a_finished_completion(ebft, tiny_tokenizer, write_config, write_jsonl):
    from tuneforge.config import load
    from tuneforge.methods import get_objective

    obj = ebft()
    data = obj.prepare_data(tiny_tokenizer)
    row = next(r for r in data.train if json.loads(r["columns_json"])["ground_truth"] == " one")
    eos = tiny_tokenizer.eos_token_id
    assert row["gt_ids"] == tiny_tokenizer(" one", add_special_tokens=False)["input_ids"] + [eos]
    # chat prompts: the assistant turn as the template renders it, up to its end-of-turn token
    write_jsonl([{"prompt": [{"role": "user", "content": "say hi"}], "ground_truth": "hi there"}], "chat.jsonl")
    chat = get_objective(load(write_config({"rl": "ebft", "chat_template": "chatml",
                                            "datasets": [{"path": "chat.jsonl", "type": "prompt"}],
                                            "trl": {"num_generations": G}, "micro_batch_size": G}, name="chat.yaml")))
    from tuneforge.models.tokenizer import load_tokenizer

    tok = load_tokenizer(chat.cfg)
    ids = chat.prepare_data(tok).train[0]["gt_ids"]
    assert tok.decode(ids) == "hi there<|im_end|>"


def test_adaptive_cap_is_per_prompt():
    assert length_cap(4, 1.5, 256) == 6 and length_cap(3, 1.5, 256) == 5 and length_cap(40, 1.5, 32) == 32
    rollout = Rollout(prompt_ids=[[1], [2]], completion_ids=[[5, 6, 7], [5], [5, 6, 7, 8], [9, 2]],
                      logprobs=[[-1.0, -2.0, -3.0], [-1.0], [-1.0, -2.0, -3.0, -4.0], [-1.0, -2.0]],
                      finished=[True, True, False, True], n=2)
    cut = cap_rollout(rollout, [2, 3])
    assert cut.completion_ids == [[5, 6], [5], [5, 6, 7], [9, 2]]
    assert cut.logprobs == [[-1.0, -2.0], [-1.0], [-1.0, -2.0, -3.0], [-1.0, -2.0]]
    assert cut.finished == [False, True, False, True]  # cut rows count as truncated


def test_generation_limit_is_the_steps_largest_cap_then_each_prompts_own(ebft, tiny_tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    obj = ebft(trl={"max_completion_length": 64}, ebft={"gt_length_multiplier": 2.0})
    data = obj.prepare_data(tiny_tokenizer)
    batch = obj.collate([[data.train[i] for i in range(4)]], tiny_tokenizer.pad_token_id, training=True)
    caps = [min(64, 2 * len(gt)) for gt in batch["gt_ids"]]
    assert obj.caps(batch) == caps and len(set(caps)) > 1
    seen = []

    class Recording:
        def generate(self, prompts, n, params):
            seen.append(params.max_tokens)
            comp = [[7] * params.max_tokens for _ in range(len(prompts) * n)]
            return Rollout(prompts, comp, [[0.0] * len(c) for c in comp], [False] * len(comp), n=n)

        def sync_weights(self, model):
            pass

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    obj._setup(model)
    obj.sampler = Recording()
    rollout, _, _ = obj._generate(model, batch)
    assert seen == [max(caps)] and obj.params.max_tokens == 64  # restored after the call
    assert [len(c) for c in rollout.completion_ids] == [c for c in caps for _ in range(G)]


def test_config_checks(ebft, write_jsonl, caplog):
    from tuneforge.config.errors import ConfigError

    with pytest.raises(ConfigError, match=r"trl.reward_funcs.*only reward is feature matching.*rl: grpo"):
        ebft(trl={"reward_funcs": ["toy.fn"]})
    with pytest.raises(ConfigError, match="trl.reward_weights"):
        ebft(trl={"reward_weights": [1.0]})
    with pytest.raises(ConfigError, match="micro_batch_size"):
        ebft(micro_batch_size=6)  # 6 completions per step is not a multiple of 4 generations
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        ebft(ebft={"stride": 4, "temperature": 0.3})
    assert "stride" in caplog.text and "temperature (use trl.temperature)" in caplog.text


def test_data_without_ground_truth_names_the_row(ebft, write_jsonl, tiny_tokenizer):
    from tuneforge.errors import DataError

    obj = ebft()
    write_jsonl([{"prompt": "a", "ground_truth": "b"}, {"prompt": "c", "answer": "d"}], "gt.jsonl")
    with pytest.raises(DataError, match=r"datasets\[0\] row 1: .*`ground_truth`.*answer"):
        obj.prepare_data(tiny_tokenizer)
    write_jsonl([{"prompt": "a", "ground_truth": "b", "remaining_turns": [{"role": "user", "content": "x"}]}],
                "gt.jsonl")
    with pytest.raises(DataError, match=r"datasets\[0\] row 0: a row with `remaining_turns` needs its prompt as a list"):
        obj.prepare_data(tiny_tokenizer)


def test_mode_strided_without_its_module_is_refused(ebft, monkeypatch):
    from tuneforge.errors import NotSupportedYet
    from tuneforge.methods.ebft import mode

    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(mode.importlib, "import_module", missing)
    with pytest.raises(NotSupportedYet, match="ebft.mode: strided"):
        ebft(ebft={"mode": "strided", "embed_method": "last_token"})


def test_a_short_run_logs_the_ebft_metrics(ebft, write_config):
    from tuneforge.config import load
    from tuneforge.engine.run import train

    cfg = load(write_config({"rl": "ebft", "datasets": [{"path": "gt.jsonl", "type": "prompt"}],
                             "trl": {"num_generations": G, "max_completion_length": 6},
                             "micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 2,
                             "logging_steps": 1, "save_strategy": "no", "seed": 0}, name="run.yaml"))
    records = [r for r in train(cfg, show_progress=False).history if r["type"] == "train"]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert {"ebft/alignment", "ebft/diversity", "ebft/cfm_loss", "ebft/reward", "rewards/ebft"} <= set(r)
        assert r["ebft/reward"] == pytest.approx(r["reward"], abs=1e-6)  # the only reward
        assert -1.0 <= r["ebft/alignment"] <= 1.0 and r["ebft/cfm_loss"] >= 0.0
        # eq. 7 on the step means: reward = 2 alignment - 2 diversity (coefficients 1)
        assert r["ebft/reward"] == pytest.approx(2 * r["ebft/alignment"] - 2 * r["ebft/diversity"], abs=1e-5)
