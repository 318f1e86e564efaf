"""`tuneforge vllm-serve`: a generation server that speaks TRL's `vllm-serve` HTTP protocol.

The trainer (`trl.use_vllm: true`, `vllm_mode: server`, `rollout/vllm_client.py`) talks to it over
these endpoints (TRL's `trl vllm-serve` server; docs/vllm.md): `GET /health/`, `GET /get_world_size/`, `POST /generate/`,
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

import collections
import hmac
import json
import logging
import os
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from tuneforge.errors import TuneforgeError

# Re-exported: the backends and the wire format lived here (tests and methods/grpo.py import them from here).
from .backends import Backend, BackendSampler, EmbeddedBackend, VLLMBackend, WeightLoader, finished_flags  # noqa: F401
from .wire import decode_tensor, encode_tensor, sampling_params  # noqa: F401

log = logging.getLogger("tuneforge")


# ---------------------------------------------------------------- HTTP server
TOKEN_ENV = "TUNEFORGE_VLLM_API_KEY"
MAX_BODY_BYTES = 4 * 2**30  # one tensor of a large embedding, base64-encoded, fits


def _summary(payload: dict) -> dict:
    """What `calls` keeps of a request: its small fields, never prompts or tensors (a weight sync of a real
    model is gigabytes; a server that kept bodies grew by that much per sync)."""
    out = {k: v for k, v in payload.items() if k not in ("prompts", "params")}
    if "prompts" in payload:
        out["num_prompts"] = len(payload["prompts"])
    if "params" in payload:
        out["num_tensors"] = len(payload["params"])
    return out


class GenerationServer:
    """Serves a backend over HTTP.

    Exposure: bind 127.0.0.1 unless told otherwise; with `token`, every endpoint but /health/ needs
    `Authorization: Bearer <token>`; LoRA adapters load only from folders under `adapter_roots` (default: the
    system temp folder, where the trainer's LoRA sync writes). `calls` records the last requests' paths and
    small fields (for tests and debugging), never their bodies.
    """

    def __init__(self, backend: Backend, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None,
                 adapter_roots: list[str] | None = None):
        self.backend = backend
        self.calls: collections.deque[tuple[str, dict]] = collections.deque(maxlen=256)
        self.token = token or None
        self.adapter_roots = [os.path.realpath(r) for r in (adapter_roots or [tempfile.gettempdir()])]
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

            def _authorized(self) -> bool:
                if server.token is None or self.path == "/health/":
                    return True
                given = self.headers.get("Authorization", "")
                if hmac.compare_digest(given.encode(), f"Bearer {server.token}".encode()):
                    return True
                self._reply(401, {"error": "missing or wrong bearer token (vllm.api_key / " + TOKEN_ENV + ")"})
                return False

            def do_GET(self):
                server.calls.append((self.path, {}))
                if not self._authorized():
                    return None
                if self.path == "/health/":
                    return self._reply(200, {"status": "ok"})
                if self.path == "/get_world_size/":
                    return self._reply(200, {"world_size": server.backend.world_size})
                return self._reply(404, {"error": f"no endpoint {self.path}"})

            def do_POST(self):
                if not self._authorized():
                    return None
                handler = routes.get(self.path)
                if handler is None:
                    return self._reply(404, {"error": f"no endpoint {self.path}"})
                try:
                    length = int(self.headers.get("Content-Length", 0))
                    if not 0 <= length <= MAX_BODY_BYTES:
                        return self._reply(413, {"error": f"request body over {MAX_BODY_BYTES} bytes"})
                    payload = json.loads(self.rfile.read(length) or b"{}")
                    if not isinstance(payload, dict):
                        raise ValueError("the body must be a JSON object")
                except ValueError as exc:
                    return self._reply(400, {"error": f"bad request: {exc}"})
                server.calls.append((self.path, _summary(payload)))
                try:
                    with server.lock:
                        return self._reply(200, handler(payload))
                except PermissionError as exc:
                    return self._reply(403, {"error": str(exc)})
                except Exception as exc:  # noqa: BLE001 - reported to the client as a 500 with the cause
                    log.exception("%s failed", self.path)
                    return self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})
                finally:
                    del payload  # the body is not kept past the call

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
        path = os.path.realpath(str(p["lora_path"]))
        if not any(os.path.commonpath([path, root]) == root for root in self.adapter_roots):
            raise PermissionError(f"adapter path {p['lora_path']} is outside the folders this server loads adapters "
                                  f"from ({', '.join(self.adapter_roots)}; vllm.adapter_roots)")
        self.backend.load_lora(path, p.get("lora_name", "tuneforge"), int(p.get("lora_int_id", 1)))
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
    v = cfg.vllm
    host = host or (v.host if v else "127.0.0.1")
    port = port if port is not None else (v.port if v else 8000)
    token = os.environ.get(TOKEN_ENV) or (v.api_key if v else None)
    roots = [str(cfg.resolve_path(r) or r) for r in (v.adapter_roots or [])] if v else []
    server = GenerationServer(backend, host, port, token=token, adapter_roots=roots or None)
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        log.warning("vllm-serve listens on %s without a token: anyone who can reach this port can replace the "
                    "served weights. Set vllm.api_key (or %s) on both sides.", host, TOKEN_ENV)
    log.info("generation server (%s engine) listening on http://%s:%s", engine, server.host, server.port)
    print(f"tuneforge vllm-serve: {engine} engine on http://{server.host}:{server.port} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
