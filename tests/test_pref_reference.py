"""The reference model: adapter-disabled network, frozen copy, precomputed log-probs, none for reference-free methods."""

from __future__ import annotations

import pytest
import torch

from test_pref_support import (
    make_cfg,
    objective_for,
    one_thread,  # noqa: F401
    pair_doc,
    random_examples,
    reverse_task,
    train_run,
    write_jsonl,
)


def _kto_rows(n: int = 16) -> list[dict]:
    return [{"prompt": r["prompt"], "completion": r["chosen"] if i % 2 else r["rejected"], "label": bool(i % 2)}
            for i, r in enumerate(reverse_task(n, seed=5))]


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_precomputed_reference_gives_the_same_first_step(method, tmp_path, tiny_model_dir, monkeypatch):
    import tuneforge.methods.reference as pref

    rows = _kto_rows() if method == "kto" else reverse_task(16, seed=5)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    keys = {"rl": method, "datasets": [{"path": str(data)}], "max_steps": 2, "learning_rate": 1e-2,
            "logging_steps": 1, "micro_batch_size": 4, "val_set_size": 4, "eval_steps": 2}
    loads = []
    real = pref.load_reference
    monkeypatch.setattr(pref, "load_reference", lambda *a, **k: loads.append(1) or real(*a, **k))

    live = train_run(make_cfg(tiny_model_dir, tmp_path / "live", **keys))
    assert len(loads) == 1  # the frozen copy, loaded on first use
    pre = train_run(make_cfg(tiny_model_dir, tmp_path / "pre", precompute_ref_log_probs=True, **keys))
    assert len(loads) == 2  # the precompute pass; training then holds no reference
    first = [r for r in live.history if r["type"] == "train"]
    second = [r for r in pre.history if r["type"] == "train"]
    assert abs(first[0]["loss"] - second[0]["loss"]) < 1e-6
    assert abs(first[1]["loss"] - second[1]["loss"]) < 1e-5  # after an update the reference must not have moved
    assert abs(live.eval_metrics["eval_loss"] - pre.eval_metrics["eval_loss"]) < 1e-5
    cached = list((tmp_path / "pre" / "prepared").rglob("ref_logps-*.npz"))
    assert {p.name.rsplit("-", 1)[1] for p in cached} == {"train.npz", "eval.npz"}

    again = train_run(make_cfg(tiny_model_dir, tmp_path / "pre", precompute_ref_log_probs=True, **keys))
    assert len(loads) == 2  # cached with the prepared data: no reference pass at all
    assert abs(again.history[0]["loss"] - second[0]["loss"]) < 1e-7


def test_adapter_disabled_logps_equal_the_base_model(tiny_model_dir, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.methods.pairs import collate_pairs, sequence_logps
    from tuneforge.methods.reference import Reference

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft.train()
    batch = collate_pairs([[pair_doc(e)] for e in random_examples(4, seed=3)], 0, packed=False)
    reference = Reference(make_cfg(tiny_model_dir, adapter="lora", lora_target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        plain = sequence_logps(base, batch).logps
        with_adapter = sequence_logps(peft, batch).logps
    with reference.network(peft) as net:
        assert net is peft  # the same network: no second model in memory
        disabled = sequence_logps(net, batch).logps
    assert reference.copy is None
    assert torch.allclose(disabled, plain, atol=1e-5)
    assert (with_adapter - plain).abs().max() > 1e-2  # the adapter is live outside the context
    assert peft.training  # the reference pass ran in eval mode and restored the mode


def test_reference_does_not_move_when_the_policy_trains(tiny_model_dir, tiny_tokenizer):
    from tuneforge.methods.pairs import collate_pairs, sequence_logps

    for keys in ({}, {"adapter": "lora", "lora_target_linear": True}):
        cfg = make_cfg(tiny_model_dir, rl="dpo", **keys)
        obj = objective_for(cfg, tiny_tokenizer)
        from tuneforge.models.adapters import apply_adapter
        from tuneforge.models.load import load_model

        torch.manual_seed(0)
        model = apply_adapter(cfg, load_model(cfg, tiny_tokenizer)).train()
        batch = collate_pairs([[pair_doc(e)] for e in random_examples(4, seed=4)], 0, packed=False)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        before_ref = obj.reference_logps(model, batch)
        before_policy = sequence_logps(model, batch).logps.detach()
        for _ in range(2):
            loss, _ = obj.loss(model, batch, 4)
            loss.backward()
            opt.step()
            opt.zero_grad()
        after_ref = obj.reference_logps(model, batch)
        after_policy = sequence_logps(model, batch).logps.detach()
        assert (after_policy - before_policy).abs().max() > 1e-3, keys  # the policy moved ...
        for a, b in zip(before_ref, after_ref, strict=True):
            assert torch.equal(a, b), keys  # ... the reference did not
        assert (obj.reference.copy is None) == bool(keys)  # a copy only for full fine-tuning


def test_frozen_copy_is_the_policy_init_even_with_reinit_weights(tiny_model_dir, tiny_tokenizer):
    from accelerate.utils import set_seed

    from tuneforge.methods.reference import load_reference
    from tuneforge.models.load import load_model

    for keys in ({}, {"reinit_weights": True}):
        cfg = make_cfg(tiny_model_dir, rl="dpo", **keys)
        set_seed(cfg.seed)  # as engine.run does before loading the policy
        policy = load_model(cfg, tiny_tokenizer)
        torch.manual_seed(123)  # whatever the RNG state is when the reference is loaded
        ref = load_reference(cfg, tiny_tokenizer)
        after = torch.rand(1)
        torch.manual_seed(123)
        assert torch.equal(after, torch.rand(1))  # loading the reference does not consume training randomness
        assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
        for (name, a), (_, b) in zip(policy.named_parameters(), ref.named_parameters(), strict=True):
            assert torch.equal(a, b), (keys, name)


@pytest.mark.parametrize("method", ["simpo", "orpo", "reward_model"])
def test_reference_free_methods_load_no_second_model(method, tmp_path, tiny_model_dir, monkeypatch):
    import tuneforge.methods.reference as pref

    def fail(*a, **k):
        raise AssertionError("a reference-free method loaded a reference model")

    monkeypatch.setattr(pref, "load_reference", fail)
    data = write_jsonl(tmp_path / "data.jsonl", reverse_task(8, seed=6))
    keys = {"rl": method} if method != "reward_model" else {"reward_model": True}
    cfg = make_cfg(tiny_model_dir, tmp_path / "run", datasets=[{"path": str(data)}], max_steps=1,
                   precompute_ref_log_probs=True, **keys)
    result = train_run(cfg)
    assert result.state.global_step == 1
