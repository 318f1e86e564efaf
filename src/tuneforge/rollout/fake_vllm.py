"""A stand-in for a vLLM server, for tests: the endpoints `VLLMClient` uses, served over real HTTP.

It generates with the embedded engine on its *own copy* of the model, so a test can check that weight
and LoRA syncs really reach the server (its log-probs then equal the trainer's). Every request is
recorded in `calls`. Not a vLLM emulation beyond the protocol: no batching, paging or TP.
"""

from __future__ import annotations

import base64
import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from .base import SamplingParams
from .embedded import EmbeddedSampler


class FakeVLLMServer:
    def __init__(self, model, pad_id: int = 0, host: str = "127.0.0.1", port: int = 0):
        self.base_model = copy.deepcopy(model).eval()
        self.model = self.base_model
        self.pad_id = pad_id
        self.calls: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
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
                    return self._reply(200, {"world_size": 1})
                return self._reply(404, {"error": self.path})

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                server.calls.append((self.path, payload))
                handler = {"/generate/": server.generate, "/reset_prefix_cache/": lambda p: {},
                           "/http_update_weights/": server.update_weights,
                           "/v1/load_lora_adapter": server.load_lora, "/set_lora_adapter/": server.load_lora}.get(self.path)
                if handler is None:
                    return self._reply(404, {"error": self.path})
                try:
                    with server.lock:
                        return self._reply(200, handler(payload))
                except Exception as exc:  # noqa: BLE001 - reported to the client as a 500
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

    # ---- endpoints
    def generate(self, p: dict) -> dict:
        params = SamplingParams(temperature=p["temperature"], top_p=p["top_p"], top_k=max(p["top_k"], 0),
                                min_p=p["min_p"], repetition_penalty=p["repetition_penalty"], max_tokens=p["max_tokens"],
                                stop_token_ids=tuple(p.get("generation_kwargs", {}).get("stop_token_ids", [])))
        r = EmbeddedSampler(self.model, self.pad_id).generate(p["prompts"], p["n"], params)
        return {"prompt_ids": [list(x) for x in p["prompts"] for _ in range(p["n"])],
                "completion_ids": r.completion_ids, "logprobs": [[[lp] for lp in seq] for seq in r.logprobs],
                "logprob_token_ids": [[[t] for t in seq] for seq in r.completion_ids]}

    @torch.no_grad()
    def update_weights(self, p: dict) -> dict:
        state = self.base_model.state_dict()
        for item in p["params"]:
            dtype = getattr(torch, item["dtype"])
            raw = bytearray(base64.b64decode(item["data"]))
            t = torch.frombuffer(raw, dtype=torch.uint8 if dtype == torch.bfloat16 else dtype)
            t = (t.view(torch.bfloat16) if dtype == torch.bfloat16 else t).reshape(item["shape"])
            if item["name"] not in state:
                raise KeyError(f"unknown parameter {item['name']}")
            state[item["name"]].copy_(t)
        self.model = self.base_model
        return {}

    def load_lora(self, p: dict) -> dict:
        from peft import PeftModel

        self.model = PeftModel.from_pretrained(copy.deepcopy(self.base_model), p["lora_path"]).eval()
        return {}
