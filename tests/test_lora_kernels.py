"""Fused LoRA blocks (models/lora_kernels.py, lora_fuse.py) against PEFT on identical inputs: outputs, the
gradients of every A and B, and the input gradient, fp32 on CPU (and on CUDA when present)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from test_engine_support import losses, make_config, one_thread, train  # noqa: F401
from tuneforge.models import lora_fuse, lora_kernels

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (device, compiled element-wise SwiGLU steps): CUDA runs the Triton path and the eager one
PATHS = [("cpu", False)] + ([("cuda", True), ("cuda", False)] if torch.cuda.is_available() else [])


def _config(family: str, bias: bool):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
    if family == "llama":
        return LlamaConfig(**common, attention_bias=bias, mlp_bias=bias)
    if family == "qwen2":  # q/k/v biases always
        return Qwen2Config(**common)
    return Qwen3Config(**common, head_dim=16, attention_bias=bias)


def _peft_model(family: str, bias: bool = False, dropout: float = 0.0, seed: int = 0, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, bias), attn_implementation="eager", dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets,
                                             **lora))
    with torch.no_grad():  # B starts at zero in PEFT; random B makes every gradient non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def _grads(model, embeds: torch.Tensor, labels: torch.Tensor):
    embeds = embeds.clone().requires_grad_(True)
    out = model(inputs_embeds=embeds, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads, embeds.grad


@pytest.mark.parametrize("device,compiled", PATHS)
@pytest.mark.parametrize("family,bias", [("llama", False), ("llama", True), ("qwen2", True), ("qwen3", False)])
def test_fused_blocks_match_peft_gradients(family, bias, device, compiled, monkeypatch):
    monkeypatch.setattr(lora_kernels, "COMPILE_ELEMENTWISE", compiled)
    peft_model = _peft_model(family, bias).to(device)
    fused = copy.deepcopy(peft_model)
    counts = lora_fuse.fuse_lora(fused, mlp=True, qkv=True, o=True)
    assert counts == {"mlp": 2, "qkv": 2, "o": 2}
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(2, 12, 64, generator=g).to(device)
    labels = torch.randint(0, 97, (2, 12), generator=g).to(device)
    logits_ref, grads_ref, dx_ref = _grads(peft_model, embeds, labels)
    logits, grads, dx = _grads(fused, embeds, labels)
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * 7 * 2  # A and B of 7 layers x 2 blocks
    for name, ref in grads_ref.items():
        assert ref.abs().max() > 0, name
        torch.testing.assert_close(grads[name], ref, atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("which", ["mlp", "qkv", "o"])
def test_each_switch_fuses_only_its_block(which):
    model = _peft_model("llama")
    ref = copy.deepcopy(model)
    counts = lora_fuse.fuse_lora(model, mlp=which == "mlp", qkv=which == "qkv", o=which == "o")
    assert counts == {k: (2 if k == which else 0) for k in ("mlp", "qkv", "o")}
    ids = torch.randint(0, 97, (1, 9))
    a, ga, _ = _grads(model, model.get_input_embeddings()(ids).detach(), ids)
    b, gb, _ = _grads(ref, ref.get_input_embeddings()(ids).detach(), ids)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for name in gb:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-5, rtol=1e-4, msg=name)


def test_rslora_and_rank_pattern_are_fused_with_their_scaling():
    model = _peft_model("llama", use_rslora=True, rank_pattern={"down_proj": 4}, alpha_pattern={"q_proj": 3.0})
    ref = copy.deepcopy(model)
    assert lora_fuse.fuse_lora(model, mlp=True, qkv=True, o=True)["mlp"] == 2
    ids = torch.randint(0, 97, (2, 7))
    a, ga, _ = _grads(model, ref.get_input_embeddings()(ids).detach(), ids)
    b, gb, _ = _grads(ref, ref.get_input_embeddings()(ids).detach(), ids)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for name in gb:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-5, rtol=1e-4, msg=name)


def test_dropout_and_dora_fall_back_with_a_note(caplog):
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        counts = lora_fuse.fuse_lora(_peft_model("llama", dropout=0.1), mlp=True, qkv=True, o=True)
    assert counts == {"mlp": 0, "qkv": 0, "o": 0}
    assert "lora_dropout > 0" in caplog.text and "lora_mlp_kernel" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        counts = lora_fuse.fuse_lora(_peft_model("llama", use_dora=True), mlp=True, qkv=False, o=False)
    assert counts["mlp"] == 0 and "DoRA" in caplog.text


def test_disabled_adapter_takes_peft_path():
    """A DPO reference pass disables the adapter: the fused forward must give the base model's output."""
    model = _peft_model("llama")
    lora_fuse.fuse_lora(model, mlp=True, qkv=True, o=True)
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        with model.disable_adapter():
            off = model(input_ids=ids).logits
        base = model.get_base_model()
        on = model(input_ids=ids).logits
    ref = _peft_model("llama")
    with torch.no_grad(), ref.disable_adapter():
        torch.testing.assert_close(off, ref(input_ids=ids).logits)
    assert (on - off).abs().max() > 1e-4  # the adapter's effect is there when enabled
    assert base is not None


def _saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size() if not isinstance(t, torch.nn.Parameter) else 0
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_fused_mlp_saves_less_than_peft():
    """The fused MLP keeps x, gate, up and rank-r products; PEFT also keeps silu(gate) and its product."""
    model = _peft_model("llama")
    mlp_ref = model.base_model.model.model.layers[0].mlp
    mlp = copy.deepcopy(mlp_ref)
    lora_fuse._patch(mlp, lora_fuse._mlp_forward)
    x = torch.randn(4, 32, 64, requires_grad=True)
    ref, fused = _saved_bytes(lambda: mlp_ref(x)), _saved_bytes(lambda: mlp(x))
    inter = 4 * 32 * 160 * 4  # one activation of the intermediate width, fp32
    assert fused <= ref - 2 * inter, (fused, ref)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_function_matches_closed_form(bias):
    """LoRALinearFn's gradients against autograd of y = x W^T + b + s (x A^T) B^T in float64."""
    g = torch.Generator().manual_seed(3)
    x, W, A, B = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((5, 6, 16), (12, 16), (4, 16), (12, 4)))
    b = torch.randn(12, generator=g, dtype=torch.float64) if bias else None
    x.requires_grad_(True)
    A.requires_grad_(True)
    B.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, A, B: lora_kernels.lora_linear(x, (W, b, A, B, 0.7)), (x, A, B))
    weights = [(torch.randn(*s, generator=g, dtype=torch.float64) for s in ((10, 16), (10,), (3, 16), (10, 3)))
               for _ in range(3)]
    qkv = [(W, b if bias else None, A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_(), s)
           for (W, b, A, B), s in zip(weights, (0.5, 1.0, 2.0), strict=True)]
    assert torch.autograd.gradcheck(
        lambda x, *ab: sum(t.sum() * (i + 1) for i, t in enumerate(lora_kernels.lora_qkv(
            x, *((p[0], p[1], ab[2 * j], ab[2 * j + 1], p[4]) for j, p in enumerate(qkv))))),
        (x, *(t for p in qkv for t in (p[2], p[3]))))


def test_swiglu_function_gradcheck():
    g = torch.Generator().manual_seed(4)

    def layer(out, inp, r):
        return [torch.randn(out, inp, generator=g, dtype=torch.float64) * 0.3,
                torch.randn(out, generator=g, dtype=torch.float64),
                (torch.randn(r, inp, generator=g, dtype=torch.float64) * 0.3).requires_grad_(),
                (torch.randn(out, r, generator=g, dtype=torch.float64) * 0.3).requires_grad_()]

    gate, up, down = layer(20, 8, 3), layer(20, 8, 2), layer(8, 20, 4)
    x = torch.randn(3, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)

    def f(x, Ag, Bg, Au, Bu, Ad, Bd):
        return lora_kernels.lora_swiglu(x, (gate[0], gate[1], Ag, Bg, 0.5), (up[0], up[1], Au, Bu, 2.0),
                                        (down[0], down[1], Ad, Bd, 1.5))

    assert torch.autograd.gradcheck(f, (x, gate[2], gate[3], up[2], up[3], down[2], down[3]))


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_error_is_no_larger_than_peft(device):
    """Under bf16 autocast (bf16 base, fp32 adapter, as in training) the fused blocks' error against an fp64
    reference is of the size of PEFT's own bf16 error."""
    ref64 = _peft_model("llama").double().to(device)
    peft_model = copy.deepcopy(ref64).float()
    for name, p in peft_model.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)
    fused = copy.deepcopy(peft_model)
    lora_fuse.fuse_lora(fused, mlp=True, qkv=True, o=True)
    ids = torch.randint(0, 97, (2, 16)).to(device)
    embeds = ref64.get_input_embeddings()(ids).detach()
    _, g64, dx64 = _grads(ref64, embeds, ids)
    errors = {}
    for key, model in (("peft", peft_model), ("fused", fused)):
        with torch.autocast(device, dtype=torch.bfloat16):
            _, grads, dx = _grads(model, embeds.to(torch.bfloat16), ids)
        errors[key] = (max(((grads[n].double() - g64[n]).norm() / g64[n].norm()).item() for n in g64),
                       ((dx.double() - dx64).norm() / dx64.norm()).item())
    assert errors["fused"][0] <= 1.5 * errors["peft"][0] + 1e-3, errors
    assert errors["fused"][1] <= 1.5 * errors["peft"][1] + 1e-3, errors


def _qlora_model(tmp_path, dtype: torch.dtype):
    """The llama test shape saved, loaded back with bitsandbytes NF4 (double quantization) base layers in
    `dtype` (compute and storage), LoRA on every projection with random B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config("llama", False)).save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant, dtype=dtype,
                                                 device_map={"": "cpu"}, attn_implementation="eager")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    assert type(model.get_base_model().model.layers[0].mlp.up_proj.get_base_layer()).__name__ == "Linear4bit"
    return model


def test_fused_blocks_on_a_4bit_base_match_peft_qlora(tmp_path):
    """QLoRA: the blocks dequantize the NF4 weight where bitsandbytes' matmul would, so in fp32 they give
    PEFT's outputs and gradients over the same 4-bit base (bitsandbytes' CPU backend)."""
    pytest.importorskip("bitsandbytes")
    peft_model = _qlora_model(tmp_path, torch.float32)
    fused = copy.deepcopy(peft_model)
    assert lora_fuse.fuse_lora(fused, mlp=True, qkv=True, o=True) == {"mlp": 2, "qkv": 2, "o": 2}
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    embeds = peft_model.get_input_embeddings()(ids).detach()
    logits_ref, grads_ref, dx_ref = _grads(peft_model, embeds, ids)
    logits, grads, dx = _grads(fused, embeds, ids)
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)
    assert len(grads_ref) == 2 * 7 * 2
    for name, ref in grads_ref.items():
        assert ref.abs().max() > 0, name
        torch.testing.assert_close(grads[name], ref, atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-4)


def test_fused_blocks_on_a_bf16_4bit_base_under_autocast_follow_peft(tmp_path):
    """tuneforge's QLoRA setting (bf16 compute and storage, fp32 adapter, bf16 autocast): within bf16 rounding
    of PEFT (relative gradient error under 2%), and no dequantized base weight is saved for backward."""
    pytest.importorskip("bitsandbytes")
    peft_model = _qlora_model(tmp_path, torch.bfloat16)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    fused = copy.deepcopy(peft_model)
    assert lora_fuse.fuse_lora(fused, mlp=True, qkv=True, o=True) == {"mlp": 2, "qkv": 2, "o": 2}
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    embeds = peft_model.get_input_embeddings()(ids).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, grads_ref, _ = _grads(peft_model, embeds, ids)
        _, grads, _ = _grads(fused, embeds, ids)
    for name, ref in grads_ref.items():
        assert ((grads[name].float() - ref.float()).norm() / ref.float().norm()).item() < 2e-2, name
    shapes = {tuple(m.weight.quant_state.shape) for m in fused.modules()
              if lora_fuse._is_4bit(m) and not hasattr(m, "get_base_layer")}  # bitsandbytes' own layers
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused(inputs_embeds=embeds, labels=ids)
    assert len(shapes) == 4 and saved and not shapes & set(saved), (shapes, saved)


def test_8bit_base_stays_on_peft_path_with_the_reason():
    class Linear8bitLt(torch.nn.Linear):
        pass

    model = _peft_model("llama")
    layer = model.get_base_model().model.layers[0].mlp.up_proj
    layer.base_layer.__class__ = Linear8bitLt
    assert "Linear8bitLt" in lora_fuse.why_not(layer)


def test_train_with_the_kernel_keys_follows_the_peft_run(tmp_path, tiny_model_dir, caplog):
    """`train` with lora_*_kernel: true fuses every block and gives PEFT's losses step for step."""
    keys = dict(adapter="lora", lora_target_linear=True, lora_r=4, lora_alpha=8, max_steps=6, sample_packing=True,
                peft_init_lora_weights="gaussian")  # B != 0 from the start: the fused backward matters at step 1
    ref = losses(train(make_config(tmp_path / "peft", tiny_model_dir, **keys)))
    with caplog.at_level(logging.INFO, logger="tuneforge"):
        fused = losses(train(make_config(tmp_path / "fused", tiny_model_dir, lora_mlp_kernel=True,
                                         lora_qkv_kernel=True, lora_o_kernel=True, **keys)))
    assert "fused LoRA kernels: 2 MLP, 2 QKV, 2 output-projection blocks" in caplog.text
    assert fused.keys() == ref.keys() and len(ref) == 6
    for step in ref:
        assert fused[step] == pytest.approx(ref[step], abs=1e-4), (step, fused, ref)
