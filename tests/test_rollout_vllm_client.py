"""The experimental vLLM server client against a fake server that speaks the same HTTP endpoints:
generation payloads and grouping, full-weight sync over HTTP, LoRA sync through the filesystem, and a
clear error when no server answers."""

from __future__ import annotations

import copy

import pytest
import torch

from tuneforge.rollout.base import SamplingParams
from tuneforge.rollout.generation_server import EmbeddedBackend, GenerationServer
from tuneforge.rollout.vllm_client import VLLMClient, VLLMError, VLLMServerSampler, merged_weights


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()


def _logps(model, prompt, completion):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def _perturbed(model, seed=5):
    policy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return policy


def test_generate_groups_and_full_weight_sync(model):
    policy = _perturbed(model)
    prompts = [[5, 6, 7], [8, 9]]
    params = SamplingParams(temperature=1.0, max_tokens=5, stop_token_ids=(2,), extra={"seed": 11})
    with GenerationServer(EmbeddedBackend(model)) as server:
        sampler = VLLMServerSampler(VLLMClient(server.host, server.port, timeout=10))
        before = sampler.generate(prompts, 3, params)
        assert len(before.completion_ids) == 6 and before.n == 3
        c = before.completion_ids[0]
        assert torch.allclose(torch.tensor(before.logprobs[0]), _logps(model, prompts[0], c), atol=2e-5)
        sampler.sync_weights(policy)
        after = sampler.generate(prompts, 3, params)
        for i, (c, lp) in enumerate(zip(after.completion_ids, after.logprobs, strict=True)):
            assert torch.allclose(torch.tensor(lp), _logps(policy, prompts[i // 3], c), atol=2e-5)
        paths = [p for p, _ in server.calls]
        assert paths.count("/http_update_weights/") >= 1 and "/reset_prefix_cache/" in paths
        gen = next(body for p, body in server.calls if p == "/generate/")
        assert gen["n"] == 3 and gen["logprobs"] == 0 and gen["top_k"] == -1 and gen["max_tokens"] == 5
        assert gen["generation_kwargs"] == {"seed": 11, "stop_token_ids": [2]}  # the rest of generation_kwargs


def test_lora_sync_through_the_filesystem(model):
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False))
    prompts = [[5, 6, 7, 8]]
    with GenerationServer(EmbeddedBackend(model)) as server:
        sampler = VLLMServerSampler(VLLMClient(server.host, server.port, timeout=10), lora_sync=True)
        sampler.sync_weights(policy)
        r = sampler.generate(prompts, 2, SamplingParams(max_tokens=4))
        for c, lp in zip(r.completion_ids, r.logprobs, strict=True):
            assert torch.allclose(torch.tensor(lp), _logps(policy, prompts[0], c), atol=2e-5)
        assert [p for p, _ in server.calls].count("/v1/load_lora_adapter") == 1


def test_merged_weights_fold_lora_without_touching_the_model(model):
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    merged = merged_weights(policy)
    assert set(merged) == set(model.state_dict())
    reference = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert all(torch.allclose(merged[k], reference[k], atol=1e-6) for k in reference)
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())


def test_unreachable_server_is_one_clear_error():
    client = VLLMClient("127.0.0.1", 9, timeout=1)
    with pytest.raises(VLLMError, match="was not ready within 1 s"):
        client.wait_ready()
    with pytest.raises(VLLMError, match="cannot reach the vLLM server"):
        client.generate([[1]], 1, SamplingParams())


def test_served_embedded_engine_from_a_config(write_config, tiny_model_dir):
    """What `tuneforge vllm-serve config.yaml --engine embedded` serves: the config's model, over HTTP."""
    from transformers import AutoModelForCausalLM

    from tuneforge.config import load
    from tuneforge.rollout.generation_server import backend_from_config

    cfg = load(write_config({"rl": "grpo"}))
    with GenerationServer(backend_from_config(cfg, "embedded")) as server:
        client = VLLMClient(server.host, server.port, timeout=10)
        client.wait_ready()
        assert client._request("GET", "/get_world_size/") == {"world_size": 1}
        comp, logps = client.generate([[5, 6, 7]], 2, SamplingParams(temperature=1.0, max_tokens=4))
        client.clear_lora()
        with pytest.raises(VLLMError, match="404"):
            client._request("POST", "/no_such_endpoint/", {})
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    assert len(comp) == 2 and all(len(c) == 4 for c in comp)
    assert torch.allclose(torch.tensor(logps[1]), _logps(base, [5, 6, 7], comp[1]), atol=2e-5)


def test_generation_kwargs_other_than_the_embedded_engines_reach_vllm(tiny_tokenizer):
    """TRL hands `generation_kwargs` to vLLM's SamplingParams; the embedded engine's own keys stay home."""
    from types import SimpleNamespace

    from tuneforge.rollout.generation_server import sampling_params

    trl = SimpleNamespace(generation_kwargs={"seed": 3, "presence_penalty": 0.5, "cuda_graphs": False,
                                             "kv_cache_dtype": "fp8", "stop_token_ids": [9]})
    params = SamplingParams.from_trl(trl, tiny_tokenizer, 8)
    assert params.extra == {"seed": 3, "presence_penalty": 0.5}
    assert 9 in params.stop_token_ids
    served = sampling_params({"max_tokens": 8, "generation_kwargs": {**params.extra, "stop_token_ids": [9]}})
    assert served.extra == params.extra and served.stop_token_ids == (9,)
