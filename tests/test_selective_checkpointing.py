"""`selective_checkpointing` (Axolotl's key): with gradient checkpointing, the attention kernels' outputs are kept
from the forward, so the backward's recompute runs every op of a layer except attention; the gradients are those
of plain checkpointing. Hybrid models recompute their sliding-window layers' attention unless told otherwise."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from config_support import issues_of, load_text
from test_engine_support import losses, make_config, make_rows, one_thread, train  # noqa: F401
from tuneforge.models.load import enable_gradient_checkpointing
from tuneforge.models.selective_checkpointing import is_attention

BASE = "gradient_checkpointing: true\n"


class AttentionCalls(TorchDispatchMode):
    """Counts the attention kernels that run while it is active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += is_attention(func.name())
        return func(*args, **(kwargs or {}))


def _model(layer_types=None):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         layer_types=layer_types, use_sliding_window=bool(layer_types), sliding_window=4,
                         attn_implementation="sdpa")
    return AutoModelForCausalLM.from_config(config).train()


def _backward(tmp_path, text: str, layer_types=None) -> tuple[int, dict[str, torch.Tensor]]:
    """Attention kernels run in the backward, and the gradients, for a 4-layer model checkpointed per `text`."""
    cfg = load_text(tmp_path, BASE + text)
    model = _model(layer_types)
    enable_gradient_checkpointing(cfg, model)  # transformers' checkpointing with checkpoint_kwargs(cfg, model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    with AttentionCalls() as calls:
        loss.backward()
    return calls.count, {n: p.grad.clone() for n, p in model.named_parameters()}


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_kept_attention_is_not_recomputed_and_the_gradients_are_unchanged(tmp_path):
    plain_calls, plain = _backward(tmp_path, "")
    kept_calls, kept = _backward(tmp_path, "selective_checkpointing: true\n")
    assert plain_calls == 4  # one attention forward per layer recomputed (the backward kernels do not count)
    assert kept_calls == 0
    _same(kept, plain)


def test_extra_ops_by_name(tmp_path):
    _, plain = _backward(tmp_path, "")
    calls, kept = _backward(tmp_path, "selective_checkpointing:\n  save: [attention, aten::mm]\n")
    assert calls == 0
    _same(kept, plain)


def test_hybrid_models_recompute_sliding_window_attention(tmp_path):
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    _, plain = _backward(tmp_path, "", types)
    calls, kept = _backward(tmp_path, "selective_checkpointing: true\n", types)
    assert calls == 2  # the two sliding-window layers
    _same(kept, plain)
    calls, _ = _backward(tmp_path, "selective_checkpointing:\n  save_sliding_window: true\n", types)
    assert calls == 0
    calls, _ = _backward(tmp_path, "selective_checkpointing:\n  recompute_layer_types: [full_attention]\n", types)
    assert calls == 2


def test_training_with_it_gives_the_same_losses(tmp_path, tiny_model_dir, caplog):
    rows = make_rows(n=8, seed=6)
    run = {"max_steps": 2, "micro_batch_size": 2, "bf16": False, "gradient_checkpointing": True}
    plain = train(make_config(tmp_path / "plain", tiny_model_dir, rows, **run))
    caplog.set_level("INFO", logger="tuneforge")
    kept = train(make_config(tmp_path / "kept", tiny_model_dir, rows, selective_checkpointing=True, **run))
    assert losses(kept) == losses(plain)
    assert any("selective_checkpointing: keeping the outputs of aten::" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("text", "key", "fix"), [
    ("selective_checkpointing: true\n", "selective_checkpointing", "gradient_checkpointing: true"),
    (BASE + "selective_checkpointing: true\ntorch_compile: true\n", "torch_compile", "torch_compile: false"),
    (BASE + "selective_checkpointing: true\ngradient_checkpointing_kwargs: {use_reentrant: true}\n",
     "gradient_checkpointing_kwargs", "remove use_reentrant"),
    (BASE + "selective_checkpointing:\n  offload: true\n", "selective_checkpointing.offload", "remove it"),
])
def test_combinations_it_cannot_serve_are_refused(tmp_path, text, key, fix):
    (issue,) = issues_of(tmp_path, text)
    assert issue.path == key and fix in issue.message


def test_auto_compile_trains_eagerly_with_it():
    from tuneforge.models.compile_setup import choose

    choice = choose("auto", cuda=True, parameters=8 * 10**9, max_steps=None, strided_ebft=False,
                    selective_checkpointing=True)
    assert not choice.compile and "selective_checkpointing" in choice.reason


# ---------------------------------------------------------------- gradient_checkpointing_layers
def _layer_runs(tmp_path, text: str) -> tuple[list[int], dict[str, torch.Tensor]]:
    """How often each decoder layer of a 4-layer model runs in one forward + backward, and the gradients."""
    cfg = load_text(tmp_path, text)
    model = _model()
    enable_gradient_checkpointing(cfg, model)
    runs = [0] * 4
    for i, layer in enumerate(model.model.layers):  # an inner module: the recompute reruns the layer's forward
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    return runs, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_only_the_first_n_layers_are_recomputed_and_the_gradients_are_unchanged(tmp_path):
    every, reference = _layer_runs(tmp_path, BASE)
    assert every == [2, 2, 2, 2]  # each layer runs again in the backward
    for n in range(5):
        runs, grads = _layer_runs(tmp_path, BASE + f"gradient_checkpointing_layers: {n}\n")
        assert runs == [2] * n + [1] * (4 - n)
        _same(grads, reference)


def test_training_with_fewer_checkpointed_layers_gives_the_same_losses(tmp_path, tiny_model_dir):
    rows = make_rows(n=8, seed=6)
    run = {"max_steps": 2, "micro_batch_size": 2, "bf16": False, "gradient_checkpointing": True}
    every = train(make_config(tmp_path / "every", tiny_model_dir, rows, **run))
    part = train(make_config(tmp_path / "part", tiny_model_dir, rows, gradient_checkpointing_layers=1, **run))
    assert losses(part) == pytest.approx(losses(every), abs=1e-6)
    flags = [layer.gradient_checkpointing for layer in part.model.model.layers]
    assert flags[0] and not any(flags[1:])


def test_checkpointed_layers_key_errors(tmp_path, tiny_model_dir):
    from tuneforge.errors import ModelError
    from tuneforge.models.selective_checkpointing import limit_layers

    (issue,) = issues_of(tmp_path, "gradient_checkpointing_layers: 2\n")
    assert issue.path == "gradient_checkpointing_layers" and "gradient_checkpointing: true" in issue.message
    (issue,) = issues_of(tmp_path, BASE + "gradient_checkpointing_layers: -1\n")
    assert issue.path == "gradient_checkpointing_layers"
    with pytest.raises(ModelError, match="gradient_checkpointing_layers: 9, but the model has 4 decoder layers"):
        limit_layers(load_text(tmp_path, BASE + "gradient_checkpointing_layers: 9\n"), _model())
