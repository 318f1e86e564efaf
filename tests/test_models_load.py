"""Model loading: sources, overrides, embeddings, freezing, precision, and clear errors."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

from tuneforge.config import load
from tuneforge.errors import ModelError
from tuneforge.models.load import load_model, mixed_precision, weights_dtype


def _cfg(tmp_path, **keys):
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(keys))
    return load(path)


def test_loads_weights_from_a_local_folder(tmp_path, tiny_model_dir, tiny_tokenizer):
    from safetensors.torch import load_file

    model = load_model(_cfg(tmp_path, base_model=str(tiny_model_dir)), tiny_tokenizer)
    saved = load_file(str(tiny_model_dir / "model.safetensors"))
    assert torch.equal(model.state_dict()["model.layers.1.mlp.up_proj.weight"], saved["model.layers.1.mlp.up_proj.weight"])
    assert model.config._attn_implementation == "sdpa" and model.config.use_cache is False
    assert next(model.parameters()).dtype == torch.float32  # fp32 master weights for a full fine-tune


def test_relative_base_model_is_found_next_to_the_config(tmp_path, tiny_model_dir, tiny_tokenizer):
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny")
    model = load_model(_cfg(tmp_path, base_model="models/tiny", attn_implementation="eager"), tiny_tokenizer)
    assert model.config._attn_implementation == "eager"


def test_config_overrides_reinit_and_seed(tmp_path, tiny_model_dir, tiny_tokenizer):
    cfg = _cfg(tmp_path, base_model=str(tiny_model_dir), reinit_weights=True,
               model_config={"num_hidden_layers": 1, "rope_parameters": {"rope_theta": 5000.0}})
    torch.manual_seed(1)
    a = load_model(cfg, tiny_tokenizer)
    torch.manual_seed(1)
    b = load_model(cfg, tiny_tokenizer)
    assert len(a.model.layers) == 1 and a.config.rope_parameters["rope_theta"] == 5000.0
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)  # seeded random init is reproducible
    from safetensors.torch import load_file

    saved = load_file(str(tiny_model_dir / "model.safetensors"))
    assert not torch.equal(a.lm_head.weight, saved["lm_head.weight"])


def test_added_tokens_resize_embeddings(tmp_path, tiny_model_dir):
    from tuneforge.models.tokenizer import load_tokenizer

    cfg = _cfg(tmp_path, base_model=str(tiny_model_dir), tokens=["<new_a>", "<new_b>"])
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == model.lm_head.weight.shape[0]
    lora = _cfg(tmp_path, base_model=str(tiny_model_dir), tokens=["<new_a>"], adapter="lora", lora_target_linear=True)
    with pytest.raises(ModelError, match="lora_modules_to_save: \\['embed_tokens', 'lm_head'\\]"):
        load_model(lora, load_tokenizer(lora))


def test_unfrozen_parameters(tmp_path, tiny_model_dir, tiny_tokenizer):
    model = load_model(_cfg(tmp_path, base_model=str(tiny_model_dir), unfrozen_parameters=[r"layers\.1\.", "lm_head"]),
                       tiny_tokenizer)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".layers.1." in n or n.startswith("lm_head") for n in trained)
    assert "lm_head.weight" in trained and "model.layers.0.mlp.up_proj.weight" not in trained
    with pytest.raises(ModelError, match="match no parameter"):
        load_model(_cfg(tmp_path, base_model=str(tiny_model_dir), unfrozen_parameters=["nothing_like_this"]),
                   tiny_tokenizer)


def test_missing_folder_and_unknown_hub_id(tmp_path, tiny_tokenizer):
    with pytest.raises(ModelError, match="model folder not found: .*/nowhere/model"):
        load_model(_cfg(tmp_path, base_model=str(tmp_path / "nowhere" / "model")), tiny_tokenizer)
    with pytest.raises(ModelError, match="not a local folder and the hub is unreachable"):
        load_model(_cfg(tmp_path, base_model="some-org/no-such-model"), tiny_tokenizer)


def test_config_only_folder_needs_reinit(tmp_path, tiny_model_dir, tiny_tokenizer):
    folder = tmp_path / "cfg-only"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder / "config.json")
    with pytest.raises(ModelError, match="reinit_weights: true"):
        load_model(_cfg(tmp_path, base_model=str(folder)), tiny_tokenizer)
    assert load_model(_cfg(tmp_path, base_model=str(folder), reinit_weights=True), tiny_tokenizer) is not None


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_attention_missing_names_alternatives(tmp_path, tiny_model_dir, tiny_tokenizer):
    with pytest.raises(ModelError, match="flash-attn.*sdpa.*flex_attention"):
        load_model(_cfg(tmp_path, base_model=str(tiny_model_dir), attn_implementation="flash_attention_2"),
                   tiny_tokenizer)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_quantization_on_cpu_is_clear(tmp_path, tiny_model_dir, tiny_tokenizer):
    cfg = _cfg(tmp_path, base_model=str(tiny_model_dir), adapter="qlora", load_in_4bit=True, lora_target_linear=True)
    with pytest.raises(ModelError, match="load_in_4bit: true` needs a CUDA GPU"):
        load_model(cfg, tiny_tokenizer)


def test_precision_policy(tmp_path):
    full = _cfg(tmp_path, base_model="x")
    assert weights_dtype(full) == torch.float32
    assert weights_dtype(_cfg(tmp_path, base_model="x", torch_dtype="bfloat16")) == torch.bfloat16
    if not torch.cuda.is_available():
        assert mixed_precision(full) == "no"  # bf16: auto is off on CPU
        assert mixed_precision(_cfg(tmp_path, base_model="x", bf16=True)) == "bf16"
        with pytest.raises(ModelError, match="fp16: true` needs a CUDA GPU"):
            mixed_precision(_cfg(tmp_path, base_model="x", fp16=True, bf16=False))
        bf16_lora = _cfg(tmp_path, base_model="x", bf16=True, adapter="lora", lora_target_linear=True)
        assert weights_dtype(bf16_lora) == torch.bfloat16  # frozen base in half precision under an adapter


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, tiny_model_dir, tiny_tokenizer):
    from tuneforge.data.collate import collate
    from tuneforge.models.losses import causal_lm_token_loss

    docs = [{"input_ids": list(range(5, 25)), "labels": [-100] * 4 + list(range(9, 25))},
            {"input_ids": list(range(40, 52)), "labels": list(range(40, 52))}]
    batch = collate([docs], pad_id=0)  # one packed row
    grads = []
    for gc in (False, True):
        model = load_model(_cfg(tmp_path, base_model=str(tiny_model_dir), gradient_checkpointing=gc), tiny_tokenizer)
        model.train()
        assert model.is_gradient_checkpointing == gc
        causal_lm_token_loss(model, batch).loss_sum.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_embedding_rows_to_32x_shrunk_and_mean_resized(tmp_path, tiny_model_dir, monkeypatch):
    from tuneforge.models.tokenizer import load_tokenizer

    cfg = _cfg(tmp_path, base_model=str(tiny_model_dir), tokens=["<new_a>"], resize_token_embeddings_to_32x=True)
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows % 32 == 0 and len(tok) <= rows < len(tok) + 32 and model.lm_head.weight.shape[0] == rows

    from tuneforge.models.load import resize_embeddings

    model.resize_token_embeddings(len(tok) + 40)  # more rows than tokens, as some checkpoints ship
    keep = _cfg(tmp_path, base_model=str(tiny_model_dir))
    assert not resize_embeddings(keep, model, tok) and model.get_input_embeddings().weight.shape[0] == len(tok) + 40
    shrink = _cfg(tmp_path, base_model=str(tiny_model_dir), shrink_embeddings=True)
    assert resize_embeddings(shrink, model, tok) and model.get_input_embeddings().weight.shape[0] == len(tok)

    seen = {}
    from transformers import PreTrainedModel

    original = PreTrainedModel.resize_token_embeddings
    monkeypatch.setattr(PreTrainedModel, "resize_token_embeddings",
                        lambda self, n, **kw: seen.update(kw) or original(self, n, **kw))
    mean = _cfg(tmp_path, base_model=str(tiny_model_dir), tokens=["<new_a>"], mean_resizing_embeddings=False)
    load_model(mean, load_tokenizer(mean))
    assert seen == {"mean_resizing": False}


def test_torch_compile_mode_reaches_the_blocks(tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch):
    from tuneforge.config.errors import ConfigError
    from tuneforge.models.compile_setup import compile_blocks

    model = load_model(_cfg(tmp_path, base_model=str(tiny_model_dir)), tiny_tokenizer)
    modes = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # compile_blocks compiles on CUDA only
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: modes.append(kw.get("mode")))
    monkeypatch.setattr("tuneforge.models.losses.compile_loss", lambda **kw: None)
    for mode, expected in (("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"), ("default", None)):
        cfg = _cfg(tmp_path, base_model=str(tiny_model_dir), torch_compile=True, torch_compile_mode=mode)
        modes.clear()
        assert compile_blocks(cfg, model) == len(modes) == 2
        assert set(modes) == {expected}
    with pytest.raises(ConfigError, match="reduce-overhead captures CUDA graphs"):
        _cfg(tmp_path, base_model=str(tiny_model_dir), torch_compile_mode="reduce-overhead")
