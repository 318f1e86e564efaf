"""EBFT strided mode's objective: advantages, per-block rewards and the loss on a fixed batch, each checked
against a hand computation from plain forwards (each block as its own sequence x[:a_j] + block j), not
from the masked forward the objective uses; the step contract (sum / items over micro-batches); and the
config checks."""

from __future__ import annotations

import pytest
import torch

from tuneforge.methods.ebft.blocks import StridedLayout, block_anchors
from tuneforge.methods.ebft.reward import group_rewards
from tuneforge.methods.ebft.strided_rollout import BlockScores, advantages, score_blocks


def test_advantages_closed_form():
    r = torch.tensor([[1.0, 0.0], [2.0, 0.0], [6.0, 3.0]])  # 3 samples x 2 blocks
    rloo = advantages(r, "rloo")
    # sample 0, block 0: 1 - (2 + 6) / 2 = -3; sample 2, block 1: 3 - 0 = 3
    assert torch.allclose(rloo, torch.tensor([[-3.0, -1.5], [-1.5, -1.5], [4.5, 3.0]]))
    norm = advantages(r, "group_norm")
    assert torch.allclose(norm[:, 0], (r[:, 0] - 3.0) / (r[:, 0].std() + 1e-8))
    assert torch.allclose(norm[:, 1], torch.tensor([-1.0, -1.0, 2.0]) / (3.0 ** 0.5 + 1e-8))
    assert torch.equal(advantages(r, "reinforce"), r)
    assert torch.equal(advantages(r[:1], "rloo"), r[:1])  # one sample: the raw reward


@pytest.fixture(scope="module")
def net(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()


def _separate(net, seq, lay, j):
    """Output of a forward over x[:a_j] + block j alone (positions 0 .. a_j + gen_len - 1)."""
    a = lay.anchors[j]
    return net(input_ids=torch.cat([seq[:, :a], seq[:, lay.slots[j]]], dim=1), output_hidden_states=True)


@pytest.mark.parametrize("pooling", ["last_token", "mean_pooling"])
def test_block_rewards_equal_eq7_on_separately_computed_features(net, pooling):
    torch.manual_seed(0)
    lay = StridedLayout(12, tuple(block_anchors(12, 4, 3, 3)), 3)  # anchors 4, 7
    seq = torch.randint(5, 900, (3, lay.length))
    seq[:, :12] = seq[0, :12]  # the same document in every sample
    layers = [1, 2]
    scores = score_blocks(net, lay, seq, layers, pooling, alignment_coef=1.0, diversity_coef=0.5)
    with torch.no_grad():
        doc_states = net(input_ids=seq[:1, :12], output_hidden_states=True).hidden_states

    def feature(states, index):  # each layer L2-normalised, then concatenated; pooled over `index`
        parts = [torch.nn.functional.normalize(states[i][:, index], dim=-1) for i in layers]
        f = torch.cat(parts, dim=-1)
        return f[:, -1] if pooling == "last_token" else f.mean(dim=1)

    for j, a in enumerate(lay.anchors):
        with torch.no_grad():
            states = _separate(net, seq, lay, j).hidden_states
        generated = feature(states, slice(a, a + 3))  # [3 samples, D]
        truth = feature(doc_states, slice(a, a + 3))[0]
        expected = group_rewards(generated, truth, alignment_coef=1.0, diversity_coef=0.5)
        assert torch.allclose(scores.rewards[:, j], expected.rewards, atol=1e-4), j
        assert torch.allclose(scores.alignment[:, j], expected.alignment, atol=1e-4)


@pytest.fixture
def objective(write_config, write_jsonl):
    from tuneforge.config import load
    from tuneforge.methods.ebft.strided import StridedEBFTObjective

    write_jsonl([{"text": "a b c"}], "docs.jsonl")

    def make(**ebft):
        cfg = load(write_config({"rl": "ebft", "datasets": [{"path": "docs.jsonl", "type": "completion"}],
                                 "ebft": {"mode": "strided", **ebft}}))
        return StridedEBFTObjective(cfg)

    return make


def _batch(seq, lay, adv, labels, ce_weight):
    scores = BlockScores(torch.zeros_like(adv), torch.zeros_like(adv), torch.zeros_like(adv), 0.0)
    gen = seq.shape[0] * lay.num_blocks * lay.gen_len
    return {"docs": [{"layout": lay, "tokens": seq, "scores": scores, "advantages": adv,
                      "ce_targets": torch.tensor(labels[1:])}],
            "gen_tokens": gen, "ce_tokens": sum(1 for x in labels[1:] if x != -100), "ce_weight": ce_weight}


def _hand_sums(net, seq, lay, adv, labels):
    """(sum over generated tokens of -log pi * A, sum of the CE tokens' NLL), from plain forwards."""
    rl = 0.0
    with torch.no_grad():
        for j, a in enumerate(lay.anchors):
            logp = torch.log_softmax(_separate(net, seq, lay, j).logits.float(), -1)
            for s in range(lay.gen_len):
                tok = seq[:, lay.slots[j, s]]
                rl -= (logp[torch.arange(seq.shape[0]), a - 1 + s, tok] * adv[:, j]).sum()
        doc_logp = torch.log_softmax(net(input_ids=seq[:1, : lay.doc_len]).logits.float(), -1)[0]
    ce = -sum(doc_logp[p, labels[p + 1]] for p in range(lay.doc_len - 1) if labels[p + 1] != -100)
    return float(rl), float(ce)


def test_loss_on_a_fixed_batch_equals_the_hand_computation(net, objective):
    obj = objective(rl_coef=0.7, ce_coef=0.3, stride=3, context_length=4, generate_max_len=3)
    torch.manual_seed(3)
    lay = StridedLayout(12, (4, 7), 3)
    seq = torch.randint(5, 900, (2, lay.length))
    seq[1, :12] = seq[0, :12]
    adv = torch.tensor([[0.5, -1.0], [-0.5, 2.0]])
    labels = [-100] * 5 + seq[0, 5:12].tolist()  # a prompt of 5 tokens: CE on the 7 completion tokens
    batch = _batch(seq, lay, adv, labels, ce_weight=2.5)
    rl, ce = _hand_sums(net, seq, lay, adv, labels)
    loss, sums = obj.loss(net, batch, 40)
    assert loss.item() == pytest.approx((0.7 * rl + 0.3 * 2.5 * ce) / 40, rel=1e-4)
    assert sums["rl_sum"] == pytest.approx(rl, rel=1e-4) and sums["ce_sum"] == pytest.approx(ce, rel=1e-4)
    assert sums["gen_tokens"] == 12 and sums["ce_tokens"] == 7


def test_step_loss_is_the_mean_over_the_whole_step(net, objective, monkeypatch):
    """Two micro-batches: rollout_step's CE weight N_gen / N_ce makes sum of loss(b, N_gen) equal
    rl_coef * mean over all generated tokens + ce_coef * mean over all CE tokens."""
    obj = objective(rl_coef=1.0, ce_coef=0.5, stride=3, context_length=4, generate_max_len=3)
    torch.manual_seed(4)
    parts, hand = [], []
    for doc_len, n in ((12, 2), (9, 3)):
        lay = StridedLayout(doc_len, tuple(block_anchors(doc_len, 4, 3, 3)), 3)
        seq = torch.randint(5, 900, (n, lay.length))
        seq[:, :doc_len] = seq[0, :doc_len]
        adv = torch.randn(n, lay.num_blocks)
        labels = seq[0, :doc_len].tolist()  # raw text: every token after the first
        parts.append(_batch(seq, lay, adv, labels, ce_weight=None))
        hand.append(_hand_sums(net, seq, lay, adv, labels))
    rolled = iter(parts)
    monkeypatch.setattr(obj, "_rollout", lambda model, b: next(rolled))
    batches = obj.rollout_step(net, [{}, {}])
    n_gen, n_ce = 2 * 2 * 3 + 3 * 1 * 3, 11 + 8
    assert sum(obj.num_items(b) for b in batches) == n_gen
    assert all(b["ce_weight"] == pytest.approx(n_gen / n_ce) for b in batches)
    total = sum(obj.loss(net, b, n_gen)[0].item() for b in batches)
    expected = sum(r for r, _ in hand) / n_gen + 0.5 * sum(c for _, c in hand) / n_ce
    assert total == pytest.approx(expected, rel=1e-4)


def test_one_sample_forces_reinforce_without_diversity_and_pooling_falls_back(objective):
    obj = objective(n_samples_per_prompt=1, advantage_estimator="rloo", embed_method="concat")
    assert obj.estimator == "reinforce" and obj.coefs["diversity_coef"] == 0.0
    assert obj.pooling == "last_token"
    assert objective(embed_method="mean_pooling").pooling == "mean_pooling"


def test_maskless_attention_and_activation_offloading_are_refused(write_config, write_jsonl):
    from tuneforge.config import load
    from tuneforge.config.errors import ConfigError
    from tuneforge.methods.ebft.strided import StridedEBFTObjective

    write_jsonl([{"text": "a b c"}], "docs.jsonl")
    base = {"rl": "ebft", "datasets": [{"path": "docs.jsonl", "type": "completion"}], "ebft": {"mode": "strided"}}
    with pytest.raises(ConfigError, match="attn_implementation"):
        StridedEBFTObjective(load(write_config({**base, "attn_implementation": "flash_attention_2"})))
    with pytest.raises(ConfigError, match="activation_offloading"):
        StridedEBFTObjective(load(write_config({**base, "activation_offloading": True})))
