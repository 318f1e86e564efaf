"""Issue 20, item 11: `vllm-serve`'s exposure. It binds 127.0.0.1 by default, takes an optional bearer token
(the trainer's client sends it), loads adapters only from configured roots, keeps no request bodies; and
generation_server.py / vllm_client.py no longer import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from test_rollout_vllm_client import _perturbed, model  # noqa: F401 - the fixture
from tuneforge.rollout.base import SamplingParams
from tuneforge.rollout.generation_server import EmbeddedBackend, GenerationServer
from tuneforge.rollout.vllm_client import VLLMClient, VLLMError, VLLMServerSampler

ROLLOUT = Path(__file__).resolve().parents[1] / "src" / "tuneforge" / "rollout"


def test_the_server_binds_this_machine_only_by_default(write_config):
    from tuneforge.config import load

    cfg = load(write_config({"vllm": {"port": 8123}}))
    assert cfg.vllm.host == "127.0.0.1"


def test_a_token_is_required_when_set(model):  # noqa: F811
    with GenerationServer(EmbeddedBackend(model), token="s3cret") as server:
        anonymous = VLLMClient(server.host, server.port, timeout=10)
        anonymous.wait_ready()  # /health/ stays open for probes
        with pytest.raises(VLLMError) as err:
            anonymous.generate([[5, 6]], 1, SamplingParams(max_tokens=2))
        assert "answered 401" in str(err.value) and "missing or wrong bearer token" in str(err.value)
        wrong = VLLMClient(server.host, server.port, timeout=10, api_key="guess")
        with pytest.raises(VLLMError, match="answered 401"):
            wrong.load_weights([("model.norm.weight", torch.zeros(4))])
        comp, _ = VLLMClient(server.host, server.port, timeout=10, api_key="s3cret").generate(
            [[5, 6]], 2, SamplingParams(max_tokens=2))
        assert len(comp) == 2


def test_adapters_load_only_from_the_configured_roots(model, tmp_path):  # noqa: F811
    outside = tmp_path / "elsewhere" / "adapter"
    with GenerationServer(EmbeddedBackend(model), adapter_roots=[str(tmp_path / "allowed")]) as server:
        client = VLLMClient(server.host, server.port, timeout=10)
        for path in (outside, tmp_path / "allowed" / ".." / "elsewhere" / "adapter"):
            with pytest.raises(VLLMError) as err:
                client._request("POST", "/set_lora_adapter/", {"lora_name": "x", "lora_path": str(path)})
            assert "answered 403" in str(err.value)
            assert "is outside the folders this server loads adapters from" in str(err.value)


def test_no_request_body_is_kept(model):  # noqa: F811
    policy = _perturbed(model)
    with GenerationServer(EmbeddedBackend(model)) as server:
        sampler = VLLMServerSampler(VLLMClient(server.host, server.port, timeout=10))
        sampler.sync_weights(policy)
        sampler.generate([[5, 6, 7]], 2, SamplingParams(max_tokens=3))
        bodies = [body for _, body in server.calls]
        assert server.calls.maxlen == 256
    assert all("params" not in b and "prompts" not in b for b in bodies)
    update = next(b for p, b in server.calls if p == "/http_update_weights/")
    assert update["num_tensors"] >= 1
    assert next(b for p, b in server.calls if p == "/generate/")["num_prompts"] == 1


def _imports(file: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_server_and_client_do_not_import_each_other_and_stay_small():
    server, client = _imports(ROLLOUT / "generation_server.py"), _imports(ROLLOUT / "vllm_client.py")
    assert not {".vllm_client", "tuneforge.rollout.vllm_client"} & server
    assert not {".generation_server", "tuneforge.rollout.generation_server"} & client
    for name in ("generation_server.py", "vllm_client.py", "backends.py", "wire.py"):
        assert len((ROLLOUT / name).read_text().splitlines()) <= 450, name
