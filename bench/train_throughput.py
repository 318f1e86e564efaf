"""Training throughput: tuneforge's engine vs a plain Hugging Face Trainer, in the same run.

Workload: a Llama-3.2-1B-shaped model with random weights (built from a config,
no download), synthetic token ids with an Alpaca-like length distribution (lognormal, median 150,
sigma 0.7, clipped 16..2048; seeded), every token trained.

- tuneforge: packed rows of --seq-len tokens, --micro-batch rows per step, bf16, fused AdamW,
  varlen attention on CUDA (per-document, no cross-document attention), chunked cross-entropy.
- baseline: transformers.Trainer, SDPA, dynamic padding to the longest row of each batch, bf16,
  fused AdamW, --hf-batch rows per step (the usual way people fine-tune on this data). With --hf-packed the
  baseline instead trains on rows of exactly --seq-len tokens (the documents concatenated, causal attention
  across them, no padding): the same tokens per step as tuneforge, as in the 8B LoRA comparison.

Reported per engine: trained tokens/s (median over timed steps, excluding warm-up), MFU against
989 TFLOP/s (H100/H200 dense bf16; FLOPs as in the PaLM paper, appendix B, see engine/metrics.py) and peak
allocated memory. Prints one JSON line
per engine and writes them to --out.

    python bench/train_throughput.py --mode full --seq-len 4096 --steps 30
    python bench/train_throughput.py --mode lora --seq-len 4096 --steps 30
    python bench/train_throughput.py --engines tuneforge,tuneforge-fsdp     # FSDP2's cost on one GPU
    python bench/train_throughput.py --shape llama-8b --engines tuneforge-fsdp --offload --dtype bfloat16
    python bench/train_throughput.py --preset 8b-lora          # HF+PEFT vs eager vs fused LoRA kernels (+compile)
    python bench/train_throughput.py --preset 1b-full-bf16     # fp32 master weights vs bf16_master_weights: kahan
    python bench/train_throughput.py --preset 1b-fp8 --steps 20  # bf16 vs fp8: true (and qat), compiled and eager
    python bench/train_throughput.py --preset 8b-lora --shape tiny --seq-len 256 --steps 4 --warmup 1   # CPU smoke
    python bench/train_throughput.py --preset 8b-qlora         # HF+PEFT+bitsandbytes vs tuneforge QLoRA (GPU)
    python bench/train_throughput.py --preset 1b-qlora          # QLoRA: bitsandbytes on one GPU vs FSDP2's NF4
    python bench/train_throughput.py --preset 8b-lora-long      # 16K-token documents: selective checkpointing
    python bench/train_throughput.py --preset 8b-lora-ck        # gradient_checkpointing_layers: 26 and auto
    python bench/train_throughput.py --preset 8b-lora-fp8       # fp8: true with LoRA (float8 frozen base layers)
    python bench/train_throughput.py --preset 8b-lora-fp8w      # ... with the frozen weights stored in float8

Engines: `hf` (Trainer, + PEFT in lora mode) and `tuneforge` with any of these suffixes, joined by `-`:
`kernels` (lora_mlp/qkv/o_kernel), `compile` (torch_compile), `kahan` (bf16_master_weights: kahan), `fp8` (fp8:
true), `fp8w` (fp8 with fp8_frozen_weights), `lean` (torch_compile_recompute_elementwise),
`autotune` (torch_compile_mode: max-autotune-no-cudagraphs: inductor times its own GEMM kernels against cuBLAS), `qat` (qat: int4 weights per group of 32, int8 activations),
`fsdp` (FSDP2 in one process), `deepspeed` (DeepSpeed ZeRO-3 in one process: bench/deepspeed_gpu.sh),
`qlora` (a 4-bit base: bitsandbytes, or with `fsdp` torchao NF4 shards; the random weights are saved and
loaded, since quantized models are not initialised from a config). All
engines of one command run in the same process, one after the other;
the last line gives every engine's tokens/s as a ratio of the first engine's and of `hf`'s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

PEAK = 989e12
SHAPES = {
    # The shapes of the public Llama-3.2-1B config (and a tiny one for CPU smoke runs).
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                     max_position_embeddings=8192),
    # Public Llama-3.1-8B shape.
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                     max_position_embeddings=8192),
    "tiny": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False, max_position_embeddings=4096),
}


def alpaca_lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [min(2048, max(16, int(round(math.exp(rng.gauss(math.log(150), 0.7)))))) for _ in range(n)]


def make_model_dir(root: Path, shape: str, weights: bool = False) -> Path:
    """The shape's config and a tiny tokenizer; with `weights`, random bf16 weights too (built on the GPU)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tuneforge.tiny import build_tiny_tokenizer

    path = root / f"model-{shape}"
    build_tiny_tokenizer(path)
    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config.save_pretrained(path)
    if weights:
        torch.manual_seed(0)
        with torch.device("cuda" if _cuda() else "cpu"):
            AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    return path


def make_rows(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed + 1)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def flops_per_token_factor(cfg, lengths: list[int], lora_params: int | None) -> tuple[float, float]:
    """(dense FLOPs per token, attention FLOPs per token at this length mix) for MFU."""
    heads, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    inter, h, L, V = cfg.intermediate_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * hd
    n_mm = L * (h * heads * hd + 2 * h * kv + heads * hd * h + 3 * h * inter) + V * h
    dense = 6 * n_mm if lora_params is None else 4 * n_mm + 6 * lora_params
    attn = 12 * L * heads * hd * sum(n * n for n in lengths) / sum(lengths)
    return dense, attn


# One command, one comparison: the engines and settings of the tables.
PRESETS = {
    "8b-lora": dict(shape="llama-8b", mode="lora", gc=True, micro_batch=2, seq_len=4096, hf_batch=2, hf_packed=True,
                    engines="hf,tuneforge,tuneforge-kernels,tuneforge-compile,tuneforge-kernels-compile"),
    # QLoRA needs real weights on disk (both engines quantize while loading): the random model is saved first.
    "8b-qlora": dict(shape="llama-8b", mode="qlora", gc=True, micro_batch=2, seq_len=4096, hf_batch=2, hf_packed=True,
                     engines="hf,tuneforge,tuneforge-compile,tuneforge-kernels-compile"),
    # Long documents, where attention is a large share of the recompute: plain vs selective checkpointing vs
    # layer inputs offloaded to CPU memory (no Hugging Face baseline: the comparison is between tuneforge's options).
    "8b-lora-long": dict(shape="llama-8b", mode="lora", gc=True, micro_batch=1, seq_len=16384, doc_len=16384,
                         rows=40, engines="tuneforge,tuneforge-sac,tuneforge-actoffload"),
    # Fewer checkpointed layers (gradient_checkpointing_layers): the recompute traded for memory, up to the
    # Hugging Face run's peak (about 6 layers at this shape) and as far as the GPU allows (auto). QLoRA also with
    # PEFT's fp32 cast of the unquantized weights (-upcast; the Hugging Face baseline has it too).
    "8b-lora-ck": dict(shape="llama-8b", mode="lora", gc=True, micro_batch=2, seq_len=4096, hf_batch=2, hf_packed=True,
                       engines="hf,tuneforge-compile,tuneforge-compile-ck26,tuneforge-compile-ckauto"),
    "8b-qlora-ck": dict(shape="llama-8b", mode="qlora", gc=True, micro_batch=2, seq_len=4096, hf_batch=2,
                        hf_packed=True,
                        engines="hf,tuneforge-compile-upcast,tuneforge-compile,tuneforge-compile-ck26,"
                                "tuneforge-compile-ckauto"),
    # fp8: true with LoRA: the frozen base layers' matmuls in float8 (twice bf16's tensor-core rate on Hopper),
    # fully and partly checkpointed, against the bf16 run at the same checkpointing.
    "8b-lora-fp8": dict(shape="llama-8b", mode="lora", gc=True, micro_batch=2, seq_len=4096, hf_batch=2,
                        hf_packed=True, engines="hf,tuneforge-compile-ck26,tuneforge-fp8-compile-ck26,"
                                                "tuneforge-fp8-compile"),
    # The same with the frozen base stored in float8 (fp8_frozen_weights): the memory it frees buys layers without
    # recompute. 20 checkpointed layers stay under the Hugging Face run's 29.4 GiB; with the elementwise recompute
    # (lean) 11 do (issue #19's goal 1: 2.5x at no more memory).
    "8b-lora-fp8w": dict(shape="llama-8b", mode="lora", gc=True, micro_batch=2, seq_len=4096, hf_batch=2,
                         hf_packed=True, engines="hf,tuneforge-fp8w-compile-ck20,tuneforge-fp8w-lean-compile-ck11"),
    "1b-qlora": dict(shape="llama-1b", mode="lora", gc=True, micro_batch=2, seq_len=4096,
                     engines="tuneforge-qlora,tuneforge-qlora-fsdp,tuneforge-fsdp"),
    "1b-full-bf16": dict(shape="llama-1b", mode="full", micro_batch=4, seq_len=4096,
                         engines="tuneforge-compile,tuneforge-kahan-compile,tuneforge,tuneforge-kahan"),
    # fp8: true (torchao float8 linear layers, compute capability 8.9+) against bf16, compiled and eager; qat's cost.
    "1b-fp8": dict(shape="llama-1b", mode="full", micro_batch=4, seq_len=4096,
                   engines="tuneforge-compile,tuneforge-fp8-compile,tuneforge,tuneforge-fp8,tuneforge-qat-compile"),
}
VARIANTS = {"kernels", "compile", "kahan", "fsdp", "deepspeed", "fp8", "fp8w", "qat", "qlora", "sac", "actoffload", "upcast",
            "lean", "autotune"}


def variants(engine: str) -> set[str]:
    """`tuneforge-kernels-compile` -> {"kernels", "compile"}; an unknown part is an error."""
    head, *parts = engine.split("-")
    unknown = {p for p in parts if p not in VARIANTS and not re.fullmatch(r"ck(\d+|auto)", p)}
    if head != "tuneforge" or unknown:
        choices = "|-".join(sorted(VARIANTS) + ["ckN", "ckauto"])
        raise SystemExit(f"unknown engine {engine!r}: use hf or tuneforge[-{choices}]")
    return set(parts)


def _cuda():
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------- tuneforge
def run_tuneforge(args, model_dir: Path, rows: list[list[int]], work: Path, engine: str = "tuneforge") -> dict:
    from tuneforge.config import load
    from tuneforge.engine.run import train

    parts = variants(engine)
    fsdp = "fsdp" in parts

    data = work / "rows.jsonl"
    with data.open("w") as f:
        for r in rows:
            f.write(json.dumps({"input_ids": r}) + "\n")
    cfg = {
        "base_model": str(model_dir), "reinit_weights": args.mode != "qlora" and "qlora" not in parts,
        "bf16": True if _cuda() else "auto",
        "datasets": [{"path": str(data)}], "dataset_prepared_path": str(work / "prepared"),
        "sequence_len": args.seq_len, "sample_packing": True, "micro_batch_size": args.micro_batch,
        "gradient_accumulation_steps": args.grad_accum, "max_steps": args.steps, "learning_rate": 1e-5,
        "optimizer": "adamw_torch_fused", "lr_scheduler": "constant", "logging_steps": 1,
        "save_strategy": "no", "output_dir": str(work / f"out-{engine}"), "shuffle_merged_datasets": True,
    }
    if args.attn:
        cfg["attn_implementation"] = args.attn
    if args.mode != "full":
        cfg.update(adapter=args.mode, lora_r=16, lora_alpha=32, lora_target_linear=True)
    if args.mode == "qlora":
        cfg["load_in_4bit"] = True
    if args.gc:
        cfg["gradient_checkpointing"] = True
    if "kernels" in parts:
        if args.mode == "full":
            raise SystemExit(f"{engine}: the fused LoRA kernels need --mode lora or qlora")
        cfg.update(lora_mlp_kernel=True, lora_qkv_kernel=True, lora_o_kernel=True)
    if "qlora" in parts:
        if args.mode != "lora":
            raise SystemExit(f"{engine}: the qlora suffix takes --mode lora (--mode qlora quantizes every engine)")
        cfg.update(adapter="qlora", load_in_4bit=True)
    if "kahan" in parts:
        if args.mode != "full":
            raise SystemExit(f"{engine}: bf16_master_weights applies to --mode full")
        cfg["bf16_master_weights"] = "kahan"
    if "fp8" in parts:
        cfg["fp8"] = True
    if "fp8w" in parts:  # with an adapter: the frozen base weights kept in float8 (fp8_frozen_weights)
        cfg.update(fp8=True, fp8_frozen_weights=True)
    if "qat" in parts:  # int8 dynamic activations, int4 weights per group of 32 (Axolotl's 3b-qat example)
        cfg["qat"] = {"weight_dtype": "int4", "activation_dtype": "int8", "group_size": 32}
    if "sac" in parts:  # attention outputs kept from the forward (needs --gc)
        cfg["selective_checkpointing"] = True
    if "lean" in parts:  # compiled blocks recompute elementwise results (torch_compile_recompute_elementwise)
        cfg["torch_compile_recompute_elementwise"] = True
    if "autotune" in parts:
        cfg["torch_compile_mode"] = "max-autotune-no-cudagraphs"
    if "upcast" in parts:  # QLoRA: the unquantized weights in fp32, as PEFT's k-bit preparation casts them
        cfg["kbit_fp32_unquantized"] = True
    for part in parts:  # ckN: gradient_checkpointing_layers N (ckauto: auto); needs --gc
        if part.startswith("ck"):
            cfg["gradient_checkpointing_layers"] = "auto" if part == "ckauto" else int(part[2:])
    if "actoffload" in parts:  # checkpointed layer inputs in pinned CPU memory (needs --gc to be small)
        cfg["activation_offloading"] = True
    if args.compile or "compile" in parts:
        cfg["torch_compile"] = True
    if args.dtype:
        cfg["torch_dtype"] = args.dtype
    if fsdp:  # FSDP2 in this one process (its cost over plain training), optionally offloading to host memory
        cfg.update(fsdp_version=2, fsdp_config={"reshard_after_forward": True, "offload_params": args.offload})
    if "deepspeed" in parts:  # ZeRO-3 in this one process, FSDP2's sharding (its JSON's auto values filled)
        offload = {"offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}} if args.offload else {}
        cfg["deepspeed"] = {"zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                                                  **offload}, "bf16": {"enabled": "auto"}}
    import resource

    import torch

    if _cuda():
        torch.cuda.reset_peak_memory_stats()
    train(load(data=cfg), show_progress=False)
    host_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    records = [json.loads(line) for line in (work / f"out-{engine}" / "metrics.jsonl").open()]
    steps = [r for r in records if r.get("type") == "train"][args.warmup:]
    tps = statistics.median(r["tokens_per_second"] for r in steps)
    mfu = statistics.median(r["mfu"] for r in steps if r.get("mfu") is not None) if any(
        r.get("mfu") is not None for r in steps) else None
    first = [round(r["loss"], 4) for r in records if r.get("type") == "train"][:5]
    last = [round(r["loss"], 4) for r in records if r.get("type") == "train"][-1]
    return {"engine": engine, "tokens_per_s": tps, "mfu": mfu, "first_losses": first, "last_loss": last,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if _cuda() else None,
            "peak_host_gib_so_far": host_gib,
            "timed_steps": len(steps), "offload": bool((fsdp or "deepspeed" in parts) and args.offload)}


# ---------------------------------------------------------------- HF Trainer baseline
def run_hf(args, model_dir: Path, rows: list[list[int]], lengths: list[int], work: Path) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    # Built on the GPU directly (an 8B model takes minutes to initialise on the CPU); LoRA on a bf16 base,
    # as PEFT users train, full fine-tuning on fp32 weights under bf16 autocast.
    dtype = torch.bfloat16 if args.mode != "full" and _cuda() else torch.float32
    if args.mode == "qlora":  # as PEFT's QLoRA guide does it: NF4 + double quantization, bf16 compute
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.bfloat16,
                                                     attn_implementation="sdpa", device_map={"": 0})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gc)
    else:
        with torch.device("cuda" if _cuda() else "cpu"):
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    lora_params = None
    if args.mode != "full":
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
        lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.hf_packed:  # rows of exactly seq_len tokens: the same tokens per step as tuneforge's packed rows
        flat = [t for r in rows for t in r]
        rows = [flat[i:i + args.seq_len] for i in range(0, len(flat) - args.seq_len + 1, args.seq_len)]
        lengths = [args.seq_len] * len(rows)
    dataset = [{"input_ids": r, "labels": r} for r in rows]

    collated_tokens: list[int] = []  # trained tokens of each batch, in the order the Trainer consumes them

    def pad(batch):
        collated_tokens.append(sum(len(b["input_ids"]) - 1 for b in batch))
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = ids[i, :n]
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    timings: list[tuple[float, int, int]] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if _cuda():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if _cuda():
                torch.cuda.synchronize()
            timings.append((time.perf_counter() - self.t0, 0, 0))

    targs = TrainingArguments(
        output_dir=str(work / "out-hf"), per_device_train_batch_size=args.hf_batch, max_steps=args.steps,
        learning_rate=1e-5, bf16=_cuda(), optim="adamw_torch_fused", logging_steps=10**9, save_strategy="no",
        report_to=[], dataloader_drop_last=True, remove_unused_columns=False, lr_scheduler_type="constant",
        gradient_checkpointing=args.gc, seed=0,
    )
    if _cuda():
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=pad, callbacks=[Timer()])
    trainer.train()
    rates = [t / dt for (dt, _, _), t in zip(timings, collated_tokens, strict=False)][args.warmup:]
    tps = statistics.median(rates)
    dense, attn = flops_per_token_factor(config, lengths, lora_params)
    return {"engine": "hf", "tokens_per_s": tps, "mfu": tps * (dense + attn) / PEAK,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if _cuda() else None, "timed_steps": len(rates)}


SMALL_OPS = ("aten::fill_", "aten::zero_", "aten::copy_", "aten::index_put_", "aten::masked_fill_")


def _by_caller(events, top: int = 30) -> str:
    """Fills, copies and scatters grouped by the chain of ops that called them (the profiler's CPU parents) and
    their input shapes: which Python-level op asked for thousands of small kernels."""
    totals: dict[tuple[str, str], list[float]] = {}
    for e in events:
        if e.name not in SMALL_OPS:
            continue
        chain, parent = [e.name], e.cpu_parent
        while parent is not None and len(chain) < 6:
            chain.append(parent.name)
            parent = parent.cpu_parent
        key = (" < ".join(chain), str(e.input_shapes)[:80])
        entry = totals.setdefault(key, [0, 0.0])
        entry[0] += 1
        entry[1] += e.device_time_total / 1e3
    rows = sorted(totals.items(), key=lambda kv: (-kv[1][1], -kv[1][0]))[:top]
    return "\n".join(f"{ms:9.1f} ms {n:6d} x  {chain}  {shapes}" for (chain, shapes), (n, ms) in rows)


def profiled(args, model_dir: Path, rows: list[list[int]], work: Path, engine: str) -> dict:
    """The tuneforge run under torch.profiler: where the GPU time goes, how busy the GPU is, and the ops
    behind the kernels with their input shapes (a kernel alone does not say who asked for it; Python stacks
    would, but torch's profiler fails to decode some of their names). The whole run is profiled, compile
    warm-up and the final save included."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        res = run_tuneforge(args, model_dir, rows, work, engine)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    table = events.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90)
    shapes = prof.key_averages(group_by_input_shape=True).table(sort_by="cuda_time_total", row_limit=40,
                                                                 max_name_column_width=60)
    busy = sum(e.self_device_time_total for e in events) / 1e6
    Path(args.profile).write_text(f"wall {wall:.1f} s, GPU kernels {busy:.1f} s, {res.get('timed_steps')} timed "
                                  f"steps\n{table}\n\nops by input shapes:\n{shapes}\n\n"
                                  f"small ops by caller:\n{_by_caller(prof.events())}\n")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return res


def ratios(results: list[dict]) -> dict:
    """Every engine's tokens/s (and peak memory) over the first engine's and over hf's, from this one run."""
    out: dict = {}
    refs = [results[0]] + [r for r in results if r["engine"] == "hf" and r is not results[0]]
    for ref in refs:
        out[f"tokens_per_s_over_{ref['engine']}"] = {
            r["engine"]: round(r["tokens_per_s"] / ref["tokens_per_s"], 3) for r in results}
        if ref.get("peak_gib"):
            out[f"peak_gib_over_{ref['engine']}"] = {
                r["engine"]: round(r["peak_gib"] / ref["peak_gib"], 3) for r in results if r.get("peak_gib")}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    p.add_argument("--mode", default="full", choices=["full", "lora", "qlora"])
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4, help="packed rows per step (tuneforge)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="tuneforge: micro-batches per optimizer step (the same tokens per step in less memory)")
    p.add_argument("--hf-batch", type=int, default=8, help="padded rows per step (baseline)")
    p.add_argument("--hf-packed", action="store_true", help="baseline rows of exactly --seq-len tokens")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--doc-len", type=int, default=None, help="every row this many tokens (default: Alpaca-like "
                   "lengths)")
    p.add_argument("--attn", default=None, help="attn_implementation for tuneforge (default: automatic)")
    p.add_argument("--gc", action="store_true", help="gradient checkpointing in both engines")
    p.add_argument("--engines", default="tuneforge,hf")
    p.add_argument("--compile", action="store_true", help="torch_compile: true for tuneforge")
    p.add_argument("--dtype", default=None, help="torch_dtype for tuneforge's weights (e.g. bfloat16)")
    p.add_argument("--offload", action="store_true", help="tuneforge-fsdp: fsdp_config.offload_params; "
                   "tuneforge-deepspeed: ZeRO-3 parameter and optimizer offload")
    p.add_argument("--out", default=None)
    p.add_argument("--profile", default=None, help="write a CUDA kernel-time table of the tuneforge run here")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="the settings and engines of one comparison; other flags given override them")
    preset = p.parse_known_args(argv)[0].preset
    if preset:
        p.set_defaults(**PRESETS[preset])
    args = p.parse_args(argv)
    args.warmup = min(args.warmup, args.steps - 1)  # short smoke runs keep at least one timed step
    for engine in args.engines.split(","):
        if engine != "hf":
            variants(engine)  # fail before anything runs
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lengths = [args.doc_len] * args.rows if args.doc_len else alpaca_lengths(args.rows)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = make_model_dir(work, args.shape, weights=args.mode == "qlora" or "qlora" in args.engines)
        rows = make_rows(lengths, 1000)
        for engine in args.engines.split(","):
            if engine == "hf":
                res = run_hf(args, model_dir, rows, lengths, work)
            elif args.profile and engine == args.engines.split(",")[0]:
                res = profiled(args, model_dir, rows, work, engine)
            else:
                res = run_tuneforge(args, model_dir, rows, work, engine)
            res.update(shape=args.shape, mode=args.mode, seq_len=args.seq_len, steps=args.steps, gc=args.gc)
            print(json.dumps(res), flush=True)
            results.append(res)
            import gc

            import torch

            gc.collect()
            if _cuda():
                torch.cuda.empty_cache()
    print(json.dumps(ratios(results)), flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(json.dumps(r) for r in results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
