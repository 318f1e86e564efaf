"""Learning-rate schedules: closed-form values and parity with transformers' schedulers."""

from __future__ import annotations

import math

import pytest
import torch

from tuneforge.config import load
from tuneforge.engine.schedule import build_scheduler, multiplier_fn, warmup_steps
from tuneforge.errors import TuneforgeError


def _cfg(tmp_path, **keys):
    return load(data={"base_model": "x", "learning_rate": 0.1, **keys})


def _lrs(cfg, total):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    sched = build_scheduler(cfg, opt, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("name", ["cosine", "linear", "constant_with_warmup"])
def test_matches_transformers(tmp_path, name):
    from transformers import get_scheduler

    total, warm = 23, 4
    cfg = _cfg(tmp_path, lr_scheduler=name, warmup_steps=warm)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ref = get_scheduler(name, opt, num_warmup_steps=warm, num_training_steps=total)
    expected = []
    for _ in range(total):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert _lrs(cfg, total) == pytest.approx(expected, abs=1e-12)


def test_cosine_with_min_lr_matches_transformers(tmp_path):
    from transformers import get_scheduler

    cfg = _cfg(tmp_path, lr_scheduler="cosine_with_min_lr", cosine_min_lr_ratio=0.1, warmup_steps=3)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ref = get_scheduler("cosine_with_min_lr", opt, num_warmup_steps=3, num_training_steps=20,
                        scheduler_specific_kwargs={"min_lr_rate": 0.1})
    expected = []
    for _ in range(20):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert _lrs(cfg, 20) == pytest.approx(expected, abs=1e-12)


def test_closed_form_values(tmp_path):
    f = multiplier_fn(_cfg(tmp_path, lr_scheduler="cosine", warmup_steps=2), 12)
    assert [f(0), f(1), f(2)] == [0.0, 0.5, 1.0]
    assert f(7) == pytest.approx(0.5)  # half-way through the decay: cos(pi/2)
    assert f(12) == pytest.approx(0.0)
    g = multiplier_fn(_cfg(tmp_path, lr_scheduler="cosine", cosine_min_lr_ratio=0.2), 10)
    assert g(10) == pytest.approx(0.2) and g(5) == pytest.approx(0.2 + 0.8 * 0.5)
    h = multiplier_fn(_cfg(tmp_path, lr_scheduler="linear", warmup_ratio=0.25), 8)
    assert [h(0), h(1), h(2), h(5), h(8)] == pytest.approx([0, 0.5, 1.0, 0.5, 0.0])
    assert multiplier_fn(_cfg(tmp_path, lr_scheduler="constant"), 5)(3) == 1.0


def test_warmup_ratio_rounds_up(tmp_path):
    assert warmup_steps(_cfg(tmp_path, warmup_ratio=0.1), 25) == math.ceil(2.5)


def test_bad_scheduler_options_are_clear(tmp_path):
    with pytest.raises(TuneforgeError, match="cosine_min_lr_ratio"):
        multiplier_fn(_cfg(tmp_path, lr_scheduler="cosine_with_min_lr"), 10)
    with pytest.raises(TuneforgeError, match="unknown option"):
        multiplier_fn(_cfg(tmp_path, lr_scheduler_kwargs={"power": 2}), 10)


def _reference(name, total, warm, **kwargs):
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ref = get_scheduler(name, opt, num_warmup_steps=warm, num_training_steps=total,
                        scheduler_specific_kwargs=kwargs or None)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    return out


@pytest.mark.parametrize("name,ours,theirs", [
    ("cosine_with_restarts", {"num_cycles": 3}, {"num_cycles": 3}),
    ("polynomial", {"power": 2.0, "lr_end": 0.01}, {"power": 2.0, "lr_end": 0.01}),
    ("inverse_sqrt", {}, {}),
    ("inverse_sqrt", {"timescale": 7}, {"timescale": 7}),
    ("warmup_stable_decay", {"num_decay_steps": 6}, {"num_decay_steps": 6}),
    ("warmup_stable_decay", {"num_decay_steps": 5, "num_stable_steps": 9, "decay_type": "1-sqrt",
                             "warmup_type": "cosine", "min_lr_ratio": 0.1},
     {"num_decay_steps": 5, "num_stable_steps": 9, "decay_type": "1-sqrt", "warmup_type": "cosine",
      "min_lr_ratio": 0.1}),
])
def test_more_schedules_match_transformers(tmp_path, name, ours, theirs):
    cfg = _cfg(tmp_path, lr_scheduler=name, warmup_steps=4, lr_scheduler_kwargs=ours or None)
    assert _lrs(cfg, 23) == pytest.approx(_reference(name, 23, 4, **theirs), abs=1e-12)


def test_warmup_stable_decay_defaults_to_a_last_tenth_decay(tmp_path):
    f = multiplier_fn(_cfg(tmp_path, lr_scheduler="warmup_stable_decay", warmup_steps=2), 22)
    # 20 steps after warmup: decay over the last 2 (cosine), stable in between.
    assert [f(1), f(2), f(19), f(20), f(21), f(22)] == pytest.approx([0.5, 1.0, 1.0, 1.0, 0.5, 0.0])
    with pytest.raises(TuneforgeError, match="decay_type: `cos` is not one of linear, cosine, 1-sqrt"):
        multiplier_fn(_cfg(tmp_path, lr_scheduler="warmup_stable_decay", lr_scheduler_kwargs={"decay_type": "cos"}), 9)


def test_rex_closed_form(tmp_path):
    """REX: with z the share of the decay ahead, min + (1 - min) z / (0.1 + 0.9 z), after a linear warmup."""
    f = multiplier_fn(_cfg(tmp_path, lr_scheduler="rex", warmup_steps=2), 12)
    assert [f(0), f(1), f(2)] == [0.0, 0.5, 1.0]
    assert f(7) == pytest.approx(0.5 / (0.1 + 0.45))  # half-way: 0.909..., well above linear's 0.5
    assert f(11) == pytest.approx(0.1 / (0.1 + 0.09)) and f(12) == 0.0
    g = multiplier_fn(_cfg(tmp_path, lr_scheduler="rex", cosine_min_lr_ratio=0.2), 10)
    assert g(0) == 1.0 and g(10) == pytest.approx(0.2) and g(5) == pytest.approx(0.2 + 0.8 * 0.5 / 0.55)
    h = multiplier_fn(_cfg(tmp_path, lr_scheduler="rex", lr_scheduler_kwargs={"min_lr": 0.01}), 10)
    assert h(10) == pytest.approx(0.1)  # min_lr 0.01 of learning_rate 0.1
    vals = [f(s) for s in range(2, 13)]
    assert vals == sorted(vals, reverse=True)  # decreasing after warmup


def test_options_of_another_schedule_are_named(tmp_path):
    with pytest.raises(TuneforgeError, match=r"unknown option\(s\) \['num_decay_steps'\] for `rex` "
                                             r"\(known: min_lr, min_lr_rate\)"):
        multiplier_fn(_cfg(tmp_path, lr_scheduler="rex", lr_scheduler_kwargs={"num_decay_steps": 3}), 10)


def test_cosine_constant_lr_ratio_closed_form(tmp_path):
    """Warmup 4, 20 steps, ratio 0.5: cosine from 1 at step 4 to the 0.1 floor at step int(0.5 * 20) = 10, then flat."""
    cfg = _cfg(tmp_path, lr_scheduler="cosine", warmup_steps=4, cosine_min_lr_ratio=0.1, cosine_constant_lr_ratio=0.5)
    f = multiplier_fn(cfg, 20)
    assert [f(0), f(1), f(3)] == [0.0, 0.25, 0.75]  # linear warmup
    assert f(4) == 1.0
    assert f(7) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))  # 0.55: half-way
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
    assert [f(s) for s in (10, 15, 19)] == pytest.approx([0.1, 0.1, 0.1])
    lrs = _lrs(cfg, 20)  # the optimizer sees exactly these rates, step by step
    assert lrs == pytest.approx([0.1 * f(s) for s in range(20)])
    assert lrs[12] == pytest.approx(0.01)


def test_cosine_constant_lr_ratio_edges(tmp_path):
    """0 means no constant phase (plain cosine to the floor at the end); a floor step inside the warmup means
    the floor right after warmup; without cosine_min_lr_ratio the floor is 0; other schedules refuse it."""
    keys = {"lr_scheduler": "cosine", "warmup_steps": 2, "cosine_min_lr_ratio": 0.2}
    plain = multiplier_fn(_cfg(tmp_path, **keys), 10)
    zero = multiplier_fn(_cfg(tmp_path, **keys, cosine_constant_lr_ratio=0), 10)
    assert [zero(s) for s in range(11)] == [plain(s) for s in range(11)]
    early = multiplier_fn(_cfg(tmp_path, **keys, cosine_constant_lr_ratio=0.1), 10)  # floor at step 1 < warmup
    assert [early(1), early(2), early(9)] == [0.5, 0.2, 0.2]
    no_floor = multiplier_fn(_cfg(tmp_path, lr_scheduler="cosine", cosine_constant_lr_ratio=0.5), 10)
    assert [no_floor(0), no_floor(5), no_floor(8)] == pytest.approx([1.0, 0.0, 0.0])
    assert no_floor(2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 5)))
    from tuneforge.config.errors import ConfigError
    with pytest.raises(ConfigError, match="cosine_constant_lr_ratio: shapes the cosine schedule; lr_scheduler is linear"):
        _cfg(tmp_path, lr_scheduler="linear", cosine_constant_lr_ratio=0.5)
