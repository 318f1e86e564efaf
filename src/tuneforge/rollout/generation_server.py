"""`tuneforge vllm-serve`: a generation server that speaks TRL's `vllm-serve` HTTP protocol.

The trainer (`trl.use_vllm: true`, `vllm_mode: server`, `rollout/vllm_client.py`) talks to it over
these endpoints (rl.md section 3.2): `GET /health/`, `GET /get_world_size/`, `POST /generate/`,
`POST /reset_prefix_cache/`, `POST /http_update_weights/` (base64 tensors, no NCCL group),
`POST /v1/load_lora_adapter` and `POST /set_lora_adapter/` (adapter folder on a shared filesystem),
`POST /clear_lora_adapter/`.

What generates is a `Backend`:
- `VLLMBackend` wraps `vllm.LLM` (EXPERIMENTAL: vLLM cannot be installed where this was written; the
  mapping to vLLM's API is tested against a stand-in module with vLLM's call shapes only);
- `EmbeddedBackend` runs tuneforge's own embedded engine on its own copy of the model, e.g. on a
  spare GPU without vLLM. The tests use it as a real server.

The same backends serve `vllm_mode: colocate` in-process through `BackendSampler` (no HTTP).
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

import torch

from tuneforge.errors import TuneforgeError

from .base import Rollout, SamplingParams

log = logging.getLogger("tuneforge")


class Backend(Protocol):
    world_size: int

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> tuple[list, list]:
        """(completion ids, per-token log-probs), n rows per prompt, grouped by prompt."""

    def load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None: ...

    def load_lora(self, path: str, name: str, version: int) -> None: ...

    def clear_lora(self) -> None: ...

    def reset_prefix_cache(self) -> None: ...


# ---------------------------------------------------------------- wire format
def encode_tensor(name: str, t: torch.Tensor) -> dict:
    t = t.detach().to("cpu").contiguous()
    raw = t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
    return {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "data": base64.b64encode(raw).decode()}


def decode_tensor(item: dict) -> tuple[str, torch.Tensor]:
    dtype = getattr(torch, item["dtype"])
    raw = bytearray(base64.b64decode(item["data"]))
    t = torch.frombuffer(raw, dtype=torch.uint8 if dtype == torch.bfloat16 else dtype)
    return item["name"], (t.view(torch.bfloat16) if dtype == torch.bfloat16 else t).reshape(item["shape"])


def sampling_params(p: dict) -> SamplingParams:
    """The /generate/ payload's sampling fields (TRL's names and defaults; top_k -1 = off); the other
    `generation_kwargs` travel on to vLLM's SamplingParams."""
    extra = dict(p.get("generation_kwargs") or {})
    stops = extra.pop("stop_token_ids", None) or []
    return SamplingParams(temperature=float(p.get("temperature", 1.0)), top_p=float(p.get("top_p", 1.0)),
                          top_k=max(int(p.get("top_k", -1)), 0), min_p=float(p.get("min_p", 0.0)),
                          repetition_penalty=float(p.get("repetition_penalty", 1.0)),
                          max_tokens=int(p.get("max_tokens", 16)), stop_token_ids=tuple(stops), extra=extra)


# ---------------------------------------------------------------- backends
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

        from .vllm_client import merged_weights

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


# ---------------------------------------------------------------- HTTP server
class GenerationServer:
    """Serves a backend over HTTP. Every request is recorded in `calls` (path, payload) for tests."""

    def __init__(self, backend: Backend, host: str = "127.0.0.1", port: int = 0):
        self.backend = backend
        self.calls: list[tuple[str, dict]] = []
        self.lock = threading.Lock()  # one backend call at a time: generation and weight loads never interleave
        routes = {"/generate/": self.generate, "/reset_prefix_cache/": self.reset_prefix_cache,
                  "/http_update_weights/": self.update_weights, "/v1/load_lora_adapter": self.load_lora,
                  "/set_lora_adapter/": self.load_lora, "/clear_lora_adapter/": self.clear_lora}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                server.calls.append((self.path, {}))
                if self.path == "/health/":
                    return self._reply(200, {"status": "ok"})
                if self.path == "/get_world_size/":
                    return self._reply(200, {"world_size": server.backend.world_size})
                return self._reply(404, {"error": f"no endpoint {self.path}"})

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                server.calls.append((self.path, payload))
                handler = routes.get(self.path)
                if handler is None:
                    return self._reply(404, {"error": f"no endpoint {self.path}"})
                try:
                    with server.lock:
                        return self._reply(200, handler(payload))
                except Exception as exc:  # noqa: BLE001 - reported to the client as a 500 with the cause
                    log.exception("%s failed", self.path)
                    return self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.host, self.port = self.httpd.server_address[:2]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        finally:
            self.httpd.server_close()

    # ---- endpoints
    def generate(self, p: dict) -> dict:
        prompts, n = p["prompts"], int(p.get("n", 1))
        if not all(isinstance(x, list) for x in prompts):
            raise TuneforgeError("prompts must be token-id lists (the trainer tokenizes with its chat template)")
        comp, logps = self.backend.generate(prompts, n, sampling_params(p))
        return {"prompt_ids": [list(x) for x in prompts for _ in range(n)], "completion_ids": comp,
                "logprobs": [[[lp] for lp in seq] for seq in logps],
                "logprob_token_ids": [[[t] for t in seq] for seq in comp]}

    def reset_prefix_cache(self, p: dict) -> dict:
        self.backend.reset_prefix_cache()
        return {}

    def update_weights(self, p: dict) -> dict:
        self.backend.load_weights([decode_tensor(item) for item in p["params"]])
        return {}

    def load_lora(self, p: dict) -> dict:
        self.backend.load_lora(p["lora_path"], p.get("lora_name", "tuneforge"), int(p.get("lora_int_id", 1)))
        return {}

    def clear_lora(self, p: dict) -> dict:
        self.backend.clear_lora()
        return {}


# ---------------------------------------------------------------- from a config
def backend_from_config(cfg, engine: str, *, colocate: bool = False) -> Backend:
    """The backend `tuneforge vllm-serve` (or colocate) runs for this config."""
    from tuneforge.models.tokenizer import load_tokenizer, model_source

    v = cfg.vllm
    if engine == "vllm":
        lora_rank = cfg.lora_r if cfg.adapter and cfg.trl and cfg.trl.vllm_lora_sync else None
        memory = (v.gpu_memory_utilization if v and "gpu_memory_utilization" in v.model_fields_set
                  else (0.3 if colocate else 0.9))  # TRL's colocate default leaves the GPU to training
        return VLLMBackend(str(model_source(cfg)), tensor_parallel_size=(v.tensor_parallel_size if v else None) or 1,
                           gpu_memory_utilization=memory, dtype=v.dtype if v else "auto",
                           max_model_len=v.max_model_len if v else None,
                           enable_prefix_caching=v.enable_prefix_caching if v else None,
                           enforce_eager=v.enforce_eager if v else None, max_lora_rank=lora_rank, seed=cfg.seed or 0,
                           sleep=colocate and bool(cfg.trl and cfg.trl.vllm_enable_sleep_mode))
    if engine == "embedded":
        from tuneforge.models.load import load_model

        tokenizer = load_tokenizer(cfg)
        model = load_model(cfg, tokenizer)
        if torch.cuda.is_available():
            model = model.to("cuda", dtype=torch.bfloat16)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return EmbeddedBackend(model, pad, copy_model=False, compile=cfg.torch_compile in (True, "auto"))
    raise TuneforgeError(f"unknown engine {engine!r}: use vllm or embedded")


def serve(cfg, engine: str = "vllm", host: str | None = None, port: int | None = None) -> None:
    """Start the server for this config and block (Ctrl-C stops it)."""
    backend = backend_from_config(cfg, engine)
    host = host or (cfg.vllm.host if cfg.vllm else "0.0.0.0")
    port = port if port is not None else (cfg.vllm.port if cfg.vllm else 8000)
    server = GenerationServer(backend, host, port)
    log.info("generation server (%s engine) listening on http://%s:%s", engine, server.host, server.port)
    print(f"tuneforge vllm-serve: {engine} engine on http://{server.host}:{server.port} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
