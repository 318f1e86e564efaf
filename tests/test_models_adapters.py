"""LoRA adapters through PEFT: targets, scaling, variants, continuing from lora_model_dir."""

from __future__ import annotations

import math

import pytest
import torch

from tuneforge.config import load
from tuneforge.errors import ModelError
from tuneforge.models.adapters import apply_adapter, linear_module_names


def _model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))


def _cfg(tiny_model_dir, **keys):
    return load(data={"base_model": str(tiny_model_dir), "adapter": "lora", **keys})


def _lora_layers(model) -> dict[str, object]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {}))}


def test_target_linear_covers_every_block_linear_but_not_the_head(tiny_model_dir):
    base = _model(tiny_model_dir)
    assert linear_module_names(base) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    model = apply_adapter(_cfg(tiny_model_dir, lora_target_linear=True, lora_r=4, lora_alpha=8), base)
    layers = _lora_layers(model)
    blocks = [n for n, m in _model(tiny_model_dir).named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    assert len(layers) == len(blocks) == 2 * 7
    assert not any("lm_head" in n for n in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    q = next(m for n, m in layers.items() if n.endswith("q_proj"))
    assert q.scaling["default"] == 8 / 4 and q.lora_A["default"].weight.dtype == torch.float32


def test_listed_targets_rank_patterns_rslora_dora(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, lora_target_modules=["q_proj", "v_proj"], lora_r=4, lora_alpha=16, peft_use_rslora=True,
               lora_rank_pattern={"v_proj": 2})
    model = apply_adapter(cfg, _model(tiny_model_dir))
    layers = _lora_layers(model)
    assert {n.rsplit(".", 1)[-1] for n in layers} == {"q_proj", "v_proj"}
    q = next(m for n, m in layers.items() if n.endswith("q_proj"))
    v = next(m for n, m in layers.items() if n.endswith("v_proj"))
    assert q.scaling["default"] == pytest.approx(16 / math.sqrt(4))
    assert v.lora_A["default"].weight.shape[0] == 2
    dora = apply_adapter(_cfg(tiny_model_dir, lora_target_modules=["q_proj"], peft_use_dora=True), _model(tiny_model_dir))
    assert any("lora_magnitude_vector" in n for n, _ in dora.named_parameters())


def test_modules_to_save_are_trained_in_full(tiny_model_dir):
    model = apply_adapter(_cfg(tiny_model_dir, lora_target_modules=["q_proj"], lora_modules_to_save=["lm_head"]),
                          _model(tiny_model_dir))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lm_head.modules_to_save" in n for n in trainable)


def test_unknown_targets_are_clear(tiny_model_dir):
    with pytest.raises(ModelError, match="q_proj"):
        apply_adapter(_cfg(tiny_model_dir, lora_target_modules=["query_key_value"]), _model(tiny_model_dir))


def test_continue_from_lora_model_dir_is_trainable_and_identical(tmp_path, tiny_model_dir):
    first = apply_adapter(_cfg(tiny_model_dir, lora_target_linear=True, peft_init_lora_weights="gaussian"),
                          _model(tiny_model_dir))
    first.save_pretrained(str(tmp_path / "adapter"))
    again = apply_adapter(_cfg(tiny_model_dir, lora_model_dir=str(tmp_path / "adapter")), _model(tiny_model_dir))
    a = {n: p for n, p in first.named_parameters() if "lora_" in n}
    b = {n: p for n, p in again.named_parameters() if "lora_" in n}
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert all(p.requires_grad for p in b.values())
    with pytest.raises(ModelError, match="no adapter_config.json"):
        apply_adapter(_cfg(tiny_model_dir, lora_model_dir=str(tmp_path)), _model(tiny_model_dir))


def test_no_adapter_means_full_finetuning(tiny_model_dir):
    base = _model(tiny_model_dir)
    assert apply_adapter(load(data={"base_model": "x"}), base) is base


@pytest.mark.parametrize(("dtype", "setting", "unquantized"), [
    (torch.bfloat16, None, torch.bfloat16),   # the default keeps bf16 weights bf16, as LoRA does
    (torch.bfloat16, True, torch.float32),    # PEFT's preparation: every unquantized weight in fp32
    (torch.float16, None, torch.float32),     # fp16 norms can overflow: upcast by default
    (torch.float16, False, torch.float16),
])
def test_kbit_preparation_casts_the_unquantized_weights_only_when_asked(tmp_path, dtype, setting, unquantized):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tuneforge.tiny import tiny_llama_config

    torch.manual_seed(0)
    config = tiny_llama_config(300, hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256)
    AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(tmp_path)  # bitsandbytes: blocks of 64
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=dtype, quantization_config=quant)
    keys = {} if setting is None else {"kbit_fp32_unquantized": setting}
    cfg = load(data={"base_model": str(tmp_path), "adapter": "qlora", "load_in_4bit": True,
                     "lora_target_linear": True, "gradient_checkpointing": True, **keys})
    model = apply_adapter(cfg, model)
    base = model.get_base_model()
    assert base.model.norm.weight.dtype == unquantized
    assert base.model.embed_tokens.weight.dtype == unquantized
    assert base.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.uint8  # still NF4
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    ids = torch.randint(0, 300, (1, 16))
    with torch.autocast("cpu", dtype=dtype):
        model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
