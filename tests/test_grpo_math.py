"""GRPO arithmetic against closed-form values (the formulas of docs/grpo.md) and against TRL 1.16's own code.

TRL's per-token objective lives in `GRPOTrainer._compute_loss`; it is run here unchanged on a stand-in
trainer whose log-prob function returns the tensors under test, so both implementations see the same
inputs. TRL's advantage and IS code is inlined in `_generate_and_score_completions` and cannot be
called alone; there `trl.trainer.utils.nanstd` (the std TRL uses) is compared instead, plus the
formulas written out.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tuneforge.methods.grpo import loss as gl


@pytest.fixture(autouse=True)
def _float64():
    """This file's arithmetic runs in float64; restore the default so other test files are unaffected."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _adv(rewards, G, **kw):
    per_func = torch.tensor(rewards, dtype=torch.float64).reshape(-1, 1)
    return gl.group_advantages(per_func, torch.ones(1, dtype=torch.float64), G, **kw)


# ---------------------------------------------------------------- 4. advantages
def test_group_advantages_closed_form():
    a = _adv([1, 0, 0, 0], 4).advantages
    assert torch.allclose(a, torch.tensor([1.4997001, -0.4999000, -0.4999000, -0.4999000]), atol=1e-7)
    assert torch.allclose(_adv([1, 0, 0, 0], 4, scale_rewards="none").advantages,
                          torch.tensor([0.75, -0.25, -0.25, -0.25]), atol=1e-12)
    assert torch.allclose(_adv([1, 0], 2).advantages, torch.tensor([0.7070068, -0.7070068]), atol=1e-7)
    rnd = _adv(torch.rand(24).tolist(), 6).advantages.view(4, 6)
    assert torch.allclose(rnd.sum(1), torch.zeros(4), atol=1e-6)


def test_batch_scaling_uses_group_mean_and_batch_std():
    r = torch.tensor([1.0, 0, 0, 0, 3, 1, 2, 2])
    a = _adv(r.tolist(), 4, scale_rewards="batch").advantages
    mean = r.view(2, 4).mean(1).repeat_interleave(4)
    assert torch.allclose(a, (r - mean) / (r.std() + 1e-4))


def test_nanstd_equals_trl():
    from trl.trainer.utils import nanstd as trl_nanstd

    x = torch.tensor([[1.0, math.nan, 3.0, 4.0], [2.0, 2.0, math.nan, math.nan], [math.nan, 5, math.nan, math.nan]])
    assert torch.allclose(gl.nanstd(x, dim=1), trl_nanstd(x, dim=1), equal_nan=True)
    assert torch.allclose(gl.nanstd(x), trl_nanstd(x), equal_nan=True)


# ---------------------------------------------------------------- 5. zero signal and None rewards
def test_equal_rewards_give_exactly_zero_advantages_and_gradient():
    adv = _adv([0.5] * 8, 4)
    assert torch.equal(adv.advantages, torch.zeros(8)) and bool(adv.std_is_zero.all())
    logps = torch.randn(8, 5, requires_grad=True)
    mask = torch.ones(8, 5)
    terms = gl.token_loss(logps, None, adv.advantages, mask)
    gl.loss_sum(terms.loss, mask, "dapo", 5).backward()
    assert torch.equal(logps.grad, torch.zeros_like(logps))


def test_none_reward_leaves_the_group_statistics():
    a = _adv([1.0, math.nan, 0.0, 0.0], 4).advantages
    rest = torch.tensor([1.0, 0.0, 0.0])
    expect = (rest - rest.mean()) / (rest.std() + 1e-4)
    assert a[1] == 0.0
    assert torch.allclose(a[[0, 2, 3]], expect)


def test_none_from_one_of_several_functions_counts_as_zero():
    per_func = torch.tensor([[1.0, math.nan], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    adv = gl.group_advantages(per_func, torch.tensor([1.0, 0.5]), 4)
    assert torch.allclose(adv.rewards, torch.tensor([1.0, 0.5, 1.5, 0.0]))


# ---------------------------------------------------------------- 6. combination of several rewards
def test_sum_then_normalize_and_normalize_then_sum_by_hand():
    r1 = torch.tensor([1.0, 0, 0, 1, 0.2, 0.4, 0.9, 0.1])
    r2 = torch.tensor([0.0, 1, 1, 0, 3.0, 1.0, 2.0, 2.0])
    w = torch.tensor([1.0, 0.5])
    per_func = torch.stack([r1, r2], 1)
    s = gl.group_advantages(per_func, w, 4)
    R = (r1 + 0.5 * r2).view(2, 4)
    expect = ((R - R.mean(1, keepdim=True)) / (R.std(1, keepdim=True) + 1e-4)).reshape(-1)
    assert torch.allclose(s.advantages, expect, atol=1e-6)

    g = gl.group_advantages(per_func, w, 4, aggregation="normalize_then_sum")
    z = [(r.view(2, 4) - r.view(2, 4).mean(1, keepdim=True)) / (r.view(2, 4).std(1, keepdim=True) + 1e-4) for r in (r1, r2)]
    R2 = (z[0] + 0.5 * z[1]).reshape(-1)
    assert torch.allclose(g.advantages, (R2 - R2.mean()) / (R2.std() + 1e-4), atol=1e-6)


def test_reward_combination_equals_trl_calculate_rewards_path():
    """TRL's `_calculate_rewards` on a stand-in trainer gives the same [N, K] matrix we combine."""
    from trl import GRPOTrainer

    def f1(completions, **kw):
        return [float(len(c)) for c in completions]

    def f2(completions, answer, **kw):
        return [1.0 if c == a else None for c, a in zip(completions, answer, strict=True)]

    fake = SimpleNamespace(accelerator=SimpleNamespace(device="cpu", is_main_process=True), reward_funcs=[f1, f2],
                           reward_processing_classes=[None, None], reward_func_names=["f1", "f2"], state=None,
                           _log_completion_extra=None, _log_metric=None, environments=None)
    fake.__dict__["_profiling"] = None
    comps = ["ab", "b", "ab", "abc"]
    inputs = [{"prompt": "p", "answer": "ab"}] * 4
    import trl.trainer.grpo_trainer as tg

    old_ctx = tg.profiling_context
    tg.profiling_context = lambda *a, **k: __import__("contextlib").nullcontext()
    try:
        trl_matrix = GRPOTrainer._calculate_rewards(fake, inputs, ["p"] * 4, comps, [[1]] * 4)
    finally:
        tg.profiling_context = old_ctx
    from tuneforge.methods.rewards import RewardSet

    ours = RewardSet([("f1", f1), ("f2", f2)], [1.0, 0.5]).compute(["p"] * 4, comps, [[1]] * 4, {"answer": ["ab"] * 4})
    assert torch.allclose(ours, trl_matrix.to(torch.float64), equal_nan=True)


# ---------------------------------------------------------------- 7. on-policy ratio, REINFORCE
def test_on_policy_ratio_is_one_and_grpo_is_reinforce():
    torch.manual_seed(0)
    G, C = 4, 6
    logps = (-torch.rand(G, C) * 3).requires_grad_()
    mask = torch.ones(G, C)
    mask[1, 4:] = 0
    adv = _adv([1, 0, 0, 0], G).advantages
    terms = gl.token_loss(logps, None, adv, mask)
    assert torch.equal(terms.ratio, torch.ones_like(terms.ratio))
    loss = gl.loss_sum(terms.loss, mask, "grpo", C) / G
    assert abs(loss.item() + adv.mean().item()) < 1e-12 and abs(loss.item()) < 1e-6
    loss.backward()
    ref = logps.detach().clone().requires_grad_()
    reinforce = -(adv * ((ref * mask).sum(1) / mask.sum(1))).mean()
    reinforce.backward()
    assert torch.allclose(logps.grad, ref.grad, atol=1e-8)


# ---------------------------------------------------------------- 8. aggregation formulas
@pytest.mark.parametrize("loss_type,expect", [
    ("grpo", lambda a, b: (a + b) / 2), ("bnpo", lambda a, b: (a + 3 * b) / 4),
    ("dr_grpo", lambda a, b: (a + 3 * b) / 6), ("dapo", lambda a, b: (a + 3 * b) / 4),
])
def test_aggregation_closed_forms(loss_type, expect):
    a, b = 0.7, -1.3
    L = torch.tensor([[a, 0, 0], [b, b, b]])
    M = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    total = gl.loss_sum(L, M, loss_type, 3) / gl.loss_items(loss_type, M)
    assert abs(total.item() - expect(a, b)) < 1e-12


def test_two_micro_batches_dapo_global_count_bnpo_local_counts():
    L1, M1 = torch.tensor([[1.0, 2, 0]]), torch.tensor([[1.0, 1, 0]])
    L2, M2 = torch.tensor([[4.0, 4, 4]]), torch.tensor([[1.0, 1, 1]])
    n = gl.loss_items("dapo", M1) + gl.loss_items("dapo", M2)
    dapo = (gl.loss_sum(L1, M1, "dapo", 3) + gl.loss_sum(L2, M2, "dapo", 3)) / n
    assert dapo.item() == pytest.approx((1 + 2 + 12) / 5)
    n = gl.loss_items("bnpo", M1) + gl.loss_items("bnpo", M2)
    bnpo = (gl.loss_sum(L1, M1, "bnpo", 3) + gl.loss_sum(L2, M2, "bnpo", 3)) / n
    assert bnpo.item() == pytest.approx((1.5 + 4) / 2)  # each micro-batch by its own count, then / GA


# ---------------------------------------------------------------- 9. KL
def test_k3_values():
    assert gl.k3(torch.tensor(0.5), torch.tensor(0.0)).item() == pytest.approx(0.1487213, abs=1e-7)
    assert gl.k3(torch.tensor(-0.5), torch.tensor(0.0)).item() == pytest.approx(0.1065307, abs=1e-7)
    x = torch.randn(100)
    assert torch.equal(gl.k3(x, x), torch.zeros(100))
    assert bool((gl.k3(torch.randn(1000), torch.randn(1000)) >= 0).all())


def test_kl_term_is_beta_k3_aggregated_like_the_surrogate():
    logps, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-0.5, -2.5]])
    mask = torch.ones(1, 2)
    with_kl = gl.token_loss(logps, None, torch.zeros(1), mask, beta=0.04, ref_logps=ref)
    assert torch.allclose(with_kl.loss, 0.04 * gl.k3(ref, logps))


# ---------------------------------------------------------------- 10. clipping
@pytest.mark.parametrize("adv,rho,eps_high,loss,grad", [
    (1.0, 1.5, 0.2, -1.2, 0.0), (-1.0, 0.5, 0.2, 0.8, 0.0), (1.0, 1.1, 0.2, -1.1, -1.1), (1.0, 1.25, 0.28, -1.25, -1.25),
])
def test_clipping(adv, rho, eps_high, loss, grad):
    old = torch.tensor([[-1.0]])
    logp = (old + math.log(rho)).requires_grad_()
    terms = gl.token_loss(logp, old, torch.tensor([adv]), torch.ones(1, 1), epsilon_low=0.2, epsilon_high=eps_high)
    terms.loss.sum().backward()
    assert terms.loss.item() == pytest.approx(loss, abs=1e-12)
    assert logp.grad.item() == pytest.approx(grad, abs=1e-12)


def test_delta_caps_the_unclipped_ratio():
    old = torch.tensor([[0.0]])
    terms = gl.token_loss(old + math.log(3.0), old, torch.tensor([-1.0]), torch.ones(1, 1), delta=2.0)
    assert terms.loss.item() == pytest.approx(2.0)  # -min(2 * -1, 1.2 * -1)


# ---------------------------------------------------------------- 11. importance-sampling weights
def test_is_weights_token_truncate_and_mask():
    old = torch.zeros(1, 3)
    samp = -torch.tensor([[math.log(2), math.log(5), math.log(0.1)]])
    m = torch.ones(1, 3)
    w = gl.importance_weights(old, samp, m, "token_truncate", cap=3.0)
    assert torch.allclose(w, torch.tensor([[2.0, 3.0, 0.1]]))  # TRL: no floor by default
    w = gl.importance_weights(old, samp, m, "token_truncate", cap=3.0, floor=1 / 3)
    assert torch.allclose(w, torch.tensor([[2.0, 3.0, 1 / 3]]))  # Axolotl's symmetric floor
    w = gl.importance_weights(old, samp, m, "token_mask", cap=3.0, floor=1 / 3)
    assert torch.allclose(w, torch.tensor([[2.0, 0.0, 0.0]]))  # masked tokens weigh 0


def test_is_weights_sequence_mask_and_identity():
    old = torch.full((2, 4), 0.5)
    samp = torch.zeros(2, 4)
    m = torch.ones(2, 4)
    m[1, 1:] = 0  # second sequence: one token, d = 0.5, e^0.5 < 3
    w = gl.importance_weights(old, samp, m, "sequence_mask", cap=3.0)
    assert w.shape == (2, 1) and w[0, 0] == 0.0 and w[1, 0].item() == pytest.approx(math.exp(0.5))
    x = torch.randn(3, 5)
    assert torch.equal(gl.importance_weights(x, x, torch.ones(3, 5), "token_truncate"), torch.ones(3, 5))


def test_identity_weights_leave_the_loss_bitwise_unchanged():
    torch.manual_seed(1)
    logps, old = torch.randn(4, 5), torch.randn(4, 5)
    adv, mask = torch.randn(4), torch.ones(4, 5)
    w = gl.importance_weights(old, old, mask, "token_truncate")
    a = gl.token_loss(logps, old, adv, mask).loss
    b = gl.token_loss(logps, old, adv, mask, is_weights=w).loss
    assert torch.equal(a, b)


def test_off_policy_sequence_mask():
    logps = torch.zeros(2, 3)
    samp = torch.full((2, 3), 0.7)
    keep = gl.off_policy_keep(torch.tensor([-1.0, 1.0]), logps, samp, torch.ones(2, 3), 0.5)
    assert keep.tolist() == [False, True]


# ---------------------------------------------------------------- the whole objective vs TRL's _compute_loss
class _Acc:
    num_processes = 1
    device = "cpu"

    @staticmethod
    def gather(x):
        return x

    @staticmethod
    def reduce(x, reduction="sum"):
        return x

    gather_for_metrics = gather


def _trl_loss(loss_type, logps, inputs, *, beta=0.0, eps=0.2, eps_high=0.28, level="token", delta=None, ga=1,
              max_len=None, use_is=False, opsm=None):
    from trl import GRPOTrainer

    args = SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=ga)
    fake = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=opsm, importance_sampling_level=level, beta=beta,
        args=args, loss_type=loss_type, epsilon_low=eps, epsilon_high=eps_high, use_vllm=use_is,
        vllm_importance_sampling_correction=use_is, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=ga, max_completion_length=max_len or logps.shape[1],
        accelerator=_Acc(), _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask,
    )
    n, c = logps.shape
    base = {"prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
            "completion_ids": torch.zeros(n, c, dtype=torch.long)}
    return GRPOTrainer._compute_loss(fake, None, {**base, **inputs})


@pytest.mark.parametrize("loss_type", gl.LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradient_equal_trl(loss_type, level, beta):
    torch.manual_seed(3)
    n, c = 6, 7
    mask = (torch.rand(n, c) > 0.2).long()
    mask[:, 0] = 1
    old = -torch.rand(n, c) * 2
    cur = (old + torch.randn(n, c) * 0.3).requires_grad_()
    ref = old + torch.randn(n, c) * 0.2
    adv = torch.randn(n)
    samp = old + torch.randn(n, c) * 0.1
    w = gl.importance_weights(old, samp, mask, "token_truncate", cap=3.0)
    inputs = {"completion_mask": mask, "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "importance_sampling_ratio": w, "num_items_in_batch": mask.sum().float()}
    if level == "sequence" and loss_type in ("bnpo", "dr_grpo", "dapo"):
        pass  # TRL warns about this combination but computes it; compare anyway
    expected = _trl_loss(loss_type, cur, inputs, beta=beta, level=level, use_is=True, max_len=9)
    (g_trl,) = torch.autograd.grad(expected, cur)
    terms = gl.token_loss(cur, old, adv, mask, epsilon_low=0.2, epsilon_high=0.28, level=level, beta=beta,
                          ref_logps=ref, is_weights=w)
    ours = gl.loss_sum(terms.loss, mask, loss_type, 9) / gl.loss_items(loss_type, mask)
    (g_ours,) = torch.autograd.grad(ours, cur)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)
    assert torch.allclose(g_ours, g_trl, atol=1e-12)


def test_opsm_and_delta_equal_trl():
    torch.manual_seed(4)
    n, c = 6, 5
    mask = torch.ones(n, c, dtype=torch.long)
    old = -torch.rand(n, c)
    cur = (old + torch.randn(n, c) * 0.5).requires_grad_()
    samp = old + torch.randn(n, c)
    adv = torch.randn(n)
    inputs = {"completion_mask": mask, "advantages": adv, "old_per_token_logps": old,
              "sampling_per_token_logps": samp, "num_items_in_batch": mask.sum().float()}
    expected = _trl_loss("dapo", cur, inputs, opsm=0.3, delta=1.5)
    keep = gl.off_policy_keep(adv, cur, samp, mask, 0.3)
    terms = gl.token_loss(cur, old, adv, mask, epsilon_high=0.28, delta=1.5, keep=keep)
    ours = gl.loss_sum(terms.loss, mask, "dapo", c) / gl.loss_items("dapo", mask)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-10)


def test_batch_statistics_span_every_process():
    """scale_rewards: batch / GDPO: the batch mean and std cover all processes' rewards (as TRL gathers them).
    Two simulated ranks, each summing its own and the other's partial sums, get the statistics of the union."""
    from tuneforge.methods.grpo.loss import batch_mean_std, nanstd

    g = torch.Generator().manual_seed(0)
    ranks = [torch.randn(12, generator=g, dtype=torch.float64) * 3 + 1, torch.randn(20, generator=g, dtype=torch.float64)]
    ranks[1][4] = float("nan")  # an unscorable completion stays out
    union = torch.cat(ranks)
    expected = (torch.nanmean(union).item(), nanstd(union).item())
    assert batch_mean_std(union) == pytest.approx(expected, rel=1e-12)
    calls = {"n": 0}
    partials: list = []

    def two_ranks(t):  # what all_reduce(sum) returns: this rank's tensor plus the other rank's
        calls["n"] += 1
        return t + partials.pop(0)

    other = ranks[1][~torch.isnan(ranks[1])]
    partials[:] = [torch.stack([torch.tensor(float(other.numel()), dtype=torch.float64), other.sum()])]
    mean = expected[0]
    partials.append(((other - mean) ** 2).sum().reshape(1))
    got = batch_mean_std(ranks[0], two_ranks)
    assert calls["n"] == 2 and got == pytest.approx(expected, rel=1e-12)
    assert batch_mean_std(ranks[0]) != pytest.approx(expected, rel=1e-3)  # one rank alone differs
