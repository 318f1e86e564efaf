"""quantize_moe_experts: parameter bytes and the peak memory of one forward+backward, 16-bit vs NF4 experts.

A random Qwen3-MoE (transformers' own modeling code, no download), frozen base, a trainable input embedding
(so the backward runs through every layer), one forward+backward on a random batch per variant:

- `16bit`: the experts as loaded;
- `nf4`: quantize_moe_experts (views saved for the backward are rebuilt from the packed experts);
- `nf4-keep`: the same without that (autograd keeps every layer's dequantized experts until the backward);
- `nf4-ckpt`: with gradient checkpointing (the layer is recomputed in the backward instead).

Peak memory is CUDA's max_memory_allocated over the step (on a GPU), or the growth of the process's peak RSS
over the step (CPU; run with MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors go back to the system, which
the script sets by re-running itself). Prints one JSON line per variant.

    python bench/moe_quant_memory.py                       # CUDA, bf16, 8 layers x 64 experts
    python bench/moe_quant_memory.py --shape tiny          # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

SHAPES = {  # hidden, moe_intermediate, experts, layers
    "small": (1024, 768, 64, 8),
    "tiny": (512, 512, 16, 8),
}


def build(shape: str, dtype, device, impl: str):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    hidden, inter, experts, layers = SHAPES[shape]
    config = Qwen3MoeConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden, moe_intermediate_size=inter,
                            num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                            head_dim=hidden // 8, num_experts=experts, num_experts_per_tok=4, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation=impl)
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(True)
    return model


def peak_rss_mib() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024


def step(model, ids, cuda: bool) -> tuple[float, float, object]:
    import torch

    model(ids).logits.float().pow(2).mean().backward()  # warm-up
    model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_mem = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak RSS starts again from the current RSS
        start_mem = peak_rss_mib() * 2**20
    t0 = time.perf_counter()
    logits = model(ids).logits
    logits.float().pow(2).mean().backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_mib() * 2**20
    return (peak - start_mem) / 2**20, seconds, logits.detach().float()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--impl", default="grouped_mm", help="experts_implementation: eager, grouped_mm, batched_mm")
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    from tuneforge.models.moe_quant import quantize_moe_experts, storage_bytes

    shape = args.shape or ("small" if cuda else "tiny")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    ids = torch.randint(0, 1024, (1, args.tokens if cuda else 256), device=device)
    reference = None
    for variant in ("16bit", "nf4", "nf4-keep", "nf4-ckpt"):
        model = build(shape, dtype, device, args.impl)
        if variant != "16bit":
            quantize_moe_experts(model, recompute_in_backward=variant == "nf4")
        if variant == "nf4-ckpt":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        peak, seconds, logits = step(model, ids, cuda)
        reference = logits if reference is None else reference
        print(json.dumps({
            "variant": variant, "device": torch.cuda.get_device_name() if cuda else "cpu", "shape": shape,
            "impl": args.impl, "params_and_buffers_mib": round(storage_bytes(model) / 2**20, 1),
            "step_peak_over_start_mib": round(peak, 1), "step_seconds": round(seconds, 3),
            "max_logit_diff_vs_16bit": round((logits - reference).abs().max().item(), 4),
        }), flush=True)
        del model, logits
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
