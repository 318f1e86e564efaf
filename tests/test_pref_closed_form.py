"""Closed-form values of the preference losses (formulas: docs/preference.md), float32 within 1e-6.

At initialisation the policy equals the reference (full fine-tuning: the reference is the same
checkpoint loaded again), so every log-ratio h is 0: DPO gives ln 2 for every beta, IPO 1/(4 beta^2),
KTO 0.5 per example. Degenerate pairs (chosen == rejected) pin SimPO, ORPO and Bradley-Terry.
"""

from __future__ import annotations

import math

import pytest
import torch

from test_pref_support import make_cfg, objective_for, one_thread, pair_doc, perturbed, random_examples  # noqa: F401

LN2 = math.log(2)


def _loss(cfg, tokenizer, model, docs, rows=None):
    obj = objective_for(cfg, tokenizer)
    batch = obj.collate(rows or [[d] for d in docs], tokenizer.pad_token_id, training=True)
    loss, sums = obj.loss(model, batch, obj.num_items(batch))
    return loss, obj.summarize(sums, obj.num_items(batch))


@pytest.fixture
def base_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).train()


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_at_init_is_ln2_with_zero_rewards(beta, tiny_model_dir, tiny_tokenizer, base_model):
    docs = [pair_doc(e) for e in random_examples(4, seed=1)]
    loss, logged = _loss(make_cfg(tiny_model_dir, rl="dpo", rl_beta=beta), tiny_tokenizer, base_model, docs)
    assert abs(loss.item() - LN2) < 1e-6
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(logged[key]) < 1e-6, (key, logged[key])
    assert logged["rewards/accuracies"] == 0.0  # ties are not wins


def test_dpo_slope_is_minus_half_beta():
    from tuneforge.methods.dpo import dpo_pair_loss

    for beta in (0.1, 0.7):
        delta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        zero = torch.zeros(3, dtype=torch.float64)
        ones = torch.ones(3)
        dpo_pair_loss("sigmoid", beta, 0.0, delta, zero, ones, ones).sum().backward()
        assert torch.allclose(delta.grad, torch.full((3,), -beta / 2, dtype=torch.float64))


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_robust_dpo_at_init_is_ln2_for_any_smoothing(eps, tiny_model_dir, tiny_tokenizer, base_model):
    docs = [pair_doc(e) for e in random_examples(3, seed=2)]
    cfg = make_cfg(tiny_model_dir, rl="dpo", dpo_loss_type=["robust"], dpo_label_smoothing=eps)
    loss, _ = _loss(cfg, tiny_tokenizer, base_model, docs)
    assert abs(loss.item() - LN2) < 1e-6


def test_hinge_at_init_is_one_and_ipo_is_quarter_over_beta_squared(tiny_model_dir, tiny_tokenizer, base_model):
    docs = [pair_doc(e) for e in random_examples(3, seed=3)]
    hinge, _ = _loss(make_cfg(tiny_model_dir, rl="dpo", dpo_loss_type=["hinge"]), tiny_tokenizer, base_model, docs)
    assert abs(hinge.item() - 1.0) < 1e-6
    for beta in (0.1, 0.25):
        ipo, _ = _loss(make_cfg(tiny_model_dir, rl="ipo", rl_beta=beta), tiny_tokenizer, base_model, docs)
        assert abs(ipo.item() - 1 / (4 * beta**2)) < 1e-6 * 25, (beta, ipo.item())
    ipo, _ = _loss(make_cfg(tiny_model_dir, rl="ipo"), tiny_tokenizer, base_model, docs)
    assert abs(ipo.item() - 25.0) < 1e-5


def _kto_docs(labels):
    docs = []
    examples = random_examples(len(labels), seed=4)
    for i, (e, good) in enumerate(zip(examples, labels, strict=True)):
        p, prev = e["prompt_ids"], examples[i - 1]["chosen_ids"]
        docs.append({"input_ids": p + e["chosen_ids"], "labels": [-100] * len(p) + e["chosen_ids"], "label": good,
                     "kl_input_ids": p + prev, "kl_labels": [-100] * len(p) + prev})
    return docs


@pytest.mark.parametrize("w_d,w_u", [(1.0, 1.0), (1.5, 0.5)])
def test_kto_at_init_is_the_weighted_half(w_d, w_u, tiny_model_dir, tiny_tokenizer, base_model):
    labels = [True, True, False, True, False]
    cfg = make_cfg(tiny_model_dir, rl="kto", kto_desirable_weight=w_d, kto_undesirable_weight=w_u)
    loss, logged = _loss(cfg, tiny_tokenizer, base_model, _kto_docs(labels))
    n_d, n_u = labels.count(True), labels.count(False)
    assert abs(loss.item() - (w_d * n_d + w_u * n_u) / (2 * len(labels))) < 1e-6
    assert logged["kl"] == 0.0  # z0 is exactly 0 when policy == reference


def _sft_nll(tiny_model_dir, tokenizer, model, docs, train_on_inputs: bool) -> float:
    """Token-mean cross-entropy of the chosen sequences as SFT rows (the SFT objective of the engine)."""
    from tuneforge.methods.sft import SFTObjective

    sft = SFTObjective(make_cfg(tiny_model_dir))
    rows = [[{"input_ids": d["chosen_input_ids"],
              "labels": d["chosen_input_ids"] if train_on_inputs else d["chosen_labels"]}] for d in docs]
    batch = sft.collate(rows, tokenizer.pad_token_id, training=True)
    loss, _ = sft.loss(model, batch, sft.num_items(batch))
    return loss.item()


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_orpo_without_odds_term_is_the_sft_nll_of_chosen(train_on_inputs, tiny_model_dir, tiny_tokenizer):
    model = perturbed(tiny_model_dir)
    docs = [pair_doc(e) for e in random_examples(4, seed=5)]
    cfg = make_cfg(tiny_model_dir, rl="orpo", orpo_alpha=0.0, train_on_inputs=train_on_inputs)
    loss, logged = _loss(cfg, tiny_tokenizer, model, docs)
    sft = _sft_nll(tiny_model_dir, tiny_tokenizer, model, docs, train_on_inputs)
    assert abs(loss.item() - sft) < 1e-6, (loss.item(), sft)
    assert abs(logged["nll_loss"] - sft) < 1e-6


def _identical(docs):
    return [{**d, "rejected_input_ids": d["chosen_input_ids"], "rejected_labels": d["chosen_labels"]} for d in docs]


def test_orpo_with_identical_answers_adds_lambda_ln2(tiny_model_dir, tiny_tokenizer):
    model = perturbed(tiny_model_dir)
    docs = _identical([pair_doc(e) for e in random_examples(4, seed=6)])
    lam = 0.3
    loss, logged = _loss(make_cfg(tiny_model_dir, rl="orpo", orpo_alpha=lam), tiny_tokenizer, model, docs)
    assert abs(loss.item() - logged["nll_loss"] - lam * LN2) < 1e-6


@pytest.mark.parametrize("gamma", [0.5, 1.3])
def test_simpo_with_identical_answers_is_log1p_exp_gamma(gamma, tiny_model_dir, tiny_tokenizer):
    model = perturbed(tiny_model_dir)
    docs = _identical([pair_doc(e) for e in random_examples(4, seed=7)])
    cfg = make_cfg(tiny_model_dir, rl="simpo", simpo_gamma=gamma, cpo_alpha=0.0, rl_beta=2.0)
    loss, _ = _loss(cfg, tiny_tokenizer, model, docs)
    assert abs(loss.item() - math.log1p(math.exp(gamma))) < 1e-6
    if gamma == 0.5:
        assert abs(loss.item() - 0.9740770) < 1e-6
    # with the behaviour-cloning term (TRL's default cpo_alpha = 1): plus the NLL of the chosen answers
    with_nll, logged = _loss(make_cfg(tiny_model_dir, rl="simpo", simpo_gamma=gamma), tiny_tokenizer, model, docs)
    assert abs(with_nll.item() - math.log1p(math.exp(gamma)) - logged["nll_loss"]) < 1e-5


@pytest.mark.parametrize("margin", [0.0, 0.8, -1.5])
def test_bradley_terry_with_equal_scores(margin, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForSequenceClassification

    model = perturbed(tiny_model_dir, cls=AutoModelForSequenceClassification, num_labels=1)
    docs = _identical([pair_doc(e) for e in random_examples(4, seed=8)])
    for d in docs:
        d["margin"] = margin
    loss, logged = _loss(make_cfg(tiny_model_dir, reward_model=True), tiny_tokenizer, model, docs)
    assert abs(loss.item() - math.log1p(math.exp(margin))) < 1e-6  # ln 2 without a margin
    assert logged["accuracy"] == 0.0 and abs(logged["margin"]) < 1e-6
