"""Optimizers and parameter groups."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tuneforge.config import load
from tuneforge.engine.optim import build_optimizer, param_groups
from tuneforge.errors import TuneforgeError


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))


def _cfg(**keys):
    return load(data={"base_model": "x", **keys})


def test_no_weight_decay_on_norms_and_biases(model):
    model.model.layers[0].self_attn.q_proj.bias = torch.nn.Parameter(torch.zeros(64))  # give it a bias
    try:
        decay, no_decay = param_groups(model, 0.1)
        names = {id(p): n for n, p in model.named_parameters()}
        decayed = {names[id(p)] for p in decay["params"]}
        undecayed = {names[id(p)] for p in no_decay["params"]}
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
        assert "model.layers.0.self_attn.q_proj.bias" in undecayed
        assert all("norm" in n or n.endswith(".bias") for n in undecayed)
        assert all(model.get_parameter(n).ndim == 2 for n in decayed)
        assert "model.embed_tokens.weight" in decayed and "model.norm.weight" in undecayed
        assert len(decayed) + len(undecayed) == len(list(model.parameters()))
    finally:
        model.model.layers[0].self_attn.q_proj.bias = None


def test_frozen_parameters_are_left_out(model):
    for n, p in model.named_parameters():
        p.requires_grad = "lm_head" in n
    try:
        groups = param_groups(model, 0.0)
        assert [len(g["params"]) for g in groups] == [1]
    finally:
        for p in model.parameters():
            p.requires_grad = True


def test_optimizer_settings(model):
    opt = build_optimizer(_cfg(optimizer="adamw_torch_fused", learning_rate=3e-4, adam_beta1=0.8, adam_beta2=0.95,
                               adam_epsilon=1e-6, weight_decay=0.01), model)
    assert isinstance(opt, torch.optim.AdamW)
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (3e-4, (0.8, 0.95), 1e-6, 0.01)
    assert bool(g.get("fused")) == torch.cuda.is_available()  # the fused kernel only on CUDA
    sgd = build_optimizer(_cfg(optimizer="sgd", learning_rate=0.5, optim_args={"momentum": 0.9}), model)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    from transformers.optimization import Adafactor

    ada = build_optimizer(_cfg(optimizer="adafactor", learning_rate=1e-3), model)
    assert isinstance(ada, Adafactor) and ada.param_groups[0]["lr"] == 1e-3
    assert ada.param_groups[0]["relative_step"] is False


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_8bit_optimizer_without_bitsandbytes_is_clear(model):
    with pytest.raises(TuneforgeError, match="pip install bitsandbytes"):
        build_optimizer(_cfg(optimizer="paged_adamw_8bit"), model)


def _lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["norm"])
    return get_peft_model(base, config)  # LoRA on linear and embedding layers, a trainable 1-D norm copy


def test_loraplus_learning_rates_equal_peft(tiny_model_dir):
    """Each trainable parameter's learning rate under loraplus_lr_ratio equals PEFT's create_loraplus_optimizer:
    B matrices and 1-D parameters at lr x ratio, A matrices at lr, embedding adapters at loraplus_lr_embedding."""
    from peft.optimizers import create_loraplus_optimizer

    model = _lora_model(tiny_model_dir)
    cfg = _cfg(adapter="lora", lora_target_linear=True, learning_rate=2e-4, loraplus_lr_ratio=16,
               loraplus_lr_embedding=3e-6, optimizer="adamw_torch")
    ours = build_optimizer(cfg, model)
    theirs = create_loraplus_optimizer(model, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16,
                                       loraplus_lr_embedding=3e-6)

    def rates(optimizer):
        return {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}

    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[k]: v for k, v in rates(ours).items()} == {names[k]: v for k, v in rates(theirs).items()}
    assert set(rates(ours).values()) == {2e-4, 3.2e-3, 3e-6}  # all three kinds occur in this model
    assert ours.param_groups[0]["lr"] == 2e-4  # the logged rate is the base rate's group


def test_loraplus_rates_follow_the_schedule_together(tiny_model_dir):
    """The scheduler scales every group's rate by the same factor, so the ratio holds through warmup and decay."""
    from tuneforge.engine.schedule import build_scheduler

    model = _lora_model(tiny_model_dir)
    cfg = _cfg(adapter="lora", lora_target_linear=True, learning_rate=1e-3, loraplus_lr_ratio=8, warmup_steps=2)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, total_steps=10)
    bases = []
    for _ in range(4):
        optimizer.step()
        scheduler.step()
        base = scheduler.get_last_lr()[0]
        bases.append(base)
        ratios = sorted({g["lr"] / base for g in optimizer.param_groups})
        assert ratios == pytest.approx([1e-6 / 1e-3, 1.0, 8.0])  # embedding adapters, A matrices, B matrices
    assert bases[0] < bases[1] == 1e-3 > bases[3]  # warmup, peak, decay: the schedule did move


def test_loraplus_without_an_adapter_is_a_config_error():
    from tuneforge.config.errors import ConfigError

    with pytest.raises(ConfigError, match="loraplus_lr_ratio.*LoRA\\+ needs `adapter: lora`"):
        _cfg(loraplus_lr_ratio=16)


def _rates(model, optimizer) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}


def test_lr_groups_and_embedding_rates_per_parameter(model):
    cfg = _cfg(learning_rate=1e-4, embedding_lr_scale=0.5, optimizer="adamw_torch",
               lr_groups=[{"name": "attention out", "modules": ["self_attn.o_proj"], "lr": 3e-5},
                          {"name": "first block", "modules": ["layers.0."], "lr": 7e-5}])
    rates = _rates(model, build_optimizer(cfg, model))
    assert rates["model.layers.0.self_attn.o_proj.weight"] == 3e-5  # the first matching group wins
    assert rates["model.layers.1.self_attn.o_proj.weight"] == 3e-5
    assert rates["model.layers.0.mlp.down_proj.weight"] == 7e-5
    assert rates["model.layers.0.input_layernorm.weight"] == 1e-4  # matrices only, as in Axolotl
    assert rates["model.embed_tokens.weight"] == 0.5e-4
    assert rates["model.layers.1.mlp.down_proj.weight"] == rates["model.norm.weight"] == 1e-4
    assert len(rates) == sum(1 for p in model.parameters() if p.requires_grad)


def test_an_lr_group_that_matches_nothing_is_named():
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))
    cfg = _cfg(lr_groups=[{"name": "typo", "modules": ["self_atn.o_proj"], "lr": 1e-5}])
    with pytest.raises(TuneforgeError, match=r"lr_groups\[0\] \(typo\): `self_atn.o_proj` matches no trainable"):
        build_optimizer(cfg, tiny)


def test_embedding_lr_and_its_scale_are_exclusive():
    from tuneforge.config.errors import ConfigError

    with pytest.raises(ConfigError, match="embedding_lr_scale.*not both"):
        _cfg(embedding_lr=1e-5, embedding_lr_scale=0.1)
