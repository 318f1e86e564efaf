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
