"""What generates for GRPO outside the training loop: a `Backend` (tuneforge's embedded engine on its own
model copy, or EXPERIMENTAL `vllm.LLM`), and `BackendSampler`, the `Sampler` interface directly over a
backend (`trl.vllm_mode: colocate`; the HTTP client is such a backend too). See generation_server.py."""

from __future__ import annotations

import copy
import time
from typing import Protocol

import torch

from tuneforge.errors import TuneforgeError

from .base import Rollout, SamplingParams


class Backend(Protocol):
    world_size: int

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> tuple[list, list]:
        """(completion ids, per-token log-probs), n rows per prompt, grouped by prompt."""

    def load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None: ...

    def load_lora(self, path: str, name: str, version: int) -> None: ...

    def clear_lora(self) -> None: ...

    def reset_prefix_cache(self) -> None: ...


class EmbeddedBackend:
    """tuneforge's embedded engine on its own copy of the model (weights and adapters swapped on request)."""

    world_size = 1

    def __init__(self, model, pad_id: int = 0, *, copy_model: bool = True, **sampler_kwargs):
        self.base_model = (copy.deepcopy(model) if copy_model else model).eval()
        self.model = self.base_model
        self.pad_id = pad_id
        self.sampler_kwargs = sampler_kwargs

    def generate(self, prompts, n, params):
        from .embedded import EmbeddedSampler

        r = EmbeddedSampler(self.model, self.pad_id, **self.sampler_kwargs).generate(prompts, n, params)
        return r.completion_ids, r.logprobs

    @torch.no_grad()
    def load_weights(self, named):
        state = self.base_model.state_dict()
        unknown = [name for name, _ in named if name not in state]
        if unknown:
            raise KeyError(f"unknown parameter(s) {unknown[:5]}: is the server serving the trainer's base model?")
        for name, t in named:
            state[name].copy_(t)
        self.model = self.base_model

    def load_lora(self, path, name, version):
        from peft import PeftModel

        self.model = PeftModel.from_pretrained(copy.deepcopy(self.base_model), path).eval()

    def clear_lora(self):
        self.model = self.base_model

    def reset_prefix_cache(self):
        pass  # the embedded engine keeps no cache between calls


class WeightLoader:
    """vLLM worker extension (`worker_extension_cls`): loads named tensors into the worker's model."""

    def load_named_weights(self, items):
        self.model_runner.model.load_weights(weights=items)


class VLLMBackend:
    """EXPERIMENTAL: `vllm.LLM` in this process (the server's, or the trainer's for colocate)."""

    def __init__(self, model: str, *, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 dtype: str = "auto", max_model_len: int | None = None, enable_prefix_caching: bool | None = None,
                 enforce_eager: bool | None = None, max_lora_rank: int | None = None, seed: int = 0,
                 sleep: bool = False, extra: dict | None = None):
        try:
            import vllm
        except ImportError:
            raise TuneforgeError("vllm is not installed. Install it on the generation machine (`pip install vllm`), "
                                 "or serve with tuneforge's own engine: `tuneforge vllm-serve config.yaml "
                                 "--engine embedded`.") from None
        self.vllm = vllm
        kwargs = {"model": model, "tensor_parallel_size": tensor_parallel_size, "dtype": dtype, "seed": seed,
                  "gpu_memory_utilization": gpu_memory_utilization,
                  "worker_extension_cls": f"{__name__}.WeightLoader",
                  # log-probs of the distribution actually sampled (after temperature), as the trainer's are
                  "logprobs_mode": "processed_logprobs"}
        optional = {"max_model_len": max_model_len, "enable_prefix_caching": enable_prefix_caching,
                    "enforce_eager": enforce_eager}
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        if max_lora_rank:
            kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank)
        if sleep:
            kwargs["enable_sleep_mode"] = True
        kwargs.update(extra or {})
        self.llm = vllm.LLM(**kwargs)
        self.world_size = tensor_parallel_size
        self.lora = None
        self.sleep, self.sleeping = sleep, False

    def _awake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def generate(self, prompts, n, params):
        self._awake()
        sp = self.vllm.SamplingParams(n=n, temperature=params.temperature, top_p=params.top_p,
                                      top_k=params.top_k or -1, min_p=params.min_p,
                                      repetition_penalty=params.repetition_penalty, max_tokens=params.max_tokens,
                                      logprobs=0, stop_token_ids=list(params.stop_token_ids), **params.extra)
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sampling_params=sp,
                                    lora_request=self.lora, use_tqdm=False)
        completions, logps = [], []
        for request in outputs:
            for out in request.outputs:
                ids = list(out.token_ids)
                completions.append(ids)
                logps.append([float(step[tok].logprob) for step, tok in zip(out.logprobs, ids, strict=True)])
        if self.sleep:  # level 1: weights to CPU memory, KV cache dropped; training gets the GPU back
            self.llm.sleep(level=1)
            self.sleeping = True
        return completions, logps

    def load_weights(self, named):
        self._awake()
        self.llm.collective_rpc("load_named_weights", args=(list(named),))

    def load_lora(self, path, name, version):
        from vllm.lora.request import LoRARequest

        self.lora = LoRARequest(name, version, path)

    def clear_lora(self):
        self.lora = None

    def reset_prefix_cache(self):
        self._awake()
        self.llm.reset_prefix_cache()


# ---------------------------------------------------------------- in-process sampler (colocate)
class BackendSampler:
    """The `Sampler` interface directly over a backend: `trl.vllm_mode: colocate` (no HTTP)."""

    def __init__(self, backend: Backend, *, lora_sync: bool = False):
        import tempfile

        self.backend = backend
        self.lora_sync = lora_sync
        self.version = 0
        self._dir = tempfile.TemporaryDirectory(prefix="tuneforge-lora-sync-")

    def sync_weights(self, model) -> None:
        from pathlib import Path

        from .wire import merged_weights

        self.version += 1
        if self.lora_sync:
            path = Path(self._dir.name) / f"v{self.version}"
            model.save_pretrained(str(path))
            self.backend.load_lora(str(path), "tuneforge", self.version)
        else:
            self.backend.load_weights(list(merged_weights(model).items()))
        self.backend.reset_prefix_cache()

    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams) -> Rollout:
        start = time.perf_counter()
        comp, logps = self.backend.generate(prompt_ids, n, params)
        return Rollout([list(p) for p in prompt_ids], comp, logps, finished_flags(comp, params), n=n,
                       seconds=time.perf_counter() - start, meta={"backend": type(self.backend).__name__})


def finished_flags(completions: list[list[int]], params: SamplingParams) -> list[bool]:
    """A completion finished if it ended on a stop token or before max_tokens (else it was truncated)."""
    stops = set(params.stop_token_ids)
    return [bool(c) and (c[-1] in stops or len(c) < params.max_tokens) for c in completions]
