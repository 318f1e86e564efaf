"""The GRPO objective on a tiny model, driven the way the engine loop drives it (rollout -> num_items ->
loss), plus prompt datasets: transforms, chat rendering and clear errors."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from tuneforge.errors import DataError


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
    (tmp_path / "obj_rewards.py").write_text(textwrap.dedent("""
        def parity(completion_ids, **kwargs):
            return [float(ids[0] % 2) for ids in completion_ids]

        def constant(completions, **kwargs):
            return [1.0] * len(completions)

        def transform(cfg):
            def mapper(example, tokenizer=None):
                return {"prompt": [{"role": "user", "content": example["q"]}], "answer": example["a"],
                        "vocab": len(tokenizer)}
            return mapper, {"remove_columns": "__all__"}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _setup(write_config, write_jsonl, tiny_tokenizer, trl=None, rows=None, **top):
    from tuneforge.config import load
    from tuneforge.methods import get_objective

    write_jsonl(rows or [{"prompt": f"hello {i}", "answer": str(i)} for i in range(16)], "p.jsonl")
    cfg = load(write_config({"rl": "grpo", "datasets": [{"path": "p.jsonl", "type": "prompt"}],
                             "trl": {"num_generations": 4, "max_completion_length": 6,
                                     "reward_funcs": ["obj_rewards.parity"], **(trl or {})},
                             "micro_batch_size": 8, "seed": 0, **top}))
    obj = get_objective(cfg)
    data = obj.prepare_data(tiny_tokenizer)
    return cfg, obj, data


def _model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))


def _batches(obj, data, starts, size=2):
    return [obj.collate([[data.train[i]] for i in range(s, s + size)], 0, training=True) for s in starts]


def _step(obj, model, batches, optimizer=None):
    """One optimizer step exactly as engine/trainer.py runs it."""
    rolled = obj.rollout_step(model, batches)
    n = sum(obj.num_items(b) for b in rolled)
    out = []
    for b in rolled:
        loss, sums = obj.loss(model, b, n)
        loss.backward()
        out.append((loss, sums, b))
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad()
    return out


def test_on_policy_step_is_reinforce_and_sampler_logps_match(rewards_module, write_config, write_jsonl, tiny_tokenizer,
                                                             tiny_model_dir):
    from tuneforge.methods.grpo import completion_logps
    from tuneforge.methods.grpo import loss as gl

    cfg, obj, data = _setup(write_config, write_jsonl, tiny_tokenizer, trl={"loss_type": "grpo"})
    model = _model(tiny_model_dir)
    torch.manual_seed(0)
    (loss, sums, b), = _step(obj, model, _batches(obj, data, [0]))
    assert "old_logps" not in b and "is_weights" not in b  # on-policy: pi_old = pi.detach()
    with torch.no_grad():
        logps = completion_logps(model, b, 1.0)
    assert torch.allclose(logps[b["mask"]], b["sampler_logps"][b["mask"]], atol=2e-5)
    # grpo loss on a full group with ratio 1 = -mean(A) = 0; its gradient is REINFORCE's
    assert abs(loss.item()) < 1e-6
    expect = gl.group_advantages(b["rewards_per_func"], torch.ones(1, dtype=torch.float64), 4).advantages
    assert torch.allclose(b["advantages"].double(), expect.double(), atol=1e-6)
    rewards = torch.tensor([float(c[0] % 2) for c in b["completion_ids"].tolist()])
    assert torch.equal(b["rewards_per_func"][:, 0].float(), rewards)


def test_batch_scaling_spans_the_micro_batches_of_a_step(rewards_module, write_config, write_jsonl, tiny_tokenizer,
                                                         tiny_model_dir):
    from tuneforge.methods.grpo import loss as gl

    cfg, obj, data = _setup(write_config, write_jsonl, tiny_tokenizer, trl={"scale_rewards": "batch"})
    model = _model(tiny_model_dir)
    torch.manual_seed(0)
    out = _step(obj, model, _batches(obj, data, [0, 2]))
    per_func = torch.cat([b["rewards_per_func"] for _, _, b in out])
    whole = gl.group_advantages(per_func, torch.ones(1, dtype=torch.float64), 4, scale_rewards="batch")
    got = torch.cat([b["advantages"] for _, _, b in out]).double()
    assert torch.allclose(got, whole.advantages, atol=1e-6) and bool(got.any())
    per_group = gl.group_advantages(per_func, torch.ones(1, dtype=torch.float64), 4).advantages
    assert not torch.allclose(got, per_group, atol=1e-3)


def test_num_iterations_reuses_the_generation_with_fixed_old_logps(rewards_module, write_config, write_jsonl,
                                                                    tiny_tokenizer, tiny_model_dir):
    cfg, obj, data = _setup(write_config, write_jsonl, tiny_tokenizer,
                            trl={"num_iterations": 2, "epsilon": 0.01})
    model = _model(tiny_model_dir)
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    torch.manual_seed(0)
    first = _step(obj, model, _batches(obj, data, [0]), opt)
    second = _step(obj, model, _batches(obj, data, [2]), opt)
    third = _step(obj, model, _batches(obj, data, [4]), opt)
    b1, b2, b3 = first[0][2], second[0][2], third[0][2]
    assert b2 is b1 and b3 is not b1  # one generation, two optimizer steps
    summary = obj.summarize(second[0][1], obj.num_items(b2))
    assert summary["clip_ratio/region_mean"] > 0  # the ratio moved away from 1 after the first update


def test_zero_advantage_micro_batch_is_skipped(rewards_module, write_config, write_jsonl, tiny_tokenizer,
                                               tiny_model_dir):
    cfg, obj, data = _setup(write_config, write_jsonl, tiny_tokenizer, trl={"reward_funcs": ["obj_rewards.constant"]})
    model = _model(tiny_model_dir)
    (loss, sums, b), = _step(obj, model, _batches(obj, data, [0]))
    assert sums["skipped_batches"] == 1.0 and loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_lora_reference_is_the_adapter_disabled_model(rewards_module, write_config, write_jsonl, tiny_tokenizer,
                                                      tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from tuneforge.methods.grpo import completion_logps

    cfg, obj, data = _setup(write_config, write_jsonl, tiny_tokenizer, trl={"beta": 0.04})
    base = _model(tiny_model_dir)
    model = get_peft_model(_model(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights=False))
    torch.manual_seed(0)
    (loss, sums, b), = _step(obj, model, _batches(obj, data, [0]))
    with torch.no_grad():
        base_logps = completion_logps(base, b, 1.0)
        policy = completion_logps(model, b, 1.0)
    m = b["mask"]
    assert torch.allclose(b["ref_logps"][m], base_logps[m], atol=1e-5)
    assert not torch.allclose(policy[m], base_logps[m], atol=1e-3)
    assert obj.summarize(sums, obj.num_items(b))["kl"] > 0


def test_full_finetune_reference_is_a_frozen_copy_and_kl_starts_at_zero(rewards_module, write_config, write_jsonl,
                                                                         tiny_tokenizer, tiny_model_dir):
    cfg, obj, data = _setup(write_config, write_jsonl, tiny_tokenizer, trl={"beta": 0.04})
    model = _model(tiny_model_dir)
    torch.manual_seed(0)
    (loss, sums, b), = _step(obj, model, _batches(obj, data, [0]))
    assert obj.summarize(sums, obj.num_items(b))["kl"] == 0.0
    assert obj.reference.copy is not None and not any(p.requires_grad for p in obj.reference.copy.parameters())


def test_async_prefetch_trains_on_the_previous_batch_with_importance_weights(rewards_module, write_config, write_jsonl,
                                                                            tiny_tokenizer, tiny_model_dir):
    from tuneforge.methods.grpo import loss as gl

    cfg, obj, data = _setup(write_config, write_jsonl, tiny_tokenizer, trl={"async_prefetch": True})
    model = _model(tiny_model_dir)
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    torch.manual_seed(0)
    try:
        batches = [_batches(obj, data, [s]) for s in (0, 2, 4)]
        b0 = _step(obj, model, batches[0], opt)[0][2]
        b1 = _step(obj, model, batches[1], opt)[0][2]
        # Move the weights for sure (a step whose advantages are all zero would leave them unchanged):
        # the completions trained next were sampled before this change.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        b2 = _step(obj, model, batches[2], opt)[0][2]
    finally:
        obj.close()
    assert not b0["off_policy"] and b1["off_policy"] and b2["off_policy"]
    # step 1 trains on prompts of step 0 (from the queue), step 2 on those of step 1
    assert b1["prompt_texts"] == [json.loads(data.train[i]["prompt_json"]) for i in (0, 1)]
    assert b2["prompt_texts"] == [json.loads(data.train[i]["prompt_json"]) for i in (2, 3)]
    w = gl.importance_weights(b2["old_logps"], b2["sampler_logps"], b2["mask"], "token_truncate", cap=3.0)
    assert torch.equal(b2["is_weights"], w)
    m = b2["mask"]
    assert not torch.allclose(b2["old_logps"][m], b2["sampler_logps"][m], atol=1e-4)  # sampled with stale weights


def test_an_fp8_kv_cache_makes_the_sampler_off_policy_and_corrected(rewards_module, write_config, write_jsonl,
                                                                    tiny_tokenizer, tiny_model_dir):
    """kv_cache_dtype fp8 samples from a rounded model: its log-probs are not pi's, so pi_old is recomputed
    and the importance weights pi_old / pi_sampler apply, as for vLLM."""
    from tuneforge.methods.grpo import loss as gl

    cfg, obj, data = _setup(write_config, write_jsonl, tiny_tokenizer, trl={"generation_kwargs": {"kv_cache_dtype": "fp8"}})
    model = _model(tiny_model_dir)
    torch.manual_seed(0)
    (_, sums, b), = _step(obj, model, _batches(obj, data, [0]))
    assert obj.sampler.used_fused and obj.sampler.kv_cache_dtype == torch.float8_e4m3fn
    assert b["off_policy"] and "is_weights" in b
    m = b["mask"]
    assert torch.equal(b["is_weights"], gl.importance_weights(b["old_logps"], b["sampler_logps"], m, "token_truncate",
                                                             cap=3.0))
    assert not torch.equal(b["old_logps"][m], b["sampler_logps"][m])  # rounded, yet close:
    assert torch.allclose(b["old_logps"][m], b["sampler_logps"][m], atol=0.1)


def test_evaluate_reports_the_mean_reward_of_sampled_completions(rewards_module, write_config, write_jsonl,
                                                                  tiny_tokenizer, tiny_model_dir):
    cfg, obj, data = _setup(write_config, write_jsonl, tiny_tokenizer)
    model = _model(tiny_model_dir)
    torch.manual_seed(0)
    sums = obj.evaluate(model, _batches(obj, data, [0], size=4)[0])
    assert sums["completions"] == 16.0
    out = obj.summarize_eval(sums)
    assert 0.0 <= out["reward"] <= 1.0 and out["reward"] == sums["reward_sum"] / 16
    assert 1.0 <= out["completions/mean_length"] <= 6.0


# ---------------------------------------------------------------- prompt datasets
def test_user_transform_with_chat_prompt_and_removed_columns(rewards_module, write_config, write_jsonl, tiny_tokenizer):
    from tuneforge.config import load
    from tuneforge.data.formats.grpo import prepare_prompts

    write_jsonl([{"q": "what is 2+2", "a": "4", "junk": 1}], "qa.jsonl")
    cfg = load(write_config({"rl": "grpo", "chat_template": "chatml",
                             "datasets": [{"path": "qa.jsonl", "type": "obj_rewards.transform"}],
                             "trl": {"reward_funcs": ["obj_rewards.constant"], "max_prompt_length": 5}}))
    tok = tiny_tokenizer
    from tuneforge.chat_templates import resolve

    old = tok.chat_template
    tok.chat_template = resolve("chatml", None, tok, None)
    try:
        data = prepare_prompts(cfg, tok)
        text = tok.apply_chat_template([{"role": "user", "content": "what is 2+2"}], tokenize=False,
                                       add_generation_prompt=True)
    finally:
        tok.chat_template = old
    row = data.train[0]
    full = tok(text, add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == full[-5:]  # max_prompt_length keeps the end (the generation prompt)
    assert json.loads(row["columns_json"]) == {"answer": "4", "vocab": len(tok)}  # q, a, junk removed
    assert json.loads(row["prompt_json"]) == [{"role": "user", "content": "what is 2+2"}]


def test_builtin_gsm8k_and_errors(rewards_module, write_config, write_jsonl, tiny_tokenizer):
    from tuneforge.config import load
    from tuneforge.data.formats.grpo import prepare_prompts

    write_jsonl([{"question": "q1", "answer": "so 3 * 4 = 12\n#### 1,212"}], "g.jsonl")
    cfg = load(write_config({"rl": "grpo", "datasets": [{"path": "g.jsonl", "type": "gsm8k:text"}],
                             "trl": {"reward_funcs": ["obj_rewards.constant"]}}))
    row = prepare_prompts(cfg, tiny_tokenizer).train[0]
    assert json.loads(row["columns_json"])["answer"] == "1212" and json.loads(row["prompt_json"]) == "q1"

    write_jsonl([{"question": "q1"}, {"text": "no question"}], "bad.jsonl")
    cfg = load(write_config({"rl": "grpo", "datasets": [{"path": "bad.jsonl", "type": "question_answer:text"}],
                             "trl": {"reward_funcs": ["obj_rewards.constant"]}}))
    with pytest.raises(DataError, match=r"datasets\[0\] row 1: the row has no question column"):
        prepare_prompts(cfg, tiny_tokenizer)
    cfg = load(write_config({"rl": "grpo", "datasets": [{"path": "bad.jsonl", "type": "question_answer"}],
                             "trl": {"reward_funcs": ["obj_rewards.constant"]}}))
    old = tiny_tokenizer.chat_template
    tiny_tokenizer.chat_template = None
    try:
        with pytest.raises(DataError, match="no chat template"):
            prepare_prompts(cfg, tiny_tokenizer)
    finally:
        tiny_tokenizer.chat_template = old


def test_config_errors_come_before_any_model(write_config, rewards_module):
    from tuneforge.config import load
    from tuneforge.config.errors import ConfigError
    from tuneforge.methods import get_objective
    from tuneforge.methods.rewards import RewardError

    with pytest.raises(RewardError, match="cannot import module `nope`"):
        get_objective(load(write_config({"rl": "grpo", "datasets": [{"path": "x"}],
                                         "trl": {"reward_funcs": ["nope.fn"]}})))
    with pytest.raises(ConfigError, match="sample_packing"):
        get_objective(load(write_config({"rl": "grpo", "sample_packing": True, "datasets": [{"path": "x"}],
                                         "trl": {"reward_funcs": ["obj_rewards.constant"]}})))
    with pytest.raises(ConfigError, match=r"trl.generation_kwargs.kv_cache_dtype .*'fp4' is not one of auto, fp8"):
        load(write_config({"rl": "grpo", "datasets": [{"path": "x"}],
                           "trl": {"reward_funcs": ["obj_rewards.constant"], "generation_kwargs": {"kv_cache_dtype": "fp4"}}}))
    gdpo = get_objective(load(write_config({"rl": "gdpo", "datasets": [{"path": "x"}],
                                            "trl": {"reward_funcs": ["obj_rewards.constant"]}})))
    assert gdpo.settings.aggregation == "normalize_then_sum" and gdpo.settings.loss_type == "dapo" and gdpo.settings.beta == 0.0


def test_micro_batch_size_counts_completions_as_in_axolotl(write_config, rewards_module):
    from tuneforge.config import load
    from tuneforge.config.errors import ConfigError
    from tuneforge.methods import get_objective

    def objective(**top):
        return get_objective(load(write_config({"rl": "grpo", "datasets": [{"path": "x"}],
                                                "trl": {"reward_funcs": ["obj_rewards.constant"], "num_generations": 4},
                                                **top})))

    # prompts generated per optimizer step = micro_batch_size x gradient_accumulation_steps / num_generations
    assert objective(micro_batch_size=8).step_shape().rows_per_micro_batch == 2
    split = objective(micro_batch_size=2, gradient_accumulation_steps=4)
    assert split.step_shape().rows_per_micro_batch == 2 and split.step_shape().micro_batches_per_step == 1
    assert objective().step_shape().rows_per_micro_batch == 1  # unset: one prompt's group per micro-batch
    with pytest.raises(ConfigError, match=r"micro_batch_size: counts completions .* = 6 completions per optimizer "
                                          r"step, which must be a multiple of trl.num_generations \(4\)"):
        objective(micro_batch_size=6)
    with pytest.raises(ConfigError, match=r"trl.generation_batch_size: is 16, .* = 8 completions"):
        get_objective(load(write_config({"rl": "grpo", "datasets": [{"path": "x"}], "micro_batch_size": 8,
                                         "trl": {"reward_funcs": ["obj_rewards.constant"], "num_generations": 4,
                                                 "generation_batch_size": 16}})))


def test_splitting_a_generation_into_micro_batches_keeps_the_gradient(rewards_module, write_config, write_jsonl,
                                                                       tiny_tokenizer, tiny_model_dir):
    """2 prompts x 4 completions trained as one micro-batch of 8, or as 4 micro-batches of 2 completions
    (groups split across micro-batches, TRL's layout): same advantages, same summed gradient."""
    grads, advantages = [], []
    for top in ({"micro_batch_size": 8}, {"micro_batch_size": 2, "gradient_accumulation_steps": 4}):
        cfg, obj, data = _setup(write_config, write_jsonl, tiny_tokenizer, trl={"loss_type": "dapo"}, **top)
        model = _model(tiny_model_dir)
        torch.manual_seed(0)
        batch = obj.collate([[data.train[i]] for i in range(obj.step_shape().rows_per_micro_batch)], 0, training=True)
        out = _step(obj, model, [batch])
        assert [len(b["texts"]) for _, _, b in out] == ([8] if top["micro_batch_size"] == 8 else [2, 2, 2, 2])
        assert sum(sums["gen_seconds"] > 0 for _, sums, _ in out) == 1  # generation time counted once
        advantages.append(torch.cat([b["advantages"] for _, _, b in out]))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.equal(advantages[0], advantages[1]) and bool(advantages[0].any())
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7)


def test_validate_runs_the_method_checks(write_config, rewards_module):
    """`tuneforge validate` reports what training would reject (here GRPO's batch geometry), exit status 2."""
    import subprocess
    import sys

    path = write_config({"rl": "grpo", "datasets": [{"path": "x"}], "micro_batch_size": 3,
                         "trl": {"reward_funcs": ["obj_rewards.constant"], "num_generations": 4}})
    done = subprocess.run([sys.executable, "-m", "tuneforge.cli", "validate", str(path)], capture_output=True,
                          text=True, cwd=path.parent)
    assert done.returncode == 2, done.stderr
    assert "micro_batch_size: counts completions" in done.stderr and "Traceback" not in done.stderr
