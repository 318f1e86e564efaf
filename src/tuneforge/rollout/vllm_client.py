"""EXPERIMENTAL: generation on a vLLM server (`trl.use_vllm: true`, `trl.vllm_mode: server`).

Speaks the HTTP protocol of TRL's `vllm-serve` with Axolotl's additions (docs/vllm.md):
`GET /health/`, `POST /generate/` (token-id prompts, `n`, sampling fields, `logprobs: 0`),
`POST /reset_prefix_cache/`, and two ways to sync weights that need no NCCL:
- LoRA (`trl.vllm_lora_sync: true` with an adapter): the adapter is saved to a temporary folder and
  loaded with `POST /v1/load_lora_adapter` (vLLM's native endpoint), falling back to Axolotl's
  `POST /set_lora_adapter/`;
- otherwise the merged weights go over `POST /http_update_weights/` (base64 tensors, chunked).
The NCCL endpoints (`/init_communicator/`, `/update_named_param/`) are not used.

`VLLMClient` is itself a `backends.Backend` (the same calls, over HTTP), so the sampler is the
colocate sampler plus a readiness wait. vLLM cannot be installed on the machines this was written on:
the client is tested against `tuneforge vllm-serve --engine embedded` (`generation_server.py`), which
serves the same endpoints. Treat the vLLM path as experimental until it has run against a real vLLM;
the embedded engine is the tested default.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request

import torch

from tuneforge.errors import TuneforgeError

from .backends import BackendSampler
from .base import SamplingParams
from .wire import encode_tensor, merged_weights  # noqa: F401 - merged_weights re-exported (it lived here)

log = logging.getLogger("tuneforge")
_CHUNK_BYTES = 10 * 1024 * 1024


class VLLMError(TuneforgeError):
    """The vLLM server cannot be reached or answered with an error."""


class VLLMClient:
    def __init__(self, host: str = "127.0.0.1", port: int = 8000, timeout: float = 240.0,
                 api_key: str | None = None):
        self.base = f"http://{host}:{port}"
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def _request(self, method: str, path: str, payload: dict | None = None, timeout: float | None = None) -> dict:
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            raise VLLMError(f"vLLM server {self.base}{path} answered {exc.code}: {exc.read()[:500]!r}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise VLLMError(f"cannot reach the vLLM server at {self.base} ({exc}). Start a server that speaks TRL's "
                            "`vllm-serve` protocol, or check trl.vllm_server_host/port.") from None
        return json.loads(body) if body else {}

    def wait_ready(self) -> None:
        """Poll /health/ until the server answers or `timeout` seconds pass (TRL's vllm_server_timeout)."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                if self._request("GET", "/health/", timeout=5).get("status") == "ok":
                    return
            except VLLMError:
                pass
            if time.monotonic() > deadline:
                raise VLLMError(f"the vLLM server at {self.base} was not ready within {self.timeout:.0f} s "
                                "(trl.vllm_server_timeout).")
            time.sleep(0.5)

    world_size = 1

    def request_generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> dict:
        payload = {"prompts": prompts, "n": n, "temperature": params.temperature, "top_p": params.top_p,
                   "top_k": params.top_k if params.top_k else -1, "min_p": params.min_p,
                   "repetition_penalty": params.repetition_penalty, "max_tokens": params.max_tokens, "logprobs": 0,
                   "generation_kwargs": {**params.extra, "stop_token_ids": list(params.stop_token_ids)}}
        return self._request("POST", "/generate/", payload)

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> tuple[list, list]:
        out = self.request_generate(prompts, n, params)
        comp = [list(c) for c in out["completion_ids"]]
        if len(comp) != len(prompts) * n:
            raise VLLMError(f"the vLLM server returned {len(comp)} completions for {len(prompts)} prompts x n={n}")
        return comp, [[float(tok[0]) for tok in seq] for seq in out["logprobs"]]

    def reset_prefix_cache(self) -> None:
        self._request("POST", "/reset_prefix_cache/", {})

    def load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """Send tensors over HTTP in chunks of about 10 MB (no NCCL group needed)."""
        batch, size = [], 0
        for name, t in named:
            batch.append(encode_tensor(name, t))
            size += t.numel() * t.element_size()
            if size >= _CHUNK_BYTES:
                self._request("POST", "/http_update_weights/", {"params": batch})
                batch, size = [], 0
        if batch:
            self._request("POST", "/http_update_weights/", {"params": batch})

    def load_lora(self, path: str, name: str, version: int) -> None:
        try:
            self._request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path, "load_inplace": True})
        except VLLMError:
            self._request("POST", "/set_lora_adapter/", {"lora_name": name, "lora_int_id": version, "lora_path": path,
                                                         "load_inplace": True})

    def clear_lora(self) -> None:
        self._request("POST", "/clear_lora_adapter/", {})


class VLLMServerSampler(BackendSampler):
    """The `Sampler` interface over a server: waits for /health/ once, then syncs and generates over HTTP."""

    def __init__(self, client: VLLMClient, *, lora_sync: bool = False):
        super().__init__(client, lora_sync=lora_sync)
        self.client = client
        self._ready = False

    @classmethod
    def from_config(cls, cfg, tokenizer) -> VLLMServerSampler:
        t = cfg.trl
        log.warning("trl.use_vllm is EXPERIMENTAL in tuneforge: its client is tested against tuneforge's own server")
        key = os.environ.get("TUNEFORGE_VLLM_API_KEY") or (cfg.vllm.api_key if cfg.vllm else None)
        client = VLLMClient(t.vllm_server_host or "127.0.0.1", t.vllm_server_port or 8000,
                            t.vllm_server_timeout or 240.0, api_key=key)
        return cls(client, lora_sync=bool(t.vllm_lora_sync) and bool(cfg.adapter))

    def _ensure_ready(self) -> None:
        if not self._ready:
            self.client.wait_ready()
            self._ready = True

    def sync_weights(self, model) -> None:
        """One process pushes the weights (they are identical on every data-parallel process); the others
        wait for it, so no process generates from a half-updated server. The push waits for every process
        (the first barrier), so none still generates there (trl.async_prefetch generates in the background)."""
        import torch.distributed as dist

        self._ensure_ready()
        several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if several:
            dist.barrier()
        if not several or dist.get_rank() == 0:
            super().sync_weights(model)
        if several:
            dist.barrier()

    def generate(self, prompt_ids, n, params):
        self._ensure_ready()
        rollout = super().generate(prompt_ids, n, params)
        rollout.meta["backend"] = "vllm-server"
        return rollout
