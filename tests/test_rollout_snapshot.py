"""Weight snapshots for generation: the half-precision copy used for full fine-tuning on a GPU
(decoding under autocast would re-cast every fp32 weight at every token)."""

from __future__ import annotations

import copy

import pytest
import torch

from tuneforge.rollout.base import SamplingParams
from tuneforge.rollout.embedded import EmbeddedSampler
from tuneforge.rollout.snapshot import HalfPrecisionSampler, WeightSnapshot, wants_half_precision_copy


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()


def test_half_precision_copy_only_for_fp32_weights_under_autocast(model):
    from peft import LoraConfig, get_peft_model

    assert wants_half_precision_copy(model, torch.bfloat16)
    assert not wants_half_precision_copy(model, None)  # no autocast: nothing is re-cast
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert not wants_half_precision_copy(half, torch.bfloat16)  # already half precision
    lora = get_peft_model(half, LoraConfig(r=4, target_modules=["q_proj"]))  # fp32 adapter, bf16 base
    assert not wants_half_precision_copy(lora, torch.bfloat16)


def test_snapshot_refresh_follows_the_trained_weights(model):
    policy = copy.deepcopy(model)
    snap = WeightSnapshot(policy, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in snap.copy.parameters())
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1)
    snap.refresh(policy)
    for (name, a), b in zip(snap.copy.named_parameters(), policy.parameters(), strict=True):
        assert torch.equal(a, b.to(torch.bfloat16)), name
    assert all(p.dtype == torch.float32 for p in policy.parameters())  # the policy is untouched


def test_half_precision_sampler_generates_with_the_refreshed_copy(model):
    policy = copy.deepcopy(model)
    sampler = HalfPrecisionSampler(policy, lambda m: EmbeddedSampler(m, pad_id=0), torch.bfloat16)
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(1.5)
    sampler.sync_weights(policy)
    prompts, params = [[5, 6, 7], [8, 9, 10, 11]], SamplingParams(temperature=0.0, max_tokens=6)
    got = sampler.generate(prompts, 1, params).completion_ids
    expected = EmbeddedSampler(copy.deepcopy(policy).to(torch.bfloat16), pad_id=0).generate(prompts, 1, params)
    assert got == expected.completion_ids
    stale = EmbeddedSampler(copy.deepcopy(model).to(torch.bfloat16), pad_id=0).generate(prompts, 1, params)
    assert got != stale.completion_ids  # the refresh mattered


def test_generation_dtype_of_fp32_weights(model, tiny_model_dir):
    """The dtype fp32 weights generate in, which is also the dtype of FSDP2's and ZeRO-3's whole generation
    copy (engine/generation_copy.py `whole_copy`): the run's half precision on CUDA, where the copy is wanted."""
    from tuneforge.config import load
    from tuneforge.rollout.factory import half_precision_dtype

    def cfg(**keys):
        return load(data={"base_model": str(tiny_model_dir), "rl": "grpo", "datasets": [{"path": "p.jsonl",
                          "type": "prompt"}], "trl": {"num_generations": 2, "reward_funcs": ["m.f"]}, **keys})

    cuda = torch.device("cuda")
    assert half_precision_dtype(cfg(bf16=True), model, cuda) == torch.bfloat16
    assert half_precision_dtype(cfg(bf16=True), model, torch.device("cpu")) is None  # no autocast on the CPU
    assert half_precision_dtype(cfg(), model, cuda) is None  # fp32 training generates in fp32
    off = cfg(bf16=True, trl={"num_generations": 2, "reward_funcs": ["m.f"],
                              "generation_kwargs": {"half_precision_copy": False}})
    assert half_precision_dtype(off, model, cuda) is None
    assert half_precision_dtype(cfg(bf16=True), copy.deepcopy(model).to(torch.bfloat16), cuda) is None
