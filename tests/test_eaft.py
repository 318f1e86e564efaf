"""EAFT: top-k-entropy-weighted cross-entropy, against closed-form values and a full-logits reference."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from test_engine_support import make_config, one_thread  # noqa: F401
from tuneforge.data.collate import collate
from tuneforge.models.eaft import topk_entropy_weights, weighted_cross_entropy
from tuneforge.models.losses import IGNORE_INDEX, causal_lm_token_loss


class LogitsAsHidden:
    """A head that returns its input: the `hidden` rows are the logits themselves."""

    vocab = 4

    def __call__(self, hidden):
        return hidden.float()


LOGITS = [[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0], [3.0, -2.0, 1.0, 0.5]]
TARGETS = [1, 3, 0]


def _entropy(values):
    z = sum(math.exp(v) for v in values)
    return -sum(math.exp(v) / z * math.log(math.exp(v) / z) for v in values)


def _ce(row, target):
    return math.log(sum(math.exp(v) for v in row)) - row[target]


@pytest.mark.parametrize(("k", "alpha"), [(2, 1.0), (3, 2.0), (20, 0.5), (4, 0.0)])
def test_closed_form_loss_and_gradient(k, alpha):
    logits = torch.tensor(LOGITS, requires_grad=True)
    loss = weighted_cross_entropy(LogitsAsHidden(), logits, torch.tensor(TARGETS), alpha=alpha, k=k)
    top = [sorted(row, reverse=True)[: min(k, 4)] for row in LOGITS]
    weights = [_entropy(t) ** alpha for t in top]
    assert weights[1] == pytest.approx(math.log(min(k, 4)) ** alpha)  # equal logits: log k
    want = sum(w * _ce(row, t) for w, row, t in zip(weights, LOGITS, TARGETS, strict=True))
    assert float(loss.detach()) == pytest.approx(want, rel=1e-6)
    loss.backward()
    # No gradient through the weight: d/dz = w x (softmax(z) - onehot(target))
    onehot = torch.nn.functional.one_hot(torch.tensor(TARGETS), 4).float()
    grad = torch.tensor(weights).unsqueeze(1) * (torch.softmax(torch.tensor(LOGITS), -1) - onehot)
    assert torch.allclose(logits.grad, grad, atol=1e-6)


def test_weights_are_low_for_confident_rows():
    w = topk_entropy_weights(torch.tensor([[10.0, 0.0, 0.0], [1.0, 1.0, 1.0]]), k=3, alpha=1.0)
    assert float(w[0]) < 0.01 and float(w[1]) == pytest.approx(math.log(3))


def test_sft_objective_matches_the_full_logits_reference(tmp_path, tiny_model_dir):
    """On the tiny model: the objective's EAFT loss equals sum(H_k^alpha x CE) over the trained positions
    computed from model(...).logits, and differs from the plain cross-entropy."""
    from transformers import AutoModelForCausalLM

    from tuneforge.methods.sft import SFTObjective

    cfg = make_config(tmp_path, tiny_model_dir, use_eaft=True, eaft_alpha=1.5, eaft_k=5)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(0)
    docs = []
    for length in (7, 12):
        ids = torch.randint(10, 900, (length,), generator=g).tolist()
        docs.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    batch = collate([[d] for d in docs], pad_id=0)
    with torch.no_grad():
        loss, metrics = SFTObjective(cfg).loss(model, batch, num_items=1)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        flat, targets = logits.float().flatten(0, 1), batch["target_ids"].flatten()
        keep = targets != IGNORE_INDEX
        top = torch.topk(flat[keep], 5, dim=-1).values
        p = torch.softmax(top, -1)
        weights = (-(p * torch.log(p + 1e-10)).sum(-1)) ** 1.5
        ce = torch.nn.functional.cross_entropy(flat[keep], targets[keep], reduction="none")
        plain = causal_lm_token_loss(model, batch).loss_sum
    assert float(loss) == pytest.approx(float((weights * ce).sum()), rel=1e-5)
    assert metrics["loss_sum"] == pytest.approx(float(loss), rel=1e-6)
    assert abs(float(loss) - float(plain)) > 1e-3


def test_eaft_is_refused_outside_supervised_fine_tuning(tmp_path, tiny_model_dir):
    from tuneforge.config.errors import ConfigError

    with pytest.raises(ConfigError, match="use_eaft"):
        make_config(tmp_path, tiny_model_dir, use_eaft=True, rl="dpo")


def test_partial_is_a_drop_in_for_the_token_loss():
    from tuneforge.models.eaft import token_loss_fn

    cfg = type("C", (), {"use_eaft": True, "eaft_alpha": 2.0, "eaft_k": 3})()
    fn = token_loss_fn(cfg)
    assert isinstance(fn, partial) and fn.keywords == {"alpha": 2.0, "k": 3}
    cfg.use_eaft = False
    assert token_loss_fn(cfg) is None
