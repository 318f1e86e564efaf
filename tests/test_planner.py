"""The memory planner: exact parameter counts against real models, closed forms of each part, the
activation model against the tensors autograd really saves, the suggestions, and the CLI output."""

from __future__ import annotations

import re

import pytest
import torch

from tuneforge.config import load
from tuneforge.planner import coefficients as k
from tuneforge.planner import parse_size, plan
from tuneforge.planner.estimate import layer_activation_bytes, loss_chunk
from tuneforge.planner.model import architecture, count, model_config
from tuneforge.planner.settings import from_config

GiB = 2**30


def cfg_of(tiny_model_dir, **keys):
    return load(data={"base_model": str(tiny_model_dir), "sequence_len": 256, "bf16": True, **keys})


def facts_of(cfg, dtype=torch.float32, quantized=None):
    return count(cfg, model_config(cfg), dtype, quantized)


# ---------------------------------------------------------------- exact counts
def test_full_counts_equal_the_real_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    facts = facts_of(cfg_of(tiny_model_dir))
    assert facts.total == sum(p.numel() for p in real.parameters())
    assert facts.trainable.count == facts.total and facts.frozen.count == 0
    assert facts.weight_bytes == 4 * facts.total
    assert facts.matmul_params == sum(m.weight.numel() for m in real.model.layers.modules()
                                      if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("keys", [
    {"lora_target_linear": True},
    {"lora_target_modules": ["q_proj", "v_proj"], "lora_r": 4},
    {"lora_target_linear": True, "lora_modules_to_save": ["lm_head"]},
])
def test_lora_counts_equal_the_adapter_the_trainer_builds(tiny_model_dir, keys):
    from transformers import AutoModelForCausalLM

    from tuneforge.models.adapters import apply_adapter

    cfg = cfg_of(tiny_model_dir, adapter="lora", **keys)
    real = apply_adapter(cfg, AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)))
    trainable = sum(p.numel() for p in real.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in real.parameters() if not p.requires_grad)
    facts = facts_of(cfg, torch.bfloat16)
    assert (facts.trainable.count, facts.frozen.count) == (trainable, frozen)
    assert facts.trainable.count < facts.frozen.count
    lora = sum(p.numel() for n, p in real.named_parameters() if "lora_" in n)
    # LoRA factors are fp32 (PEFT upcasts adapters), the frozen base bf16.
    assert facts.frozen.bytes == 2 * frozen
    assert facts.trainable.bytes - 4 * lora == 2 * (trainable - lora)


def test_qlora_counts_nf4_with_its_quantization_constants(tiny_model_dir):
    cfg = cfg_of(tiny_model_dir, adapter="lora", lora_target_linear=True)
    plain, nf4 = facts_of(cfg, torch.bfloat16), facts_of(cfg, torch.bfloat16, "nf4")
    quantized = plain.matmul_params
    other = plain.frozen.count - quantized  # embeddings, norms, head: upcast to fp32 by kbit preparation
    per_weight = 0.5 + 1 / 64 + 4 / (64 * 256)
    assert nf4.frozen.bytes == pytest.approx(quantized * per_weight + 4 * other, abs=100)
    assert nf4.trainable.bytes == plain.trainable.bytes


def test_float8_frozen_weights_count_the_bytes_the_converted_model_holds(tiny_model_dir):
    """fp8_frozen_weights: the planner's frozen bytes equal those of the model the trainer builds (base weights in
    e4m3, one fp32 scale each, which the planner leaves out), and the run is planned as LoRA, not QLoRA."""
    from transformers import AutoModelForCausalLM

    from tuneforge.models import fp8
    from tuneforge.models.adapters import apply_adapter

    cfg = cfg_of(tiny_model_dir, adapter="lora", lora_target_linear=True, fp8=True, fp8_frozen_weights=True)
    real = apply_adapter(cfg, AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16))
    names = fp8.convert(real, frozen_only=True)
    fp8.store_frozen_weights(real, names)
    frozen = [p for p in real.parameters() if not p.requires_grad]
    held = sum(p._data.nbytes if hasattr(p, "_data") else p.numel() * p.element_size() for p in frozen)
    settings = from_config(cfg, 1)
    assert (settings.quantized, settings.adapter, settings.upcast_unquantized) == ("float8", "lora", False)
    facts = facts_of(cfg, torch.bfloat16, settings.quantized)
    assert facts.frozen.bytes == held
    assert facts.frozen.bytes == facts_of(cfg, torch.bfloat16).frozen.bytes - facts.matmul_params


def test_shipped_shapes_have_the_public_sizes():
    expected = {"llama-3.2-1b": 1_235_814_400, "llama-3.1-8b": 8_030_261_248, "llama-3.1-70b": 70_553_706_496,
                "qwen2.5-7b": 7_615_616_512}
    cfg = load(data={"base_model": "unused"})
    for name, total in expected.items():
        e = plan(cfg, model=name).estimate
        assert e.extra["trainable"] + e.extra["frozen"] == total, name


# ---------------------------------------------------------------- closed forms
def test_full_fine_tuning_closed_forms(tiny_model_dir):
    e = plan(cfg_of(tiny_model_dir)).estimate
    n = e.extra["trainable"]
    assert e.part("weights") == 4 * n
    assert e.part("gradients") == 4 * n
    assert e.part("optimizer states") == 8 * n  # AdamW: two fp32 moments
    assert e.part("reference model") == 0 and e.part("generation KV cache") == 0


@pytest.mark.parametrize("optimizer, per_param", [
    ("adamw_torch", 8), ("adamw_8bit", 2 * (1 + 4 / 256)), ("paged_adamw_32bit", 8), ("lion_8bit", 1 + 4 / 256),
    ("sgd", 0), ("ademamix", 12), ("muon", 4), ("ao_adamw_4bit", 2 * (0.5 + 4 / 128))])
def test_optimizer_states(tiny_model_dir, optimizer, per_param):
    e = plan(cfg_of(tiny_model_dir, optimizer=optimizer)).estimate
    assert e.part("optimizer states") == int(e.extra["trainable"] * per_param)


def test_kahan_plans_bf16_weights_and_the_states_the_optimizer_keeps(tiny_model_dir):
    """bf16_master_weights: kahan: weights and gradients in bf16, no autocast copies, and optimizer states of the
    size the real optimizer allocates (torch-optimi's AdamW: two moments and the compensation, in bf16)."""
    from transformers import AutoModelForCausalLM

    from tuneforge.engine.optim import build_optimizer
    from tuneforge.models.load import weights_dtype

    cfg = cfg_of(tiny_model_dir, bf16_master_weights="kahan")
    e = plan(cfg).estimate
    n = e.extra["trainable"]
    assert (e.part("weights"), e.part("gradients"), e.part("autocast weight copies")) == (2 * n, 2 * n, 0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=weights_dtype(cfg))
    optimizer = build_optimizer(cfg, model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    held = sum(t.nbytes for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)
               and t.dim() > 0)
    assert e.part("optimizer states") == held == 6 * n


def test_sgd_momentum_keeps_one_buffer(tiny_model_dir):
    e = plan(cfg_of(tiny_model_dir, optimizer="sgd", optim_args={"momentum": 0.9})).estimate
    assert e.part("optimizer states") == 4 * e.extra["trainable"]


def test_fsdp_divides_the_states_by_the_gpus_and_offload_moves_them(tiny_model_dir):
    one = plan(cfg_of(tiny_model_dir)).estimate
    four = plan(cfg_of(tiny_model_dir, fsdp_version=2, fsdp_config={}), gpus=4).estimate
    for part in ("weights", "gradients", "optimizer states"):
        assert four.part(part) == -(-one.part(part) // 4)
    assert four.part("FSDP gathered layers") > 0 and one.part("FSDP gathered layers") == 0
    assert four.part("activations") == one.part("activations")
    off = plan(cfg_of(tiny_model_dir, fsdp_version=2, fsdp_config={"offload_params": True}), gpus=4).estimate
    assert off.part("weights") == off.part("gradients") == off.part("optimizer states") == 0
    moved = sum(four.part(p) for p in ("weights", "gradients", "optimizer states"))
    assert off.host - four.host == moved
    assert off.total < four.total
    from tuneforge.planner.host import host_shortfall

    assert host_shortfall(off, available=4 * off.host) is None
    assert "offload_params" in host_shortfall(off, available=4 * off.host - 1)
    assert host_shortfall(four, available=1) is None  # nothing offloaded


def test_activations_structure(tiny_model_dir):
    base = plan(cfg_of(tiny_model_dir, micro_batch_size=1, sample_packing=True)).estimate
    double = plan(cfg_of(tiny_model_dir, micro_batch_size=2, sample_packing=True)).estimate
    gc = plan(cfg_of(tiny_model_dir, micro_batch_size=1, sample_packing=True, gradient_checkpointing=True)).estimate
    assert double.part("activations") == 2 * base.part("activations")  # linear in tokens
    assert gc.part("activations") < base.part("activations")
    assert gc.part("activations") == base.part("activations (checkpointing)")
    assert base.part("activations") == base.part("activations (no checkpointing)")
    longer = plan(cfg_of(tiny_model_dir, sequence_len=512, sample_packing=True)).estimate
    assert longer.part("activations") == 2 * base.part("activations")


def test_selective_checkpointing_and_offloading_in_the_plan(tiny_model_dir):
    keys = dict(micro_batch_size=1, sample_packing=True, gradient_checkpointing=True)
    gc = plan(cfg_of(tiny_model_dir, **keys)).estimate
    kept = plan(cfg_of(tiny_model_dir, selective_checkpointing=True, **keys)).estimate
    arch = architecture(model_config(cfg_of(tiny_model_dir)))
    # each layer also keeps its attention output (bf16) and the fp32 log-sum-exp of every head, per token
    per_token = arch.layers * (2 * arch.heads * arch.head_dim + 4 * arch.heads)
    assert kept.part("activations") - gc.part("activations") == 256 * per_token
    offloaded = plan(cfg_of(tiny_model_dir, activation_offloading=True, **keys)).estimate
    assert offloaded.part("activations") == 0
    assert offloaded.host - gc.host == gc.part("activations")
    assert offloaded.allocated == gc.allocated - gc.part("activations")


def test_logits_chunk_follows_the_loss_chunking(tiny_model_dir):
    from tuneforge.models import logprobs

    assert k.CHUNK_ELEMENTS_CUDA == logprobs.CHUNK_ELEMENTS_CUDA and k.MIN_CHUNK_ROWS == logprobs.MIN_CHUNK_ROWS
    cfg = cfg_of(tiny_model_dir, sequence_len=4096, sample_packing=True)
    facts, s = facts_of(cfg), from_config(cfg, 1)
    V, H = facts.arch.vocab, facts.arch.hidden
    rows = min(4096, max(256, (1 << 28) // V))
    # fp32 head: its bf16 copy and its fp32 gradient come with the chunk
    assert loss_chunk(facts, s) == rows * (14 * V + 2 * H) + 2 * V * H + 4 * V * H
    big_vocab = facts.arch.__class__(**{**facts.arch.__dict__, "vocab": 1 << 20})
    assert loss_chunk(facts.__class__(**{**facts.__dict__, "arch": big_vocab}), s) == (
        256 * (14 * (1 << 20) + 2 * H) + 6 * (1 << 20) * H)  # at least 256 rows per chunk


def test_reference_model(tiny_model_dir):
    full = plan(cfg_of(tiny_model_dir, rl="dpo")).estimate
    assert full.part("reference model") == full.part("weights")  # a frozen copy, loaded like the policy
    lora = plan(cfg_of(tiny_model_dir, rl="dpo", adapter="lora", lora_target_linear=True)).estimate
    assert lora.part("reference model") == 0  # the adapter-disabled base
    pre = plan(cfg_of(tiny_model_dir, rl="dpo", precompute_ref_log_probs=True)).estimate
    assert pre.part("reference model") == 0
    assert plan(cfg_of(tiny_model_dir, rl="orpo")).estimate.part("reference model") == 0
    # pairs unpacked: chosen and rejected rows go through one forward
    assert full.part("activations") == 2 * plan(cfg_of(tiny_model_dir)).estimate.part("activations")


def test_grpo_kv_cache(tiny_model_dir):
    cfg = cfg_of(tiny_model_dir, rl="grpo", micro_batch_size=4, gradient_accumulation_steps=2,
                 trl={"num_generations": 4, "max_completion_length": 64, "max_prompt_length": 32})
    e = plan(cfg).estimate
    a = architecture(model_config(cfg))
    rows = 4 * 2  # completions per step
    expected = rows * ((32 + 64) * a.layers * 2 * a.kv_heads * a.head_dim * 2 + 8 * a.vocab)
    assert e.part("generation KV cache") == expected
    assert e.settings.tokens == 4 * (32 + 64)
    # full fine-tuning samples from a bf16 snapshot of the fp32 weights (off: no copy)
    assert e.part("generation weight copy") == 2 * e.extra["trainable"]
    off = cfg.model_copy(update={"trl": cfg.trl.model_copy(update={"generation_kwargs": {"half_precision_copy": False}})})
    assert plan(off).estimate.part("generation weight copy") == 0
    # under FSDP2 each process keeps a whole copy of the model to generate with, made in bf16 (it is the
    # snapshot); with half_precision_copy off, in fp32
    from tuneforge.config.distributed import FsdpConfig

    fsdp = {"fsdp_version": 2, "fsdp_config": FsdpConfig()}
    sharded = plan(cfg.model_copy(update=fsdp), gpus=2)
    assert sharded.estimate.part("generation weight copy") == 2 * e.extra["trainable"]
    assert plan(off.model_copy(update=fsdp), gpus=2).estimate.part("generation weight copy") == 4 * e.extra["trainable"]
    # generation during evaluation under FSDP2 generates from the same kind of whole copy (without FSDP2: none)
    sft = cfg_of(tiny_model_dir, generate_samples=True, val_set_size=0.1, fsdp_version=2, fsdp_config={})
    assert plan(sft, gpus=2).estimate.part("generation weight copy") == 4 * e.extra["trainable"]
    assert plan(cfg_of(tiny_model_dir, generate_samples=True, val_set_size=0.1)).estimate.part(
        "generation weight copy") == 0
    # trl.async_prefetch: one more snapshot per rollout in flight, in the dtype the sampler generates in
    ahead = cfg.model_copy(update={"trl": cfg.trl.model_copy(update={"async_prefetch": True, "prefetch_depth": 2})})
    assert plan(ahead).estimate.part("generation weight copy") == (1 + 2) * 2 * e.extra["trainable"]
    lora = cfg_of(tiny_model_dir, rl="grpo", adapter="lora", lora_target_linear=True,
                  trl={"num_generations": 4, "async_prefetch": True})
    estimate = plan(lora).estimate
    assert estimate.part("generation weight copy") == estimate.part("weights")  # a copy of base and adapter
    # trl.use_vllm (server): the server holds the KV cache and generates from pushed weights (no snapshot);
    # under FSDP2 the whole copy they are pushed from stays
    server = cfg.model_copy(update={"trl": cfg.trl.model_copy(update={"use_vllm": True})})
    assert plan(server).estimate.part("generation KV cache") == plan(server).estimate.part("generation weight copy") == 0
    server_sharded = server.model_copy(update=fsdp)
    assert plan(server_sharded, gpus=2).estimate.part("generation weight copy") == 2 * e.extra["trainable"]


# ---------------------------------------------------------------- activations against autograd
class _FlashLike(torch.autograd.Function):
    """Saves what flash/varlen attention saves: q, k, v, the output and an fp32 log-sum-exp per head."""

    @staticmethod
    def forward(ctx, q, k_, v):
        out = torch.nn.functional.scaled_dot_product_attention(q, k_, v, is_causal=True, enable_gqa=True)
        ctx.save_for_backward(q, k_, v, out, torch.zeros(q.shape[:3], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def _flash_like(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    # tuneforge's varlen path: cast to the kernel dtype, [B, T, H, D] contiguous copies
    dt = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    q, k_, v = (t.to(dt).transpose(1, 2).contiguous().transpose(1, 2) for t in (query, key, value))
    return _FlashLike.apply(q, k_, v).transpose(1, 2), None


def _saved_per_token(model, layer, tokens: int) -> tuple[float, int]:
    """(activation bytes per token saved inside `layer`, bytes of weight-shaped tensors saved there)."""
    ids = torch.randint(0, 100, (1, tokens))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        # bitsandbytes' CPU path repacks the 4-bit weights on a first forward without gradients, freeing their
        # old storage; done here, a saved activation cannot land on an address counted as a parameter's
        model(input_ids=ids, position_ids=torch.arange(tokens)[None])
    held = [p.detach() for p in model.parameters()]
    params = {p.untyped_storage().data_ptr() for p in held}
    shared, seen, active = set(), {}, [False]

    def pre(module, args, kwargs):
        shared.update(t.untyped_storage().data_ptr() for t in kwargs["position_embeddings"])
        active[0] = True

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if active[0] and key not in params and key not in shared:
            seen[key] = (t.untyped_storage().nbytes(), tokens in t.shape, t)  # t held: its address stays its own
        return t

    hooks = [layer.register_forward_pre_hook(pre, with_kwargs=True),
             layer.register_forward_hook(lambda *a: active.__setitem__(0, False))]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, position_ids=torch.arange(tokens)[None])
    for h in hooks:
        h.remove()
    per_token = sum(n for n, has_t, _ in seen.values() if has_t) / tokens
    return per_token, sum(n for n, has_t, _ in seen.values() if not has_t)


@pytest.mark.parametrize("adapter", ["", "lora", "qlora", "qlora-fp32"])
def test_layer_activations_equal_what_autograd_saves(tmp_path, adapter):
    """The per-layer formula equals the bytes a real transformers Llama layer saves under bf16 autocast
    (fp32 weights for full fine-tuning; a bf16 base with fp32 LoRA factors; QLoRA: a bitsandbytes NF4 base,
    with bf16 norms, or with fp32 ones (kbit_fp32_unquantized), which make the residual stream and the MLP
    fp32)."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    from tuneforge.tiny import tiny_llama_config

    AttentionInterface.register("planner_test", _flash_like)
    shape = dict(hidden=128, heads=4, intermediate=256) if adapter.startswith("qlora") else \
        dict(hidden=96, heads=6, intermediate=160)  # bitsandbytes quantizes blocks of 64 weights
    config = tiny_llama_config(300, layers=3, kv_heads=2, **shape)
    config.save_pretrained(tmp_path)
    keys = {"adapter": "lora", "lora_target_linear": True, "lora_r": 4} if adapter else {}
    if adapter.startswith("qlora"):
        keys.update(adapter="qlora", load_in_4bit=True, kbit_fp32_unquantized=adapter == "qlora-fp32")
    cfg = load(data={"base_model": str(tmp_path), "bf16": True, **keys})
    dtype = torch.bfloat16 if adapter else torch.float32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="planner_test")
    if adapter.startswith("qlora"):
        pytest.importorskip("bitsandbytes")
        from transformers import BitsAndBytesConfig

        model.save_pretrained(tmp_path)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=dtype, quantization_config=quant,
                                                     attn_implementation="planner_test")
    if adapter:
        from tuneforge.models.adapters import apply_adapter

        model = apply_adapter(cfg, model)
    base = model.get_base_model() if adapter else model
    tokens = 37  # a length no other dimension has
    measured, weight_copies = _saved_per_token(model, base.model.layers[1], tokens)
    facts = facts_of(cfg, dtype, "nf4" if adapter.startswith("qlora") else None)
    settings = from_config(cfg, 1)
    assert layer_activation_bytes(facts.arch, settings, facts.adapted) == measured
    if not adapter:  # the autocast copies of the layer's weights
        assert weight_copies == 2 * facts.matmul_params // facts.arch.layers


# ---------------------------------------------------------------- suggestions
def test_suggestions_fit_by_the_planners_own_numbers(tmp_path):
    cfg = load(data={"base_model": "unused", "sequence_len": 4096, "sample_packing": True, "micro_batch_size": 2,
                     "bf16": True})
    report = plan(cfg, gpu_memory=24 * GiB, model="llama-3.1-8b")
    assert not report.estimate.fits
    labels = [s.label for s in report.suggestions]
    assert labels[:3] == ["gradient checkpointing", "micro-batch 1 with more accumulation", "LoRA"]
    assert "QLoRA" in labels and any("FSDP2" in x for x in labels)
    fitting = [s for s in report.suggestions if s.estimate.fits]
    assert {s.label for s in fitting} & {"LoRA", "QLoRA"} or any("GPUs with FSDP2" in s.label for s in fitting)
    for s in report.suggestions:
        assert s.estimate.fits == (s.estimate.total <= 24 * GiB)
    qlora = next(s for s in report.suggestions if s.label == "QLoRA").estimate
    # One micro-batch of 2 rows needs less than two accumulated ones (the accumulated gradients stay between
    # them), so the later suggestions keep micro_batch_size 2 and only add checkpointing.
    gc_step, mbs_step = report.suggestions[0].estimate, report.suggestions[1].estimate
    assert mbs_step.total > gc_step.total and mbs_step.settings.grad_accum == 2
    assert qlora.fits and qlora.settings.gradient_checkpointing and qlora.settings.micro_batch_size == 2
    assert qlora.total < next(s for s in report.suggestions if s.label == "LoRA").estimate.total
    # On 80 GiB GPUs, full fine-tuning of the same model fits with FSDP2 over a few GPUs, or offloaded on one.
    roomy = plan(cfg, gpu_memory=80 * GiB, model="llama-3.1-8b")
    fsdp = next(s for s in roomy.suggestions if "GPUs with FSDP2" in s.label).estimate
    assert fsdp.fits and fsdp.settings.adapter is None and fsdp.settings.gpus in (2, 4, 8)
    smallest = plan(cfg, gpu_memory=80 * GiB, model="llama-3.1-8b", gpus=fsdp.settings.gpus // 2)
    assert not smallest.estimate.fits  # ... and the suggested count is the smallest that fits
    half = plan(cfg.model_copy(update={"fsdp_version": 2, "gradient_checkpointing": True, "micro_batch_size": 1}),
                gpu_memory=80 * GiB, model="llama-3.1-8b", gpus=fsdp.settings.gpus // 2).estimate
    assert not half.fits
    offload = next(s for s in roomy.suggestions if "offload" in s.label).estimate
    assert offload.fits and offload.settings.gpus == 1 and offload.part("optimizer states") == 0


def test_compiled_runs_are_first_told_to_recompute_elementwise_results():
    """The cheapest lever for compiled blocks: the same gradients, less memory; the later suggestions keep it."""
    cfg = load(data={"base_model": "unused", "sequence_len": 4096, "sample_packing": True, "micro_batch_size": 2,
                     "bf16": True, "torch_compile": True, "adapter": "lora", "lora_target_linear": True})
    report = plan(cfg, gpu_memory=24 * GiB, model="llama-3.1-8b")
    first, checkpointing = report.suggestions[:2]
    assert first.keys == "torch_compile_recompute_elementwise: true"
    assert first.estimate.total < report.estimate.total and first.estimate.settings.recompute_elementwise
    assert checkpointing.label == "gradient checkpointing" and checkpointing.estimate.settings.recompute_elementwise
    lean = plan(cfg.model_copy(update={"torch_compile_recompute_elementwise": True}), gpu_memory=24 * GiB,
                model="llama-3.1-8b")
    assert lean.estimate.total == first.estimate.total
    assert [s.label for s in lean.suggestions][0] == "gradient checkpointing"


def test_a_run_that_fits_gets_no_suggestions(tiny_model_dir):
    report = plan(cfg_of(tiny_model_dir))
    assert report.estimate.fits and report.suggestions == []


def test_parse_size():
    assert parse_size("80GiB") == 80 * GiB
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("81920MiB") == 80 * GiB
    assert parse_size("40") == 40 * GiB
    from tuneforge.planner import PlanError

    with pytest.raises(PlanError, match="--gpu-memory"):
        parse_size("80 XB")


# ---------------------------------------------------------------- the CLI
def test_plan_command_output(write_config):
    from typer.testing import CliRunner

    from tuneforge.cli import app

    config = write_config({"sequence_len": 256, "micro_batch_size": 2})
    result = CliRunner().invoke(app, ["plan", str(config), "--gpus", "1", "--gpu-memory", "24GiB"])
    assert result.exit_code == 0, result.output
    out = result.output
    for part in ("weights", "gradients", "optimizer states", "master weights", "activations (checkpointing)",
                 "activations (no checkpointing)", "logits chunk", "reference model", "generation KV cache",
                 "generation weight copy", "CUDA context + allocator", "total (peak)", "host memory per process"):
        assert re.search(rf"^  {re.escape(part)} +\d+\.\d\d  ", out, re.M), part
    assert re.search(r"^fits: peak \d+\.\d\d GiB of 24\.00 GiB per GPU", out, re.M)

    tight = CliRunner().invoke(app, ["plan", str(config), "--gpu-memory", "10MiB", "--sequence-len", "512"])
    assert tight.exit_code == 0, tight.output
    assert re.search(r"^DOES NOT FIT: peak \d+\.\d\d GiB of 0\.01 GiB", tight.output, re.M)
    assert "1. gradient checkpointing" in tight.output and "FSDP2 offload" in tight.output


def test_plan_command_shapes_and_errors(write_config):
    from typer.testing import CliRunner

    from tuneforge.cli import app

    config = write_config({})
    result = CliRunner().invoke(app, ["plan", str(config), "--model-config", "llama-3.1-8b", "--adapter", "lora",
                                      "--lora-target-linear", "true"])
    assert result.exit_code == 0, result.output
    # rank 8 on every linear layer of 32 layers: 8 x (in + out) summed over q, k, v, o, gate, up, down
    lora = 32 * 8 * (2 * 4096 + 2 * (4096 + 1024) + 2 * 4096 + 3 * (4096 + 14336))
    assert f"({lora:,} trainable, 8,030,261,248 frozen)" in result.output
    assert "LoRA, sft" in result.output
    shape = config.parent / "what-if.json"  # a config.json of any architecture transformers knows
    shape.write_text('{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, '
                     '"num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 500}')
    by_path = CliRunner().invoke(app, ["plan", str(config), "--model-config", str(shape)])
    assert by_path.exit_code == 0, by_path.output
    embeddings, layer = 2 * 500 * 64, 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
    assert f"parameters: {embeddings + 3 * layer + 64:,} " in by_path.output
    bad = CliRunner().invoke(app, ["plan", str(config), "--model-config", "no-such-shape"])
    assert bad.exit_code != 0 and "llama-3.1-8b" in str(bad.exception)


# ---------------------------------------------------------------- train's log
def test_train_logs_the_plan_and_never_fails_on_it(tiny_model_dir, caplog):
    import logging

    from tuneforge.planner.hook import log_plan

    caplog.set_level(logging.INFO, logger="tuneforge")
    log_plan(cfg_of(tiny_model_dir), 1)
    text = caplog.text
    assert "memory plan: full fine-tuning, sft" in text
    for part in ("weights", "gradients", "optimizer states", "activations", "logits chunk"):
        assert re.search(rf"  {part}: \d+\.\d\d GiB", text), part
    assert re.search(r"fits: peak \d+\.\d\d GiB", text)
    caplog.clear()
    log_plan(load(data={"base_model": "/no/such/folder"}), 1)  # cannot be sized: no estimate, no error
    assert "memory plan" not in caplog.text
    log_plan(cfg_of(tiny_model_dir), 2, main=False)
    assert "memory plan" not in caplog.text


def test_accumulation_keeps_gradients_through_the_next_forward(tiny_model_dir):
    one = plan(cfg_of(tiny_model_dir)).estimate
    accum = plan(cfg_of(tiny_model_dir, gradient_accumulation_steps=4)).estimate
    assert accum.phases["loss"] - one.phases["loss"] == one.part("gradients")
    fsdp = plan(cfg_of(tiny_model_dir, gradient_accumulation_steps=4, fsdp_version=2, fsdp_config={}), gpus=4)
    sharded = plan(cfg_of(tiny_model_dir, fsdp_version=2, fsdp_config={}), gpus=4).estimate
    # without reduce-scatter, FSDP2 accumulates whole (unsharded) gradients
    assert fsdp.estimate.phases["loss"] - sharded.phases["loss"] == one.part("gradients")


def test_partly_checkpointed_layers_in_the_plan(tiny_model_dir):
    keys = dict(micro_batch_size=1, sample_packing=True, gradient_checkpointing=True)
    arch = architecture(model_config(cfg_of(tiny_model_dir)))
    every = plan(cfg_of(tiny_model_dir, **keys)).estimate
    none = plan(cfg_of(tiny_model_dir, **{**keys, "gradient_checkpointing": False})).estimate
    one_layer = (none.part("activations") - every.part("activations")) // arch.layers  # full minus kept, per layer
    for n in range(arch.layers + 1):
        part = plan(cfg_of(tiny_model_dir, gradient_checkpointing_layers=n, **keys)).estimate
        assert part.part("activations") == every.part("activations") + (arch.layers - n) * one_layer
    assert plan(cfg_of(tiny_model_dir, gradient_checkpointing_layers=0, **keys)).estimate.part("activations") \
        == none.part("activations")


def test_auto_checkpoints_the_fewest_layers_that_fit(tiny_model_dir, monkeypatch, caplog):
    from types import SimpleNamespace

    from tuneforge.planner import fewest_checkpointed_layers
    from tuneforge.planner.hook import resolve_checkpointed_layers

    keys = dict(micro_batch_size=1, sample_packing=True, gradient_checkpointing=True)
    arch = architecture(model_config(cfg_of(tiny_model_dir)))
    totals = [plan(cfg_of(tiny_model_dir, gradient_checkpointing_layers=n, **keys)).estimate.total
              for n in range(arch.layers + 1)]
    assert totals == sorted(totals, reverse=True) and totals[0] > totals[-1]
    auto = cfg_of(tiny_model_dir, gradient_checkpointing_layers="auto", **keys)
    for n in range(arch.layers + 1):  # a budget just big enough for n checkpointed layers gets n
        assert fewest_checkpointed_layers(auto, gpus=1, gpu_memory=totals[n])[0] == n
    assert fewest_checkpointed_layers(auto, gpus=1, gpu_memory=totals[-1] - 1)[0] == arch.layers  # none fits

    caplog.set_level("INFO", logger="tuneforge")
    assert resolve_checkpointed_layers(auto, 1).gradient_checkpointing_layers is None  # no GPU: every layer
    assert "auto -> every layer (no GPU here)" in caplog.text
    # On a GPU of totals[1] bytes with 10% headroom: the budget is 0.9 x that.
    budget = int(totals[1] * 0.9)
    want = next(n for n, t in enumerate(totals) if t <= budget) if totals[-1] <= budget else arch.layers
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=totals[1]))
    assert resolve_checkpointed_layers(auto, 1).gradient_checkpointing_layers == want
    fixed = cfg_of(tiny_model_dir, gradient_checkpointing_layers=1, **keys)
    assert resolve_checkpointed_layers(fixed, 1) is fixed


def test_auto_compile_is_planned_as_the_trainer_decides_it(tiny_model_dir):
    keys = dict(micro_batch_size=1, sample_packing=True, adapter="lora", lora_target_linear=True)

    def acts(model=None, **more):
        return plan(cfg_of(tiny_model_dir, **keys, **more), model=model).estimate.part("activations")

    # the tiny model is under the size from which auto compiles: planned eager
    assert acts(torch_compile="auto") == acts(torch_compile=False) != acts(torch_compile=True)
    # an 8B model compiles, unless the run is too short to repay the compile time
    assert acts("llama-3.1-8b", torch_compile="auto") == acts("llama-3.1-8b", torch_compile=True)
    assert acts("llama-3.1-8b", torch_compile="auto", max_steps=10) == acts("llama-3.1-8b", torch_compile=False)


def test_the_plan_of_auto_shows_the_layers_training_will_checkpoint(tiny_model_dir):
    from tuneforge.planner import fewest_checkpointed_layers

    keys = dict(micro_batch_size=1, sample_packing=True, gradient_checkpointing=True)
    auto = cfg_of(tiny_model_dir, gradient_checkpointing_layers="auto", **keys)
    every = plan(cfg_of(tiny_model_dir, **keys)).estimate.total
    memory = int(every / 0.9) + 1  # room for every layer checkpointed, after the 10% headroom, not for fewer
    n, _ = fewest_checkpointed_layers(auto, gpus=1, gpu_memory=int(memory * 0.9))
    shown = plan(auto, gpu_memory=memory).estimate
    assert shown.settings.checkpointed_layers == n
    roomy = plan(auto, gpu_memory=80 * GiB).estimate  # the tiny model fits without any checkpointing
    assert roomy.settings.checkpointed_layers == 0 and "0 of 2 layers checkpointed" in plan(auto).text()


def test_the_plan_says_when_fewer_checkpointed_layers_would_fit(tiny_model_dir):
    keys = dict(micro_batch_size=1, sample_packing=True, gradient_checkpointing=True)
    roomy = plan(cfg_of(tiny_model_dir, **keys))  # 80 GiB for a tiny model: no layer needs checkpointing
    assert roomy.spare_layers.settings.checkpointed_layers == 0 and roomy.spare_layers.fits
    assert "Memory to spare: it still fits with 0 of 2 layers checkpointed" in roomy.text()
    tight = plan(cfg_of(tiny_model_dir, **keys), gpu_memory=roomy.estimate.total)  # fits only as it is
    assert tight.estimate.fits and tight.spare_layers is None and "Memory to spare" not in tight.text()
    assert plan(cfg_of(tiny_model_dir, micro_batch_size=1)).spare_layers is None  # no checkpointing to drop
    assert plan(cfg_of(tiny_model_dir, gradient_checkpointing_layers=1, **keys)).spare_layers is None  # chosen
