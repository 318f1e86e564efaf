"""The vLLM backend (`tuneforge vllm-serve`, `vllm_mode: colocate`) against a stand-in `vllm` module.

vLLM cannot be installed here. The stand-in has vLLM's call shapes only: `LLM(**kwargs)`,
`LLM.generate(prompts=[{"prompt_token_ids": ...}], sampling_params=, lora_request=, use_tqdm=)`
returning request outputs whose `.outputs[i].token_ids` / `.logprobs[t][token].logprob` are filled,
`LLM.collective_rpc(method, args=)` calling the worker extension on a worker with
`model_runner.model.load_weights(weights=)`, `vllm.lora.request.LoRARequest(name, id, path)`. It
generates with tuneforge's embedded engine, so a test can check that weights and adapters arrive.
"""

from __future__ import annotations

import copy
import importlib
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from tuneforge.rollout.base import SamplingParams


class _StandInLLM:
    instances: list = []

    def __init__(self, **kwargs):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.kwargs = kwargs
        self.calls: list[str] = []
        path = kwargs["model"]
        try:
            self.model = AutoModelForCausalLM.from_pretrained(path).eval()
        except OSError:  # a config-only folder (reinit_weights): random weights until the first sync
            self.model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).eval()
        module, name = kwargs["worker_extension_cls"].rsplit(".", 1)
        extension = getattr(importlib.import_module(module), name)
        self.worker = type("Worker", (extension,), {})()
        self.worker.model_runner = SimpleNamespace(model=SimpleNamespace(load_weights=self._load_weights))
        _StandInLLM.instances.append(self)

    @torch.no_grad()
    def _load_weights(self, weights):
        state = self.model.state_dict()
        for name, t in weights:
            state[name].copy_(t)

    def generate(self, prompts, sampling_params, lora_request=None, use_tqdm=True):
        from tuneforge.rollout.embedded import EmbeddedSampler

        self.calls.append("generate")
        sp = sampling_params.kwargs
        self.sampling_kwargs = sp
        model = self.model
        if lora_request is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(copy.deepcopy(self.model), lora_request.lora_path).eval()
        params = SamplingParams(temperature=sp["temperature"], top_p=sp["top_p"], top_k=max(sp["top_k"], 0),
                                min_p=sp["min_p"], repetition_penalty=sp["repetition_penalty"],
                                max_tokens=sp["max_tokens"], stop_token_ids=tuple(sp["stop_token_ids"]))
        ids = [p["prompt_token_ids"] for p in prompts]
        r = EmbeddedSampler(model, 0).generate(ids, sp["n"], params)
        outs = []
        for i in range(len(ids)):
            rows = range(i * sp["n"], (i + 1) * sp["n"])
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(
                token_ids=r.completion_ids[j],
                logprobs=[{t: SimpleNamespace(logprob=lp, rank=1)} for t, lp in zip(r.completion_ids[j], r.logprobs[j],
                                                                                     strict=True)]) for j in rows]))
        return outs

    def collective_rpc(self, method, args=()):
        self.calls.append(method)
        return [getattr(self.worker, method)(*args)]

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def sleep(self, level=1):
        assert self.kwargs.get("enable_sleep_mode"), "vLLM refuses sleep() without enable_sleep_mode"
        self.calls.append(f"sleep{level}")

    def wake_up(self, tags=None):
        self.calls.append("wake_up")


@pytest.fixture
def standin_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM = _StandInLLM
    vllm.SamplingParams = lambda **kw: SimpleNamespace(kwargs=kw)
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, id_, path: SimpleNamespace(lora_name=name, lora_int_id=id_, lora_path=path)
    for name, mod in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, mod)
    _StandInLLM.instances.clear()
    return _StandInLLM


def _logps(model, prompt, completion):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def test_vllm_backend_maps_generation_weights_and_lora(standin_vllm, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.rollout.generation_server import BackendSampler, VLLMBackend

    backend = VLLMBackend(str(tiny_model_dir), max_lora_rank=4, max_model_len=128)
    llm = standin_vllm.instances[0]
    assert llm.kwargs["logprobs_mode"] == "processed_logprobs" and llm.kwargs["enable_lora"] is True
    assert llm.kwargs["max_lora_rank"] == 4 and llm.kwargs["max_model_len"] == 128
    assert "enforce_eager" not in llm.kwargs  # unset options are left to vLLM's defaults
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()

    sampler = BackendSampler(backend)
    prompts, params = [[5, 6, 7], [8, 9]], SamplingParams(temperature=1.0, max_tokens=5, stop_token_ids=(2,),
                                                          extra={"seed": 11, "presence_penalty": 0.5})
    r = sampler.generate(prompts, 3, params)
    assert len(r.completion_ids) == 6 and r.n == 3
    assert llm.sampling_kwargs["seed"] == 11 and llm.sampling_kwargs["presence_penalty"] == 0.5  # generation_kwargs
    assert torch.allclose(torch.tensor(r.logprobs[4]), _logps(base, prompts[1], r.completion_ids[4]), atol=2e-5)

    policy = copy.deepcopy(base)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sampler.sync_weights(policy)  # full sync: merged weights through collective_rpc("load_named_weights")
    assert llm.calls[-2:] == ["load_named_weights", "reset_prefix_cache"]
    r = sampler.generate(prompts, 2, params)
    assert torch.allclose(torch.tensor(r.logprobs[0]), _logps(policy, prompts[0], r.completion_ids[0]), atol=2e-5)

    adapter = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    lora_sampler = BackendSampler(VLLMBackend(str(tiny_model_dir), max_lora_rank=4), lora_sync=True)
    lora_sampler.sync_weights(adapter)
    assert lora_sampler.backend.lora.lora_int_id == 1
    r = lora_sampler.generate([[5, 6, 7, 8]], 2, SamplingParams(max_tokens=4))
    assert torch.allclose(torch.tensor(r.logprobs[1]), _logps(adapter, [5, 6, 7, 8], r.completion_ids[1]), atol=2e-5)


def test_vllm_serve_without_vllm_is_one_clear_error(write_config, monkeypatch, capsys):
    from tuneforge.cli import main

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    monkeypatch.setattr(sys, "argv", ["tuneforge", "vllm-serve", str(write_config({"rl": "grpo"}))])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "vllm is not installed" in err and "--engine embedded" in err and "Traceback" not in err


@pytest.mark.parametrize("sleep", [False, True])
def test_grpo_colocate_trains_through_the_backend(standin_vllm, write_config, write_jsonl, tmp_path, monkeypatch,
                                                  sleep):
    """`trl.use_vllm` + `vllm_mode: colocate`: an in-process LLM with TRL's colocate memory default (0.3),
    weights synced before each generation, importance-sampling correction on (vLLM is another sampler).
    With `vllm_enable_sleep_mode` the engine sleeps after each generation and wakes before the next sync."""
    import textwrap

    from tuneforge.config import load
    from tuneforge.engine.run import train

    (tmp_path / "colocate_rewards.py").write_text(textwrap.dedent("""
        def hits(completions, **kwargs):
            return [1.0 if "7" in c else 0.0 for c in completions]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    write_jsonl([{"prompt": f"hello {i}"} for i in range(16)], "prompts.jsonl")
    cfg = load(write_config({
        "rl": "grpo", "datasets": [{"path": "prompts.jsonl", "type": "prompt"}],
        "trl": {"num_generations": 4, "max_completion_length": 6, "reward_funcs": ["colocate_rewards.hits"],
                "use_vllm": True, "vllm_mode": "colocate", "vllm_enable_sleep_mode": sleep},
        "micro_batch_size": 16, "max_steps": 2, "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no",
    }))
    result = train(cfg, show_progress=False)
    llm = standin_vllm.instances[0]
    assert llm.kwargs["gpu_memory_utilization"] == 0.3
    assert llm.calls.count("generate") == 2 and llm.calls.count("load_named_weights") == 2
    if sleep:
        assert llm.calls == ["load_named_weights", "reset_prefix_cache", "generate", "sleep1",
                             "wake_up", "load_named_weights", "reset_prefix_cache", "generate", "sleep1"]
    else:
        assert "sleep1" not in llm.calls and "enable_sleep_mode" not in llm.kwargs
    steps = [r for r in result.history if r["type"] == "train"]
    assert len(steps) == 2 and "sampling/importance_sampling_ratio/mean" in steps[0]
