"""EBFT's reward and pooling in closed form (methods/ebft/reward.py, features.py)."""

import math

import pytest
import torch

from tuneforge.methods.ebft.features import layer_indices, pool
from tuneforge.methods.ebft.reward import batch_rewards, group_rewards, whiten


def test_reward_formula_on_fixed_vectors():
    # Three samples in 2-D, already unit length; the truth along x.
    gen = torch.tensor([[1.0, 0.0], [0.0, 1.0], [math.sqrt(0.5), math.sqrt(0.5)]])
    truth = torch.tensor([2.0, 0.0])  # normalised to (1, 0)
    out = group_rewards(gen, truth, alignment_coef=1.0, diversity_coef=0.5)
    s = math.sqrt(0.5)
    align = [1.0, 0.0, s]
    # mean dot product with the two others
    div = [(0.0 + s) / 2, (0.0 + s) / 2, (s + s) / 2]
    expected = [2 * 1.0 * a - 2 * 0.5 * d for a, d in zip(align, div, strict=True)]
    assert out.alignment.tolist() == pytest.approx(align, abs=1e-6)
    assert out.diversity.tolist() == pytest.approx(div, abs=1e-6)
    assert out.rewards.tolist() == pytest.approx(expected, abs=1e-6)
    mean = [(1 + 0 + s) / 3, (0 + 1 + s) / 3]
    assert float(out.cfm_loss) == pytest.approx((mean[0] - 1) ** 2 + mean[1] ** 2, abs=1e-6)


def test_features_are_l2_normalised_without_whitening():
    gen = torch.tensor([[3.0, 4.0], [0.0, 5.0]])
    scaled = group_rewards(gen * 7.0, torch.tensor([1.0, 0.0]))
    plain = group_rewards(gen, torch.tensor([1.0, 0.0]))
    assert torch.allclose(scaled.rewards, plain.rewards)
    # dot of (0.6, 0.8) and (0, 1) is 0.8 for both samples
    assert plain.diversity.tolist() == pytest.approx([0.8, 0.8])


def test_one_sample_has_no_diversity_term():
    out = group_rewards(torch.tensor([[1.0, 1.0]]), torch.tensor([1.0, 0.0]), diversity_coef=5.0)
    assert out.diversity.tolist() == [0.0]
    assert out.rewards.tolist() == pytest.approx([2 * math.sqrt(0.5)])


def test_whitening_makes_independent_samples_orthonormal():
    torch.manual_seed(0)
    gen, truth = torch.randn(3, 8), torch.randn(8)
    white_gen, white_truth = whiten(gen.double(), truth.double())
    assert torch.allclose(white_gen @ white_gen.T, torch.eye(3, dtype=torch.float64), atol=1e-9)
    out = group_rewards(gen, truth, whitening=True)
    assert out.diversity.abs().max() < 1e-6  # orthonormal samples: no similarity to penalise
    # alignment is the cosine in the whitened space: W = V S^-1 V^T from gen = U S V^T
    _, s, vh = torch.linalg.svd(gen.double(), full_matrices=False)
    w = vh.T @ torch.diag(1 / s) @ vh
    g, t = gen.double() @ w, truth.double() @ w
    cos = (g @ t) / (g.norm(dim=1) * t.norm())
    assert out.alignment.tolist() == pytest.approx(cos.tolist(), abs=1e-6)


def test_whitening_drops_directions_the_samples_do_not_span():
    gen = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])  # rank 1
    g, t = whiten(gen.double(), torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    assert t[1:].abs().max() < 1e-12 and g[:, 1:].abs().max() < 1e-12


def test_batch_rewards_group_by_prompt():
    torch.manual_seed(1)
    gen, truth = torch.randn(6, 4), torch.randn(2, 4)
    both = batch_rewards(gen, truth, 3)
    first, second = group_rewards(gen[:3], truth[0]), group_rewards(gen[3:], truth[1])
    assert torch.allclose(both.rewards, torch.cat([first.rewards, second.rewards]))
    assert float(both.cfm_loss) == pytest.approx((float(first.cfm_loss) + float(second.cfm_loss)) / 2)


def test_layer_indices_count_the_embedding_as_zero():
    assert layer_indices([0.25, 0.5, 0.75], 4) == [1, 2, 3]
    assert layer_indices([0.0, 1.0], 12) == [0, 12]
    assert layer_indices([0.5], 3) == [1]


def _states():
    # [2, 5, 1]: row 0 right-padded (3 valid), row 1 left-padded (4 valid); values are positions + 10*row
    states = torch.tensor([[0.0, 1, 2, 3, 4], [10.0, 11, 12, 13, 14]]).unsqueeze(-1)
    valid = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    return states, valid


def test_last_token_and_mean_pooling_ignore_padding_on_either_side():
    states, valid = _states()
    assert pool(states, valid, "last_token").squeeze(-1).tolist() == [2.0, 14.0]
    assert pool(states, valid, "mean_pooling").squeeze(-1).tolist() == [1.0, 12.5]


def test_completion_mean_uses_completion_tokens_only():
    states, valid = _states()
    completion = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    assert pool(states, valid, "completion_mean", completion).squeeze(-1).tolist() == [1.5, 13.5]


def test_concat_pooling_takes_quarter_half_three_quarter_points():
    states, valid = _states()
    out = pool(states, valid, "concat")
    # row 0: length 3 -> ranks floor(.75)=0, floor(1.5)=1, floor(2.25)=2; row 1: length 4 -> 1, 2, 3
    assert out.shape == (2, 3)
    assert out.tolist() == [[0.0, 1.0, 2.0], [12.0, 13.0, 14.0]]


def test_unknown_pooling_is_a_config_error():
    states, valid = _states()
    with pytest.raises(Exception, match="ebft.embed_method"):
        pool(states, valid, "max")


def test_hidden_features_skip_the_head_and_match_the_full_forward(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.methods.ebft.features import hidden_features, num_layers_of

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(5, 100, (2, 7))
    mask = torch.ones_like(ids)
    layers = layer_indices([0.5, 1.0], num_layers_of(model))
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    feats = hidden_features(model, ids, mask, layers)
    assert feats.shape == (2, 7, 2 * model.config.hidden_size)
    assert torch.allclose(feats, torch.cat([full[i] for i in layers], dim=-1), atol=1e-6)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    assert num_layers_of(peft) == model.config.num_hidden_layers
    assert torch.allclose(hidden_features(peft, ids, mask, layers), feats, atol=1e-6)  # B = 0: same features
