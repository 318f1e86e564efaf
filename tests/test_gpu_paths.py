"""CUDA-only paths (skipped on CPU; run on the lent H200 through bench/h200_session.sh):
QLoRA with a paged 8-bit optimizer, torch_compile with the compiled fused loss, the fused loss in bf16,
and the embedded rollout engine's captured decode graph, compiled fused prefill and step, Triton decode
kernels (shared-prompt attention, sliding windows, head_dim 256)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.gpu


def _train(tmp_path, monkeypatch, config: str, *overrides: str):
    from tuneforge.config import load
    from tuneforge.engine.run import train

    monkeypatch.chdir(tmp_path)
    return train(load(EXAMPLES / config, list(overrides)), show_progress=False)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_qlora_with_paged_8bit_adam_learns(tmp_path, monkeypatch):
    """4-bit NF4 random base + LoRA + paged_adamw_8bit on the reverse task: held-out accuracy far above chance.

    The same run with a bf16 LoRA base on CPU reaches 100% held-out exact match after 2 epochs.
    """
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    base = tmp_path / "base"  # quantization needs saved weights (reinit_weights cannot be quantized)
    shutil.copytree(EXAMPLES / "tiny-llama", base)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base)).save_pretrained(base)
    result = _train(tmp_path, monkeypatch, "lora-tiny.yaml", "--base-model", str(base), "--reinit-weights", "false",
                    "--adapter", "qlora", "--load-in-4bit", "true", "--bf16", "true", "--optimizer", "paged_adamw_8bit")
    assert result.eval_metrics["eval_accuracy"] >= 0.8, result.eval_metrics
    assert (tmp_path / "outputs" / "lora-tiny" / "adapter_model.safetensors").exists()


def test_torch_compile_full_finetune_learns(tmp_path, monkeypatch):
    """Compiled blocks + compiled fused loss train the tiny example as well as the eager CPU run does."""
    # The example's 2 epochs: after 1 epoch the GPU runs (eager fp32 and bf16 alike) are at 82-89%.
    result = _train(tmp_path, monkeypatch, "sft-tiny.yaml", "--torch-compile", "true", "--bf16", "true")
    assert result.eval_metrics["eval_accuracy"] >= 0.9, result.eval_metrics


def test_fused_loss_bf16_cuda_is_as_accurate_as_the_plain_head():
    """Compiled fused loss under bf16 autocast vs the plain bf16 head, both against an fp64 reference:
    the fused loss and gradients are no less accurate (per-chunk bf16 rounding of the weight gradient
    is summed in fp32)."""
    from tuneforge.models import losses

    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(3000, 256, device="cuda", generator=g, requires_grad=True)
    weight = (torch.randn(5000, 256, device="cuda", generator=g) * 0.05).requires_grad_()
    targets = torch.randint(0, 5000, (3000,), device="cuda", generator=g)
    losses.compile_loss()
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fused = losses.LinearCrossEntropy.apply(hidden, weight, targets, 1024)
            plain = torch.nn.functional.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")
        f_grads = torch.autograd.grad(fused, [hidden, weight])
        p_grads = torch.autograd.grad(plain, [hidden, weight])
    finally:
        losses._ce_step = losses._ce_and_grad
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    exact = torch.nn.functional.cross_entropy(h64 @ w64.T, targets, reduction="sum")
    r_grads = torch.autograd.grad(exact, [h64, w64])
    assert abs(fused.item() - exact.item()) <= 2 * abs(plain.item() - exact.item()) + 1e-3 * abs(exact.item())
    for f, p, r in zip(f_grads, p_grads, r_grads, strict=True):
        err_fused, err_plain = (f.double() - r).abs().max().item(), (p.double() - r).abs().max().item()
        assert err_fused <= 2 * err_plain + 1e-5, (err_fused, err_plain)


def test_embedded_rollout_with_cuda_graphs_equals_generate(tiny_model_dir):
    """Greedy decoding through the captured graph (fp32, so no rounding ties) equals model.generate."""
    from transformers import AutoModelForCausalLM

    from tuneforge.rollout.base import SamplingParams
    from tuneforge.rollout.embedded import EmbeddedSampler

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="sdpa").cuda().eval()
    prompts = [[5, 6, 7, 8, 9], [40, 41], [100, 3, 77, 12, 13, 14, 15, 200, 201]]
    sampler = EmbeddedSampler(model, pad_id=0)
    out = sampler.generate(prompts, 1, SamplingParams(temperature=0.0, max_tokens=12))
    assert out.meta["cuda_graphs"] is True
    for prompt, completion in zip(prompts, out.completion_ids, strict=True):
        ids = torch.tensor([prompt], device="cuda")
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             min_new_tokens=12, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert completion == ref


@pytest.mark.parametrize("family", ["llama", "qwen2-sliding", "gemma3-sliding"])
@pytest.mark.parametrize("shared", [False, True])
def test_compiled_fused_rollout_on_cuda_matches_the_model(family, shared):
    """The compiled fused prefill and captured decode step on CUDA (fp32, Triton kernels, shared-prompt
    attention on or off, sliding windows shorter than the generation) give the log-probs of a
    teacher-forced forward of the same model."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config

    from tuneforge.rollout.base import SamplingParams
    from tuneforge.rollout.embedded import EmbeddedSampler

    small = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300)
    config = {"llama": lambda: LlamaConfig(**small),
              "qwen2-sliding": lambda: Qwen2Config(**small, use_sliding_window=True, sliding_window=16,
                                                   max_window_layers=1),
              "gemma3-sliding": lambda: Gemma3TextConfig(**small, head_dim=256, sliding_window=16,
                                                         layer_types=["sliding_attention", "full_attention"])}[family]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).cuda().eval()
    prompts = [list(range(10, 40)), [7, 8, 9], list(range(50, 70))]
    sampler = EmbeddedSampler(model, pad_id=0, compile=True, shared_prompt_attention=shared)
    out = sampler.generate(prompts, 2, SamplingParams(temperature=0.0, max_tokens=24))
    assert sampler.used_fused and out.meta["cuda_graphs"] is True
    for i, (completion, logps) in enumerate(zip(out.completion_ids, out.logprobs, strict=True)):
        prompt = prompts[i // 2]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + completion], device="cuda")).logits[0, len(prompt) - 1:-1]
        want = logits.float().log_softmax(-1).gather(-1, torch.tensor(completion, device="cuda")[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(logps), want.cpu(), rtol=0, atol=1e-3)
