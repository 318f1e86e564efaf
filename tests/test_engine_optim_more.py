"""The optimizers Axolotl configs name beyond AdamW: one step (or two) of each against its reference.

The reference is the package's own optimizer on the same tensors, or the closed form of the update. Optional
packages skip cleanly when absent (the dev extra installs the pure-Python ones: schedulefree, torch-optimi,
lion-pytorch); a missing package is one message naming `pip install ...`.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from tuneforge.config import load
from tuneforge.engine.optim import build_optimizer
from tuneforge.errors import TuneforgeError


def _cfg(**keys):
    return load(data={"base_model": "x", "learning_rate": 0.01, **keys})


class Net(torch.nn.Module):
    """An embedding, a hidden matrix, a norm scale and an output head: every kind of parameter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = torch.nn.Embedding(11, 8)
        self.proj = torch.nn.Linear(8, 8, bias=False)
        self.norm = torch.nn.LayerNorm(8, bias=False)
        self.lm_head = torch.nn.Linear(8, 11, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids):
        return self.lm_head(self.norm(torch.tanh(self.proj(self.embed_tokens(ids)))))


def _loss(net):
    ids = torch.tensor([[1, 4, 7, 2, 9]])
    return torch.nn.functional.cross_entropy(net(ids)[0, :-1], ids[0, 1:])


def _step(net, optimizer, steps: int = 1):
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        _loss(net).backward()
        optimizer.step()


def _pair(**keys):
    """(net trained by build_optimizer, an identical copy, the config)."""
    net, ref = Net(), Net()
    ref.load_state_dict(net.state_dict())
    return net, ref, _cfg(**keys)


def _same(a, b, atol=1e-7):
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=atol, rtol=0, msg=n)


def _moved(a, b) -> bool:
    return any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def _groups(net, wd):
    decay = [p for p in net.parameters() if p.ndim >= 2]
    return [{"params": decay, "weight_decay": wd}, {"params": [net.norm.weight], "weight_decay": 0.0}]


needs = {m: pytest.mark.skipif(importlib.util.find_spec(m) is None, reason=f"{m} is not installed")
         for m in ("schedulefree", "optimi", "lion_pytorch", "torchao")}


# ---------------------------------------------------------------------------------------------- closed forms
def test_ademamix_two_steps_match_the_papers_update():
    net, ref, cfg = _pair(optimizer="ademamix", weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.99,
                          optim_args={"beta3": 0.95, "alpha": 3.0})
    _step(net, build_optimizer(cfg, net), 2)
    lr, b1, b2, b3, alpha, eps, wd = 0.01, 0.8, 0.99, 0.95, 3.0, 1e-8, 0.1
    state = {}
    for t in (1, 2):
        ref.zero_grad(set_to_none=True)
        _loss(ref).backward()
        with torch.no_grad():
            for p in ref.parameters():
                m1, m2, nu = state.get(p, (0.0, 0.0, 0.0))
                g = p.grad
                m1, m2, nu = b1 * m1 + (1 - b1) * g, b3 * m2 + (1 - b3) * g, b2 * nu + (1 - b2) * g * g
                state[p] = (m1, m2, nu)
                decay = wd if p.ndim >= 2 else 0.0
                update = (m1 / (1 - b1**t) + alpha * m2) / ((nu / (1 - b2**t)).sqrt() + eps)
                p.copy_(p * (1 - lr * decay) - lr * update)
    _same(net, ref, atol=1e-6)


def test_ademamix_alpha_and_beta3_warmup_follow_the_paper():
    from tuneforge.engine.optimizers import AdEMAMix

    assert AdEMAMix._beta3(0, 0.9, 0.9999, 100) == pytest.approx(0.9)  # starts at beta1
    assert AdEMAMix._beta3(100, 0.9, 0.9999, 100) == 0.9999
    mid = AdEMAMix._beta3(50, 0.9, 0.9999, 100)
    # Half-way, the half-life 1/(1-beta) is the harmonic-in-log interpolation of the paper's formula.
    expected = math.exp(math.log(0.9) * math.log(0.9999) / (0.5 * math.log(0.9999) + 0.5 * math.log(0.9)))
    assert mid == pytest.approx(expected) and 0.9 < mid < 0.9999
    p = torch.nn.Parameter(torch.ones(1))
    opt = AdEMAMix([p], lr=1.0, betas=(0.0, 0.0, 0.0), alpha=4.0, t_alpha=4, eps=0.0)
    p.grad = torch.ones(1)
    opt.step()  # m1 = m2 = g, nu = g^2: update = 1 + alpha(1) * 1 with alpha(1) = 4 * 1/4
    assert p.item() == pytest.approx(1 - 2.0)


def test_muon_trains_hidden_matrices_and_adamw_the_rest():
    net, ref, cfg = _pair(optimizer="muon", weight_decay=0.1, optim_args={"momentum": 0.9})
    optimizer = build_optimizer(cfg, net)
    muon, adam = optimizer.parts
    assert isinstance(muon, torch.optim.Muon) and isinstance(adam, torch.optim.AdamW)
    assert [p for g in muon.param_groups for p in g["params"]] == [net.proj.weight]
    _step(net, optimizer)
    # Reference: torch's Muon on the hidden matrix, torch's AdamW on embeddings, head and norm.
    ref_muon = torch.optim.Muon([{"params": [ref.proj.weight], "weight_decay": 0.1}], lr=0.01, momentum=0.9)
    ref_adam = torch.optim.AdamW([{"params": [ref.embed_tokens.weight, ref.lm_head.weight], "weight_decay": 0.1},
                                  {"params": [ref.norm.weight], "weight_decay": 0.0}], lr=0.01)
    _loss(ref).backward()
    ref_muon.step()
    ref_adam.step()
    _same(net, ref)
    # The pair saves and restores both parts' state, and a scheduler scales both.
    saved = optimizer.state_dict()
    assert len(saved["parts"]) == 2 and len(optimizer.state) == 4
    optimizer.load_state_dict(saved)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5)
    assert {g["lr"] for g in optimizer.param_groups} == {0.005} and sched.get_last_lr()[0] == 0.005


def test_adafactor_variants_equal_transformers_adafactor():
    from transformers.optimization import Adafactor

    for optim_args in (None, {"scale_parameter": True}, {"relative_step": True, "warmup_init": True}):
        net, ref, cfg = _pair(optimizer="adafactor", optim_args=optim_args)
        _step(net, build_optimizer(cfg, net), 2)
        options = {"scale_parameter": False, "relative_step": False, "warmup_init": False, **(optim_args or {})}
        lr = None if options["relative_step"] else 0.01
        _step(ref, Adafactor(_groups(ref, 0.0), lr=lr, **options), 2)
        _same(net, ref)
        assert _moved(net, Net())
    with pytest.raises(TuneforgeError, match="warmup_init needs relative_step"):
        build_optimizer(_cfg(optimizer="adafactor", optim_args={"warmup_init": True}), Net())


@pytest.mark.parametrize("name,cls", [("rmsprop", torch.optim.RMSprop), ("adagrad", torch.optim.Adagrad)])
def test_torch_optimizers(name, cls):
    net, ref, cfg = _pair(optimizer=name, weight_decay=0.01)
    _step(net, build_optimizer(cfg, net), 2)
    _step(ref, cls(_groups(ref, 0.01), lr=0.01), 2)
    _same(net, ref)


# ------------------------------------------------------------------------------------ optional packages
@needs["optimi"]
def test_optimi_adamw_equals_torch_adamw_and_optimi_family():
    import optimi

    net, ref, cfg = _pair(optimizer="optimi_adamw", weight_decay=0.1, adam_beta2=0.99, adam_epsilon=1e-6)
    _step(net, build_optimizer(cfg, net), 2)
    _step(ref, torch.optim.AdamW(_groups(ref, 0.1), lr=0.01, betas=(0.9, 0.99), eps=1e-6), 2)
    _same(net, ref, atol=1e-6)  # optimi's AdamW is the same update as torch's
    for name, cls in (("optimi_lion", optimi.Lion), ("optimi_stableadamw", optimi.StableAdamW),
                      ("stable_adamw", optimi.StableAdamW), ("optimi_radam", optimi.RAdam)):
        net, ref, cfg = _pair(optimizer=name, weight_decay=0.1)
        _step(net, build_optimizer(cfg, net), 2)
        kw = {"betas": (0.9, 0.999)} | ({} if name == "optimi_lion" else {"eps": 1e-8})
        _step(ref, cls(_groups(ref, 0.1), lr=0.01, **kw), 2)
        _same(net, ref)
        assert _moved(net, Net())
    net, ref, cfg = _pair(optimizer="optimi_adan", weight_decay=0.02)
    _step(net, build_optimizer(cfg, net), 2)
    _step(ref, optimi.Adan(_groups(ref, 0.02), lr=0.01, eps=1e-8), 2)
    _same(net, ref)


@needs["lion_pytorch"]
def test_lion_equals_the_sign_update():
    net, ref, cfg = _pair(optimizer="lion", weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.99)
    _step(net, build_optimizer(cfg, net))
    _loss(ref).backward()
    with torch.no_grad():
        for p in ref.parameters():
            wd = 0.1 if p.ndim >= 2 else 0.0
            # Lion (Chen et al., 2023), first step from m = 0: p <- p(1 - lr wd) - lr sign((1 - b1) g)
            p.copy_(p * (1 - 0.01 * wd) - 0.01 * torch.sign(p.grad))
    _same(net, ref)


@needs["schedulefree"]
def test_schedule_free_adamw_weights_are_x_outside_training_steps():
    import schedulefree

    net, ref, cfg = _pair(optimizer="schedule_free_adamw", weight_decay=0.01)
    optimizer = build_optimizer(cfg, net)
    net.train()
    _step(net, optimizer, 3)
    ref_opt = schedulefree.AdamWScheduleFree(_groups(ref, 0.01), lr=0.01)
    ref_opt.train()
    _step(ref, ref_opt, 3)
    ref_opt.eval()  # the evaluation point x
    _same(net, ref)  # after a step the model holds x, as for saving or evaluating
    net.eval()
    net(torch.tensor([[1]]))  # an evaluation pass keeps x
    _same(net, ref)
    net.train()
    net(torch.tensor([[1]]))  # a training pass switches to y
    ref_opt.train()
    _same(net, ref)


@needs["schedulefree"]
def test_schedule_free_keeps_only_the_warmup_of_the_schedule():
    from tuneforge.engine.schedule import build_scheduler

    net = Net()
    cfg = _cfg(optimizer="schedule_free_sgd", lr_scheduler="cosine", warmup_steps=2)
    optimizer = build_optimizer(cfg, net)
    sched = build_scheduler(cfg, optimizer, 10)
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        _step(net, optimizer)
        sched.step()
    assert lrs == pytest.approx([0.0, 0.005, 0.01, 0.01, 0.01])


@needs["torchao"]
@pytest.mark.parametrize("name,cls_name", [("adamw_torch_8bit", "AdamW8bit"), ("adamw_torch_4bit", "AdamW4bit"),
                                           ("ao_adamw_fp8", "AdamWFp8")])
def test_torchao_low_bit_adamw_equals_torchao(name, cls_name):
    import torchao.optim

    torch.manual_seed(0)
    # torchao quantizes only tensors of at least 4096 elements (blocks of 256 / 128).
    net = torch.nn.Sequential(torch.nn.Linear(128, 128, bias=False))
    ref = torch.nn.Sequential(torch.nn.Linear(128, 128, bias=False))
    ref.load_state_dict(net.state_dict())
    x = torch.randn(4, 128)
    opt = build_optimizer(_cfg(optimizer=name, weight_decay=0.01), net)
    ref_opt = getattr(torchao.optim, cls_name)([{"params": list(ref.parameters()), "weight_decay": 0.01}], lr=0.01)
    for model, o in ((net, opt), (ref, ref_opt)):
        model(x).square().mean().backward()
        o.step()
    assert type(opt).__name__ == cls_name
    assert torch.equal(net[0].weight, ref[0].weight)


@pytest.mark.parametrize("name,package,pip", [
    ("schedule_free_adamw", "schedulefree", "schedulefree"), ("optimi_adamw", "optimi", "torch-optimi"),
    ("lion", "lion_pytorch", "lion-pytorch"), ("adamw_torch_8bit", "torchao", "torchao"),
    ("ademamix_8bit", "bitsandbytes", "bitsandbytes"),
])
def test_a_missing_package_is_one_clear_message(monkeypatch, name, package, pip):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == package else real(n, *a))
    with pytest.raises(TuneforgeError, match=rf"optimizer: {name} needs the {package} package \(pip install {pip}\)"):
        build_optimizer(_cfg(optimizer=name), Net())


# ------------------------------------------------------------------------------ through the training loop
@pytest.mark.parametrize("name", ["muon", pytest.param("schedule_free_adamw", marks=needs["schedulefree"])])
def test_training_with_the_optimizer_resumes_exactly(tmp_path, tiny_model_dir, name):
    """The trainer's accelerate wrapping, checkpoint save and weights-only load all work with the pair
    (muon) and the schedule-free bridge, and a resumed run repeats the uninterrupted run's losses."""
    from test_engine_resume import _exact

    full, _ = _exact(tmp_path, tiny_model_dir, optimizer=name)
    assert full.state.global_step >= 4
