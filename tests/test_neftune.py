"""NEFTune: noise on the input embeddings in training mode only, as transformers' own hook adds it."""

from __future__ import annotations

import math

import pytest
import torch

from test_engine_support import losses, make_config, make_rows, train
from tuneforge.models import neftune


@pytest.fixture
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).train()  # loaded in eval mode


def test_noise_equals_transformers_hook_and_stays_within_its_bound(model):
    from transformers.integrations.neftune import neftune_post_forward_hook

    ids = torch.randint(5, 500, (3, 40))
    embeddings = model.get_input_embeddings()
    plain = embeddings(ids).detach()
    handle = neftune.attach(model, 5.0)
    torch.manual_seed(11)
    ours = embeddings(ids).detach()
    handle.remove()
    embeddings.neftune_noise_alpha = 5.0
    handle = embeddings.register_forward_hook(neftune_post_forward_hook)
    torch.manual_seed(11)
    theirs = embeddings(ids).detach()
    handle.remove()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    bound = 5.0 / math.sqrt(40 * plain.shape[-1])
    noise = (ours - plain).abs()
    assert noise.max() <= bound * (1 + 1e-5) and noise.max() > 0.95 * bound  # uniform over the whole range
    assert noise.mean() == pytest.approx(bound / 2, rel=0.05)  # E|U(-b, b)| = b / 2


def test_evaluation_and_a_detached_hook_see_plain_embeddings(model):
    ids = torch.randint(5, 500, (2, 16))
    embeddings = model.get_input_embeddings()
    plain = embeddings(ids).detach()
    handle = neftune.attach(model, 5.0)
    model.eval()
    torch.testing.assert_close(embeddings(ids), plain, rtol=0, atol=0)
    model.train()
    assert not torch.equal(embeddings(ids), plain)
    handle.remove()
    torch.testing.assert_close(embeddings(ids), plain, rtol=0, atol=0)


def test_training_with_neftune_trains_on_noisy_embeddings(tmp_path, tiny_model_dir):
    """Through `tuneforge train`: the same run with NEFTune has another loss from its first forward on."""
    rows = make_rows(n=16, seed=4)
    keys = dict(max_steps=2, logging_steps=1, save_strategy="no", seed=3)
    plain = train(make_config(tmp_path / "plain", tiny_model_dir, rows, **keys))
    noisy = train(make_config(tmp_path / "noisy", tiny_model_dir, rows, neftune_noise_alpha=50, **keys))
    again = train(make_config(tmp_path / "again", tiny_model_dir, rows, **keys))
    assert losses(noisy)[1] != pytest.approx(losses(plain)[1], abs=1e-6)
    assert losses(again) == losses(plain)  # without it the run repeats exactly: the difference is the noise


def test_neftune_outside_sft_is_a_config_error():
    from tuneforge.config import load
    from tuneforge.config.errors import ConfigError

    with pytest.raises(ConfigError, match="neftune_noise_alpha.*supervised fine-tuning only"):
        load(data={"base_model": "x", "rl": "dpo", "neftune_noise_alpha": 5})
