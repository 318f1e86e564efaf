"""ReLoRA: a restart keeps the model's function, moves the update into the base weights, prunes the adapter's
optimizer state at the ratio, restarts the learning rate on the jagged schedule, and resumes exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from test_engine_support import losses, make_config, make_rows, one_thread, train  # noqa: F401
from tuneforge.engine.relora import MIN_SCALE, jagged_multiplier, lora_layers, merge_and_reinit, prune_state

LORA = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True}


def _lora_model(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tuneforge.models.adapters import apply_adapter

    cfg = make_config(tmp_path, tiny_model_dir, **LORA)
    torch.manual_seed(0)
    model = apply_adapter(cfg, AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)))
    with torch.no_grad():  # a trained-looking adapter: B is zero at initialisation
        for layer in lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.05)
    return model


def test_restart_keeps_the_function_and_moves_the_update_into_the_base(tmp_path, tiny_model_dir):
    model = _lora_model(tmp_path, tiny_model_dir).eval()
    ids = torch.randint(10, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    layers = lora_layers(model)
    before = {id(lay): lay.get_base_layer().weight.detach().clone() for lay in layers}
    # B A x alpha / r, computed here from the factors (not by PEFT)
    deltas = {id(lay): lay.lora_B["default"].weight @ lay.lora_A["default"].weight * (8 / 4) for lay in layers}
    old_a = {id(lay): lay.lora_A["default"].weight.detach().clone() for lay in layers}
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert merge_and_reinit(model, torch.Generator().manual_seed(0)) == len(layers) == 14
        after = model(input_ids=ids).logits
    assert (after - logits).abs().max().item() <= 1e-5
    for lay in layers:
        moved = lay.get_base_layer().weight - before[id(lay)]
        assert (moved - deltas[id(lay)]).abs().max().item() <= 1e-6
        assert deltas[id(lay)].abs().max().item() > 1e-3  # the check above is not trivially true
        assert torch.count_nonzero(lay.lora_B["default"].weight) == 0
        assert not torch.equal(lay.lora_A["default"].weight, old_a[id(lay)])  # a fresh A


@pytest.mark.parametrize(("method", "ratio"), [("magnitude", 0.9), ("random", 0.5), ("reset", 0.999)])
def test_optimizer_state_is_pruned_at_the_ratio(method, ratio):
    params = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32, 64))]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    saved = {(i, k): v.clone() for i, p in enumerate(params) for k, v in optimizer.state[p].items() if k != "step"}
    zeroed, total = prune_state(optimizer, params, ratio, method, torch.Generator().manual_seed(0))
    assert total == 2 * 2 * 2048
    n = 2048
    tolerance = 1 if method == "magnitude" else 4 * (n * ratio * (1 - ratio)) ** 0.5 + 1
    for (i, key), old in saved.items():
        new = optimizer.state[params[i]][key]
        gone = new == 0
        assert abs(int(gone.sum()) - ratio * n) <= tolerance, (key, int(gone.sum()))
        assert torch.equal(new[~gone], old[~gone])  # the rest is untouched
        if method == "magnitude":  # the smallest values went
            assert old[gone].abs().max() <= old[~gone].abs().min()
    assert int(optimizer.state[params[0]]["step"]) == 1


def test_jagged_multiplier_closed_form():
    every, warmup, anneal = 10, 4, 3
    got = [jagged_multiplier(s, every, warmup, anneal) for s in range(22)]

    def scale(t):
        return t * (1 - MIN_SCALE) + MIN_SCALE

    # 1 until `every - anneal`; then per interval: warmup t/4 at 0..3, 1, decay (10 - p)/3 for p > 7
    want = [1.0] * 7 + [scale(1), scale(2 / 3), scale(1 / 3)]
    want += [scale(0), scale(0.25), scale(0.5), scale(0.75), scale(1), scale(1), scale(1), scale(1),
             scale(2 / 3), scale(1 / 3)]
    want += [scale(0), scale(0.25)]
    assert got == pytest.approx(want, abs=1e-12)


def test_resume_across_a_restart_is_exact_and_the_output_is_the_merged_model(tmp_path, tiny_model_dir):
    rows = make_rows(n=16, seed=2)
    keys = {**LORA, "relora": True, "jagged_restart_steps": 3, "jagged_restart_warmup_steps": 2,
            "relora_prune_method": "random", "max_steps": 8, "save_steps": 1, "lr_scheduler": "constant",
            "learning_rate": 5e-3}
    full = train(make_config(tmp_path / "full", tiny_model_dir, rows, **keys))
    lrs = {r["step"]: r["lr"] for r in full.history if r["type"] == "train"}
    # constant schedule x jagged: full rate for steps 1-3, then 0.1% at each restart, half-way, full
    want = {s: 5e-3 * jagged_multiplier(s - 1, 3, 2, 1) for s in range(1, 9)}
    assert lrs == pytest.approx(want, rel=1e-9)
    assert lrs[4] == pytest.approx(5e-3 * MIN_SCALE) and lrs[5] == pytest.approx(5e-3 * (0.5 + MIN_SCALE / 2))
    ckpt = tmp_path / "full" / "out" / "checkpoint-4"  # after the restart at 3, before the one at 6
    assert (ckpt / "relora_base.safetensors").exists()
    resumed = train(make_config(tmp_path / "resumed", tiny_model_dir, rows, **keys, resume_from_checkpoint=str(ckpt)))
    ref, got = losses(full), losses(resumed)
    assert sorted(got) == [5, 6, 7, 8]
    assert all(abs(got[s] - ref[s]) <= 1e-6 for s in got), (got, ref)
    a = load_file(str(tmp_path / "full" / "out" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "out" / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert not any("lora" in k for k in a) and a.keys() == base.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert (a["model.layers.0.self_attn.q_proj.weight"] - base["model.layers.0.self_attn.q_proj.weight"]).abs().max() > 0


def test_config_refusals_name_the_key(tmp_path, tiny_model_dir):
    from tuneforge.config.errors import ConfigError

    with pytest.raises(ConfigError, match="jagged_restart_steps"):
        make_config(tmp_path, tiny_model_dir, **LORA, relora=True)
    with pytest.raises(ConfigError, match="requantising"):
        make_config(tmp_path, tiny_model_dir, name="q.yaml", adapter="qlora", load_in_4bit=True, relora=True,
                    jagged_restart_steps=10)
    with pytest.raises(ConfigError, match="adamw_bnb_8bit keeps it quantized"):
        make_config(tmp_path, tiny_model_dir, name="o.yaml", **LORA, relora=True, jagged_restart_steps=10,
                    optimizer="adamw_bnb_8bit")
    old = make_config(tmp_path, tiny_model_dir, name="old.yaml", **LORA, relora_steps=7, relora_warmup_steps=2)
    assert old.relora_every() == 7 and old.jagged_restart_warmup_steps == 2


def test_axolotl_false_for_a_jagged_length_means_the_default(tmp_path, tiny_model_dir):
    cfg = make_config(tmp_path, tiny_model_dir, **LORA, relora=True, jagged_restart_steps=150,
                      jagged_restart_warmup_steps=10, jagged_restart_anneal_steps=False)
    assert cfg.jagged_restart_anneal_steps is None and cfg.relora_every() == 150
