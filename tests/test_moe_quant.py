"""quantize_moe_experts: fused expert weights stored in NF4 (int8 with load_in_8bit), dequantized when read."""

from __future__ import annotations

import pytest
import torch

from test_engine_support import losses, make_config, make_rows, one_thread, train  # noqa: F401
from test_moe_lora import tiny_moe_dir  # noqa: F401 - the saved tiny Qwen3-MoE
from tuneforge.config import ConfigError, load
from tuneforge.models.moe_quant import (
    BLOCK,
    NF4_LEVELS,
    Codec,
    PackedExperts,
    quantize_moe_experts,
    round_trip_experts,
    storage_bytes,
)

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11, 64, 8, 120, 33], [9, 10, 11, 12, 400, 13, 14, 15, 16, 17, 18, 19]])


def _round_trip(w: torch.Tensor, bits: int = 4) -> torch.Tensor:
    codec = Codec(bits)
    return codec.dequantize(codec.quantize(w), tuple(w.shape), w.dtype)


def test_nf4_round_trip_error_is_bounded_by_half_the_level_gap():
    torch.manual_seed(0)
    levels = torch.tensor(NF4_LEVELS)
    exact = (levels.repeat(32) * 3.0).view(2, 4, 64)  # every block: the 16 levels x 3
    torch.testing.assert_close(_round_trip(exact), exact, rtol=0, atol=1e-6)  # the levels are exact

    w = torch.randn(3, 8, 128)
    err = (_round_trip(w) - w).abs().view(3, -1, BLOCK)
    absmax = w.abs().view(3, -1, BLOCK).amax(-1, keepdim=True)
    half_gap = (levels[1:] - levels[:-1]).max() / 2  # 0.1385, between 0.7230 and 1
    assert (err <= absmax * half_gap + 1e-6).all()
    assert 0.02 < (err / absmax).mean() < 0.06  # NF4's mean error on normal data; not a no-op
    err8 = (_round_trip(w, 8) - w).abs().view(3, -1, BLOCK)
    assert (err8 <= absmax / 254 + 1e-6).all() and err8.max() > 0


def test_nf4_codes_equal_torchaos():
    """The packed codes are torchao's `to_nf4` codes, except for values within 1e-4 of a decision boundary
    (torchao rounds the 16 levels to 4 digits)."""
    nf4_tensor = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    torch.manual_seed(1)
    w = torch.randn(4, 64, 64)  # 256 blocks: torchao double-quantizes the absmaxes in groups of 256
    ours = Codec(4).quantize(w)[:, : 64 * 64 // 2].flatten()
    theirs = nf4_tensor.to_nf4(w.reshape(4 * 64, 64), block_size=64, scaler_block_size=256).quantized_data.flatten()
    levels = torch.tensor(NF4_LEVELS)
    scaled = (w.view(-1, BLOCK) / w.view(-1, BLOCK).abs().amax(-1, keepdim=True)).flatten()
    near = ((scaled[:, None] - (levels[1:] + levels[:-1]) / 2).abs() < 1e-4).any(-1).view(-1, 2).any(-1)
    assert (ours == theirs)[~near].all() and near.float().mean() < 0.01


def _tiny(folder, impl="eager", dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), experts_implementation=impl, dtype=dtype)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_quantized_experts_are_stored_packed_and_give_the_round_trip_logits(tiny_moe_dir, impl):  # noqa: F811
    model, reference = _tiny(tiny_moe_dir, impl), _tiny(tiny_moe_dir, impl)
    before = storage_bytes(model)
    assert quantize_moe_experts(model) == 4  # 2 layers x (gate_up_proj, down_proj)
    experts = model.model.layers[0].mlp.experts
    packed = experts.parametrizations.gate_up_proj.original
    assert packed.dtype == torch.uint8 and packed.shape == (4, 64 * 64 // 2 + 64 * 64 // BLOCK * 4)
    # 4 experts x (64x64 + 64x32) values per layer: 4 bytes each before, 0.5 + 4/64 after
    values = 2 * 4 * (64 * 64 + 64 * 32)
    assert before - storage_bytes(model) == values * 4 - values * 9 // 16
    assert experts.gate_up_proj.dtype == torch.float32 and experts.gate_up_proj.shape == (4, 64, 64)

    with torch.no_grad():
        ours, original = model(IDS).logits, reference(IDS).logits
        round_trip_experts(reference)  # the 16-bit model with the NF4 values in its experts
        expected = reference(IDS).logits
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert 1e-4 < (ours - original).abs().max() < 0.05 * original.abs().max()  # NF4's error: small, not zero


def test_the_backward_rebuilds_the_experts_it_needs_and_gives_the_same_gradients(tiny_moe_dir, monkeypatch):  # noqa: F811
    """Views of a dequantized stack saved for the backward are rebuilt from the packed experts they cover;
    the gradients equal those of keeping the dequantized stacks."""
    calls = []
    dequantize = Codec.dequantize
    monkeypatch.setattr(Codec, "dequantize", lambda self, p, s, d: calls.append(p.shape[0]) or dequantize(self, p, s, d))
    grads = []
    for recompute in (True, False):
        model = _tiny(tiny_moe_dir)
        quantize_moe_experts(model, recompute_in_backward=recompute)
        model.model.embed_tokens.weight.requires_grad_(True)
        calls.clear()
        model(IDS).logits.pow(2).mean().backward()
        grads.append(model.model.embed_tokens.weight.grad)
        forward, backward = calls[:4], calls[4:]
        assert forward == [4, 4, 4, 4]  # one dequantization per stack and forward, not one per expert used
        if recompute:
            assert backward and set(backward) == {1}  # the eager loop's per-expert views: one expert each
        else:
            assert backward == []
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_lora_on_a_model_with_quantized_experts_learns_and_merges_into_the_nf4_experts(tmp_path, tiny_moe_dir):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge.merge import run as merge

    cfg = make_config(tmp_path, tiny_moe_dir, make_rows(n=32, seed=1), adapter="lora", lora_r=4, lora_alpha=8,
                      lora_target_linear=True, quantize_moe_experts=True, micro_batch_size=4, max_steps=12,
                      learning_rate=1e-2, save_strategy="no", logging_steps=1)
    result = train(cfg)
    trained = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trained and not any("experts" in n for n in trained)
    packed = [p for n, p in result.model.named_parameters() if n.endswith("gate_up_proj.original")]
    assert len(packed) == 2 and all(p.dtype == torch.uint8 for p in packed)
    seen = list(losses(result).values())
    assert sum(seen[-3:]) < sum(seen[:3]) - 0.1, seen  # it learned

    merged_dir = merge(cfg)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))(IDS).logits
        base = AutoModelForCausalLM.from_pretrained(str(tiny_moe_dir))
        quantize_moe_experts(base)  # the training model: quantized experts + the adapter
        expected = PeftModel.from_pretrained(base, str(tmp_path / "out"))(IDS).logits
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_moe_dir)),
                                          str(tmp_path / "out"))(IDS).logits
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    assert (merged - plain).abs().max() > 1e-4  # the 16-bit experts would give other logits

    from tuneforge.inference.load import load_for_generation

    model, _ = load_for_generation(cfg)  # `tuneforge inference`: the same quantized experts + adapter
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_config_accepts_the_axolotl_shapes_and_refuses_what_cannot_work():
    base = {"base_model": "x", "quantize_moe_experts": True, "lora_target_modules": ["q_proj", "v_proj"]}
    for keys in ({"adapter": "qlora", "load_in_4bit": True}, {"adapter": "lora", "load_in_8bit": True},
                 {"adapter": "lora"}, {"adapter": "qlora", "load_in_4bit": True, "lora_target_linear": True}):
        assert load(data={**base, **keys}).quantize_moe_experts
    with pytest.raises(ConfigError, match=r"quantize_moe_experts.*stay frozen.*adapter: qlora"):
        load(data={"base_model": "x", "quantize_moe_experts": True})
    with pytest.raises(ConfigError, match=r"lora_target_parameters.*quantize_moe_experts.*Remove"):
        load(data={**base, "adapter": "lora", "lora_target_parameters": ["mlp.experts.gate_up_proj"]})


def test_a_model_without_fused_experts_is_refused(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tuneforge.errors import ModelError
    from tuneforge.models.moe_quant import quantize_for_config

    cfg = load(data={"base_model": "x", "adapter": "lora", "lora_target_linear": True, "quantize_moe_experts": True})
    with pytest.raises(ModelError, match=r"no fused expert weights.*remove quantize_moe_experts"):
        quantize_for_config(cfg, AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)))


def test_peft_parameter_lora_does_not_compose_with_quantized_experts_yet(tiny_moe_dir):  # noqa: F811
    """Why lora_target_parameters is refused: PEFT's ParamWrapper leaves its LoRA parametrization on a parameter
    that is parametrized already (it removes only its unfolded proxy). When this test fails, PEFT handles it:
    lift the refusal in config/rules.py."""
    from peft import LoraConfig, get_peft_model

    model = _tiny(tiny_moe_dir)
    quantize_moe_experts(model)
    names = [f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")]
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=[], target_parameters=names, lora_dropout=0.0))
    with pytest.warns(UserWarning, match="Could not find any LoRA parametrization"):
        peft_model(IDS)
    stack = peft_model.base_model.model.model.layers[0].mlp.experts
    while hasattr(stack, "base_layer"):
        stack = stack.base_layer
    assert len(stack.parametrizations.gate_up_proj) > 1 and isinstance(stack.parametrizations.gate_up_proj[0],
                                                                        PackedExperts)
