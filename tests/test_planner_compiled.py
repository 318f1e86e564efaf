"""The planner's compiled-block activations against what torch.compile's partitioner keeps for the backward.

The graphs are traced on the CPU with AOTAutograd and the min-cut partitioner that inductor uses, so the
saved tensors are those of a compiled block without compiling kernels."""

from __future__ import annotations

import pytest
import torch

from tuneforge.config import load
from tuneforge.planner.estimate import layer_activation_bytes
from tuneforge.planner.model import count, model_config
from tuneforge.planner.settings import from_config

TOKENS = 48  # a length no other dimension of the layer has
SHAPE = dict(hidden=96, heads=6, kv_heads=2, intermediate=160, layers=1)
LORA = {"adapter": "lora", "lora_target_linear": True, "lora_r": 4}


def _planned(model_dir, **keys) -> int:
    """The planner's bytes per token of one compiled layer of the traced shape, for these config keys."""
    from tuneforge.tiny import tiny_llama_config

    tiny_llama_config(300, **SHAPE).save_pretrained(model_dir)
    cfg = load(data={"base_model": str(model_dir), "bf16": True, "torch_compile": True, **keys})
    facts = count(cfg, model_config(cfg), torch.float32, None)
    return layer_activation_bytes(facts.arch, from_config(cfg, 1), facts.adapted)


def _compiled_layer(fp8: bool, lora: bool = False, recompute: bool = False) -> tuple[float, list[torch.Tensor]]:
    """(bytes per token of the activations a compiled Llama layer saves for its backward, the gradients of its
    input and trained parameters): parameters and the layer's input, which the previous layer holds, are not
    counted; bf16 autocast, full fine-tuning of fp32 weights, or LoRA on every linear layer of a bf16 base. The
    partitioned graphs run as traced, so the backward really recomputes what was not kept."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from transformers import AutoModelForCausalLM

    from tuneforge.models import fp8 as float8
    from tuneforge.models.compile_setup import recomputing_backend
    from tuneforge.tiny import tiny_llama_config

    config = tiny_llama_config(300, **SHAPE)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if lora else torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")).get_base_model()
    if fp8:
        float8.convert(model, frozen_only=lora)
    saved: list[torch.Tensor] = []

    def forward_compiler(gm, _):
        inputs = {n for n in gm.graph.nodes if n.op == "placeholder"}
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        saved.extend(o.meta["val"] for o in outputs[1:]  # [0]: the layer's output
                     if o not in inputs and isinstance(o.meta.get("val"), torch.Tensor))
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                           partition_fn=min_cut_rematerialization_partition)
    if recompute:  # what torch_compile_recompute_elementwise compiles with, around this tracing backend
        backend = recomputing_backend(backend)
    layer = torch.compile(model.model.layers[0], backend=backend)
    x = torch.randn(1, TOKENS, 96, requires_grad=True)
    position = torch.arange(TOKENS)[None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, position_embeddings=model.model.rotary_emb(x, position), attention_mask=None,
                    position_ids=position)
    out.float().sum().backward()
    grads = [x.grad] + [p.grad for p in model.parameters() if p.grad is not None]
    return sum(t.numel() * t.element_size() for t in saved if TOKENS in t.shape) / TOKENS, grads


def _compiled_saved_per_token(fp8: bool, lora: bool = False) -> float:
    return _compiled_layer(fp8, lora)[0]


def test_fp8_keeps_what_the_compiled_float8_block_keeps(tmp_path):
    """Compiled float8 full fine-tuning saves fewer bytes per token than compiled bf16 by exactly what the
    planner subtracts (the normalised inputs and the down projection's input recomputed, the output
    projection's input kept as its float8 cast); with an adapter float8 changes nothing."""
    pytest.importorskip("torchao")
    bf16, fp8 = _compiled_saved_per_token(False), _compiled_saved_per_token(True)
    assert fp8 < bf16
    assert _compiled_saved_per_token(False, lora=True) == _compiled_saved_per_token(True, lora=True)
    assert _planned(tmp_path) - _planned(tmp_path, fp8=True) == bf16 - fp8
    assert _planned(tmp_path, **LORA) == _planned(tmp_path, **LORA, fp8=True)


@pytest.mark.parametrize("lora", [False, True])
def test_recompute_elementwise_keeps_what_the_partitioner_keeps(tmp_path, lora):
    """torch_compile_recompute_elementwise: the partitioner recomputes the normalised inputs and the SiLU
    product, the gradients are the same bits, and the planner subtracts exactly what the traced block no longer
    keeps."""
    (kept, grads), (lean, lean_grads) = _compiled_layer(False, lora), _compiled_layer(False, lora, recompute=True)
    assert lean < 0.8 * kept
    assert len(grads) > 1 and all(torch.equal(a, b) for a, b in zip(grads, lean_grads, strict=True))
    keys = LORA if lora else {}
    on = _planned(tmp_path, **keys, torch_compile_recompute_elementwise=True)
    assert _planned(tmp_path, **keys) - on == kept - lean


@pytest.mark.parametrize("checkpointed, lean, measured", [(19, False, 29.65), (19, True, 23.13), (14, True, 26.71),
                                                          (11, True, 28.85), (10, True, 29.57)])
def test_fp8_lora_plans_match_the_measured_h100_runs(checkpointed, lean, measured):
    """8B LoRA r=16 with fp8_frozen_weights, compiled, 2 x 4,096 packed tokens, on an H100 (docs/benchmarks.md,
    sessions 14 and 15): torch's allocated peak against the plan, with and without recomputed elementwise
    results. Planned within 3%."""
    from tuneforge.planner import plan

    cfg = load(data={"base_model": "x", "adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_target_linear": True,
                     "bf16": True, "micro_batch_size": 2, "sequence_len": 4096, "sample_packing": True,
                     "gradient_checkpointing": True, "gradient_checkpointing_layers": checkpointed,
                     "torch_compile": True, "torch_compile_recompute_elementwise": lean, "fp8": True,
                     "fp8_frozen_weights": True, "optimizer": "adamw_torch_fused"})
    planned = plan(cfg, model="llama-3.1-8b", with_suggestions=False).estimate.allocated / 2**30
    assert abs(planned / measured - 1) < 0.03, planned
