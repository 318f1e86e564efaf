"""Final outputs load in the ecosystem (transformers, PEFT) and reproduce the trained model's logits."""

from __future__ import annotations

import struct

import pytest
import torch
import yaml

from test_engine_support import make_config, make_rows, one_thread, train  # noqa: F401
from tuneforge.config import dump, load

IDS = torch.tensor([[5, 17, 300, 42, 8, 99, 250, 3]])


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def test_full_model_reloads_with_transformers(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = make_config(tmp_path, tiny_model_dir, max_steps=3, val_set_size=4, chat_template="chatml")
    result = train(cfg)
    out = tmp_path / "out"
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "config.yaml",
                 "README.md", "metrics.jsonl"):
        assert (out / name).exists(), name
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    trained = _logits(result.model)
    assert torch.equal(_logits(reloaded), trained)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert not torch.allclose(_logits(base), trained)  # training changed the model
    tok = AutoTokenizer.from_pretrained(str(out))
    assert "<|im_start|>" in tok.chat_template  # the template used in training travels with the model
    # the saved config is the resolved one, and loads back to the same values
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert dump(load(data=saved)) == dump(cfg)
    card = (out / "README.md").read_text()
    assert f"{result.eval_metrics['eval_loss']:.4f}" in card and "```yaml" in card and str(tiny_model_dir) in card


def test_adapter_reloads_with_peft(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = make_config(tmp_path, tiny_model_dir, max_steps=3, adapter="lora", lora_r=4, lora_alpha=16,
                      lora_target_linear=True, learning_rate=1e-2)
    result = train(cfg)
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    assert not (out / "model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(out))
    trained = _logits(result.model)
    assert torch.allclose(_logits(reloaded), trained, atol=1e-6)
    with reloaded.disable_adapter():
        assert not torch.allclose(_logits(reloaded), trained, atol=1e-4)  # the adapter matters


def test_adapter_on_a_random_base_ships_the_base(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = make_config(tmp_path, tiny_model_dir, max_steps=2, adapter="lora", lora_target_linear=True,
                      reinit_weights=True)
    result = train(cfg)
    out = tmp_path / "out"
    base = AutoModelForCausalLM.from_pretrained(str(out / "base_model"))
    reloaded = PeftModel.from_pretrained(base, str(out))
    assert torch.allclose(_logits(reloaded), _logits(result.model), atol=1e-6)
    assert yaml.safe_load((out / "adapter_config.json").read_text())["base_model_name_or_path"].endswith("base_model")


def test_metrics_file_and_plot(tmp_path, tiny_model_dir):
    import json

    cfg = make_config(tmp_path, tiny_model_dir, rows=make_rows(20), max_steps=4, val_set_size=4, eval_steps=2,
                      logging_steps=2)
    result = train(cfg)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert records == result.history
    train_rows = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in train_rows] == [2, 4] and [r["step"] for r in evals] == [2, 4]
    for key in ("epoch", "loss", "lr", "grad_norm", "tokens", "trained_tokens", "tokens_per_second", "total_tokens"):
        assert key in train_rows[0], key
    assert train_rows[-1]["total_tokens"] == result.state.tokens_seen
    assert set(evals[0]) >= {"eval_loss", "eval_perplexity", "eval_accuracy", "eval_token_accuracy"}
    assert evals[0]["eval_perplexity"] == pytest.approx(torch.exp(torch.tensor(evals[0]["eval_loss"])).item(), rel=1e-5)
    png = (tmp_path / "out" / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 100 and height > 100


def test_merge_lora_key_writes_a_merged_model_with_the_adapter_logits(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    cfg = make_config(tmp_path, tiny_model_dir, max_steps=3, adapter="lora", lora_r=4, lora_alpha=16,
                      lora_target_linear=True, learning_rate=1e-2, merge_lora=True)
    result = train(cfg)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "merged"))
    trained = _logits(result.model)
    torch.testing.assert_close(_logits(merged), trained, rtol=1e-4, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert not torch.allclose(_logits(base), trained, atol=1e-4)  # the merge carries the trained update
