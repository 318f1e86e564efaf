"""FP8 training (fp8:): which layers become float8, LoRA over a float8 base (fp8_frozen_weights included), the
config rules, and on a GPU that float8 runs learn like bf16 ones."""

from __future__ import annotations

import pytest
import torch

from test_engine_support import losses, make_config, make_rows, one_thread, train  # noqa: F401
from test_qat import RUN, _sft_tiny
from tuneforge.config import load
from tuneforge.config.errors import ConfigError
from tuneforge.errors import NotSupportedYet
from tuneforge.models import fp8


def test_fp8_converts_the_linear_layers_float8_can_run():
    """Not the output head, not layers with a dimension that is not a multiple of 16 (the MLP here: 88)."""
    from torchao.float8.float8_linear import Float8Linear
    from transformers import AutoModelForCausalLM

    from tuneforge.tiny import tiny_llama_config

    model = AutoModelForCausalLM.from_config(tiny_llama_config(96, intermediate=88, layers=1))
    converted = fp8.convert(model, fsdp_float8_all_gather=True)
    attention = [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    assert converted == attention
    assert all(isinstance(model.get_submodule(n), Float8Linear) for n in attention)
    assert model.get_submodule(attention[0]).config.enable_fsdp_float8_all_gather is True
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear


def _lora_tiny(seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.tiny import tiny_llama_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(96, hidden=64, layers=1))
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", modules_to_save=["lm_head"])
    return get_peft_model(model, lora)


def test_fp8_with_an_adapter_converts_only_the_frozen_base_layers():
    """The base layers LoRA wraps run float8; the trained factors, the head and the head's trainable copy stay 16-bit.
    The float8 model's LoRA gradients point the way the 16-bit model's do (float8's rounding, not another model)."""
    from torchao.float8.float8_linear import Float8Linear

    plain, model = _lora_tiny(), _lora_tiny()
    converted = fp8.convert(model, frozen_only=True)
    projections = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
    assert sorted(converted) == sorted(f"base_model.model.model.layers.0.{p}.base_layer" for p in projections)
    floats = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert floats == set(converted)
    assert all(not p.requires_grad for n in converted for p in model.get_submodule(n).parameters())
    ids = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(1))
    grads = []
    for m in (plain, model):
        m(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in m.named_parameters() if "lora_" in n]))
    cosine = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert 0.95 < cosine < 1 - 1e-6, cosine  # close, and not the 16-bit model itself


def test_compiled_frozen_float8_layer_skips_its_weight_gradient():
    """torchao's float8 backward computes the weight's gradient even for a frozen weight; compiled, the traced
    backward drops that matmul, which is why fp8 with an adapter pays only with torch_compile."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def backward_matmuls(frozen: bool) -> int:
        graphs = {}

        def keep(gm, _inputs):
            graphs["backward"] = gm
            return make_boxed_func(gm.forward)

        torch._dynamo.reset()
        layer = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False))
        layer[0].weight.requires_grad_(not frozen)
        fp8.convert(layer)
        x = torch.randn(32, 64, requires_grad=True)
        forward = lambda gm, _inputs: make_boxed_func(gm.forward)  # noqa: E731 - run the traced graph as it is
        compiled = torch.compile(layer, backend=aot_autograd(fw_compiler=forward, bw_compiler=keep))
        compiled(x).sum().backward()
        return sum(n.op == "call_function" and "mm" in str(n.target) for n in graphs["backward"].graph.nodes)

    assert (backward_matmuls(frozen=False), backward_matmuls(frozen=True)) == (2, 1)


def test_stored_float8_weights_compute_what_the_per_call_cast_computes():
    """fp8_frozen_weights: the frozen base weights become float8 once; the loss and every LoRA gradient are the
    same bits as with Float8Linear casting them at each call, eager and traced (AOTAutograd, as torch_compile),
    and the weights take 1 byte each instead of 4 (this tiny model is fp32)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torchao.float8.float8_training_tensor import Float8TrainingTensor

    per_call, stored = _lora_tiny(), _lora_tiny()
    fp8.convert(per_call, frozen_only=True)
    names = fp8.convert(stored, frozen_only=True)
    bases = [stored.get_submodule(n).weight for n in names]
    assert fp8.store_frozen_weights(stored, names) == sum(w.numel() * 3 for w in bases)
    for n in names:
        weight = stored.get_submodule(n).weight
        assert isinstance(weight, Float8TrainingTensor) and weight._data.dtype == torch.float8_e4m3fn
        assert not weight.requires_grad
    ids = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(1))
    traced = torch.compile(stored, backend=aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward)))
    runs = []
    for m in (per_call, stored, traced):
        m.zero_grad()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        runs.append([loss.detach()] + [p.grad.clone() for n, p in m.named_parameters() if "lora_" in n])
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run, strict=True))


def test_fp8_lora_run_with_stored_weights_repeats_the_per_call_run_and_resumes_exactly(tmp_path, tiny_model_dir,
                                                                                      monkeypatch):
    """A CPU run (the GPU check bypassed: torch's float8 matmul runs on the CPU too) with fp8_frozen_weights
    has the losses of the run casting per call, and a resume from checkpoint-1 repeats them."""
    monkeypatch.setattr(fp8, "check_device", lambda: None)
    rows = make_rows(n=16, seed=4)
    keys = {**RUN, "adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_target_linear": True, "fp8": True}
    per_call = losses(train(make_config(tmp_path / "c", tiny_model_dir, rows, **keys)))
    keys.update(fp8_frozen_weights=True, save_strategy="steps", save_steps=1)
    result = train(make_config(tmp_path / "s", tiny_model_dir, rows, **keys))
    stored = losses(result)
    kinds = {type(m.base_layer.weight).__name__ for m in result.model.modules() if hasattr(m, "base_layer")}
    assert kinds == {"Float8TrainingTensor"}  # every adapted layer's base is float8 (not a run without fp8)
    assert stored == per_call and stored[4] < stored[1]
    ckpt = tmp_path / "s" / "out" / "checkpoint-1"
    resumed = losses(train(make_config(tmp_path / "r", tiny_model_dir, rows, **keys,
                                       resume_from_checkpoint=str(ckpt))))
    assert resumed == {k: v for k, v in stored.items() if k > 1}


def test_stored_float8_weights_evaluate_and_generate_like_the_per_call_cast(tmp_path, tiny_model_dir, monkeypatch):
    """After training, evaluation and generation run on the float8 base too: the same evaluation loss and the
    same greedy tokens as the run that casts the weights at each call (the CPU's float8 matmul; GPU check
    bypassed)."""
    monkeypatch.setattr(fp8, "check_device", lambda: None)
    rows = make_rows(n=20, seed=5)
    keys = {**RUN, "adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_target_linear": True, "fp8": True,
            "val_set_size": 0.2, "eval_steps": 4}
    runs = [train(make_config(tmp_path / name, tiny_model_dir, rows, **keys, fp8_frozen_weights=stored))
            for name, stored in (("per_call", False), ("stored", True))]
    prompt = torch.tensor([rows[0]["input_ids"][:5]])
    tokens = [r.model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0) for r in runs]
    assert runs[0].eval_metrics["eval_loss"] == runs[1].eval_metrics["eval_loss"]
    assert torch.equal(tokens[0], tokens[1]) and tokens[0].shape[1] == 11


def test_fp8_config_rules_with_adapters():
    base = {"base_model": "x", "fp8": True, "lora_target_linear": True}
    assert load(data={**base, "adapter": "lora"}).fp8 is True
    with pytest.raises(ConfigError, match="fp8: float8 matmuls run 16-bit base layers, and load_in_4bit"):
        load(data={**base, "adapter": "qlora", "load_in_4bit": True})
    with pytest.raises(ConfigError, match="fp8: lora_mlp_kernel, lora_o_kernel compute the base layers"):
        load(data={**base, "adapter": "lora", "lora_mlp_kernel": True, "lora_o_kernel": True})
    with pytest.raises(ConfigError, match="fp8_frozen_weights: applies to fp8: true with an adapter"):
        load(data={**base, "fp8_frozen_weights": True})
    lora = {**base, "adapter": "lora", "fp8_frozen_weights": True}
    assert load(data=lora).fp8_frozen_weights is True
    with pytest.raises(ConfigError, match="fp8_frozen_weights: is not available with fsdp_version: 2: FSDP2 shards"):
        load(data={**lora, "fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}})
    with pytest.raises(ConfigError, match="fp8_frozen_weights: is not available with rl: grpo: the generation engine"):
        load(data={**lora, "rl": "grpo"})


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9),
                    reason="this GPU runs fp8")
def test_fp8_is_accepted_by_validate_and_refused_at_train_time(tmp_path, tiny_model_dir):
    cfg = make_config(tmp_path, tiny_model_dir, make_rows(n=4), fp8=True, max_steps=1)
    assert cfg.fp8 is True  # a capability of the machine, not of the config
    with pytest.raises(NotSupportedYet, match="fp8: FP8 training needs an NVIDIA GPU of compute capability 8.9"):
        train(cfg)
    with pytest.raises(ConfigError, match="fp8_enable_fsdp_float8_all_gather: applies to fp8: true with FSDP2"):
        load(data={"base_model": "x", "fp8": True, "fp8_enable_fsdp_float8_all_gather": True})


# ------------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs float8 tensor cores (compute capability 8.9)")
def test_fp8_training_on_gpu_learns_like_bf16(tmp_path, monkeypatch):
    """The tiny example (every linear layer but the head has dimensions of multiples of 16) in float8 and in bf16:
    both learn, and their last losses agree to a tenth of the first loss."""
    bf16 = _sft_tiny(tmp_path / "bf16", monkeypatch)
    fp8_run = _sft_tiny(tmp_path / "fp8", monkeypatch, "--fp8", "true")
    first, last = min(bf16), max(bf16)
    assert fp8_run[last] < 0.5 * fp8_run[first], fp8_run
    assert abs(fp8_run[last] - bf16[last]) < 0.1 * bf16[first], (fp8_run[last], bf16[last])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs float8 tensor cores (compute capability 8.9)")
def test_fp8_lora_on_gpu_learns_like_bf16_lora(tmp_path, monkeypatch):
    """LoRA over float8 base layers, compiled, against the same LoRA in bf16: both learn, and their last losses
    agree to a tenth of the first. With the frozen weights stored in float8 (fp8_frozen_weights) the run repeats
    the per-call cast's losses: the first equal to 1e-3, the last to 2% of the first (the same float8 values;
    compiled kernels may round the scale or sum in another order, and a run amplifies such differences)."""
    def run(name: str, *overrides: str):
        from pathlib import Path

        from tuneforge.engine.run import train as run_train

        examples = Path(__file__).resolve().parents[1] / "examples"
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        cfg = load(examples / "lora-tiny.yaml", ["--bf16", "true", "--num-epochs", "1", "--logging-steps", "1",
                                                 "--torch-compile", "true", *overrides])
        return losses(run_train(cfg, show_progress=False))

    bf16, fp8_run = run("bf16"), run("fp8", "--fp8", "true")
    first, last = min(bf16), max(bf16)
    assert fp8_run[last] < 0.7 * fp8_run[first], fp8_run
    assert abs(fp8_run[last] - bf16[last]) < 0.1 * bf16[first], (fp8_run[last], bf16[last])
    stored = run("fp8w", "--fp8", "true", "--fp8-frozen-weights", "true")
    assert abs(stored[first] - fp8_run[first]) < 1e-3 * fp8_run[first], (stored, fp8_run)
    assert abs(stored[last] - fp8_run[last]) < 0.02 * fp8_run[first], (stored, fp8_run)
