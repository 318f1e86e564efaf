"""Rollout throughput: tuneforge's embedded engine vs `model.generate`, in the same run (issue 6).

Workload: Qwen2.5-0.5B- and Llama-3.2-1B-shaped models with random weights (built from a config, no
download), bf16 on CUDA, `--batch` rows: `--batch / --generations` prompts of `--prompt-len` random tokens,
each continued `--generations` times (GRPO's num_generations; 1 by default), `--new-tokens` sampled
tokens per prompt at temperature 1.0 with no stop token (every row generates exactly --new-tokens, so
both engines do the same work). Reported: generated tokens/s (best of --repeats after a warm-up), for

- embedded:        static KV cache + CUDA-graph-captured decode step (tuneforge default)
- embedded-eager:  the same engine without graph capture (what the graph buys)
- embedded-compiled: the same with the model's forward torch.compile'd for decoding
- embedded-compiled-transformers: the same through the transformers layers instead of tuneforge's fused
                   decode step (rollout/fused_decode.py: fused q/k/v and gate/up projections)
- embedded-compiled-whole-cache: transformers layers, attention over every static-cache slot instead of
                   only the filled ones (what the filled-range decode kernel buys)
- embedded-compiled-fp8: the default compiled engine with an FP8 KV cache (opt-in,
                   `generation_kwargs: {kv_cache_dtype: fp8}`; not the same arithmetic as the others)
- embedded-compiled-autotune: the decode step compiled with mode max-autotune-no-cudagraphs (inductor times
                   Triton GEMM templates against cuBLAS for the step's skinny GEMMs; longer compile)
- embedded-compiled-shared / -unshared: with --generations > 1, decode attention reads each prompt's cache
                   slots once for all its generations always / never (`shared_prompt_attention`; the other
                   embedded engines do so where `decode_kernel.shared_prompt_pays` says it is faster)
- generate:        transformers `model.generate(do_sample=True)` with its default (dynamic) cache
- generate-static: the same with `cache_implementation="static"`

and the speed-up of `embedded` over `generate` (target: >= 5x on an H200). One JSON line per engine is
printed and appended to --out.

    python bench/rollout_throughput.py                         # both shapes, batch 256, 256 + 512 tokens
    python bench/rollout_throughput.py --tiny                  # CPU smoke check in seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SHAPES = {
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                   tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=32768)),
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                   tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=8192)),
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096)),
}


def build(shape: str, device: str, dtype):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    kind, kw = SHAPES[shape]
    config = (Qwen2Config if kind == "qwen2" else LlamaConfig)(**kw, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def timed(fn, device: str, repeats: int) -> tuple[float, float]:
    """(best of `repeats` timed calls, seconds of the first call: warm-up, compilation, graph capture)."""
    import torch

    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, first


def run(shape: str, args) -> list[dict]:
    import torch

    from tuneforge.rollout.base import SamplingParams
    from tuneforge.rollout.embedded import EmbeddedSampler

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build(shape, device, dtype)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    if args.batch % args.generations:
        raise SystemExit("--batch must be a multiple of --generations")
    n = args.generations
    prompts = torch.randint(3, vocab, (args.batch // n, args.prompt_len), generator=g)
    prompt_lists = prompts.tolist()
    params = SamplingParams(temperature=1.0, max_tokens=args.new_tokens)
    generated = args.batch * args.new_tokens
    results = []

    def embedded(graphs: bool, compile: bool = False, filled_range: bool = True, fused: bool = True, kv_dtype=None,
                 shared: bool | None = None):
        sampler = EmbeddedSampler(model, pad_id=0, cuda_graphs=graphs, compile=compile, filled_range=filled_range,
                                  fused=fused, kv_cache_dtype=kv_dtype, shared_prompt_attention=shared)
        prefill_seconds = time_prefill(sampler, device)

        def go():
            prefill_seconds.clear()
            r = sampler.generate(prompt_lists, n, params)
            assert r.num_tokens == generated, r.num_tokens
            go.graphs = r.meta.get("cuda_graphs")
            go.prefill = sum(prefill_seconds)
        return go

    def generate(static: bool):
        ids = prompts.to(device)
        mask = torch.ones_like(ids)
        extra = {"cache_implementation": "static"} if static else {}

        def go():
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                     top_p=1.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                     eos_token_id=None, pad_token_id=0, num_return_sequences=n, **extra)
            assert out.shape == (args.batch, args.prompt_len + args.new_tokens)
        return go

    engines = {"embedded": embedded(True), "embedded-eager": embedded(False), "embedded-compiled": embedded(True, True),
               "embedded-compiled-transformers": embedded(True, True, fused=False),
               "embedded-compiled-whole-cache": embedded(True, True, filled_range=False),
               "embedded-compiled-fp8": embedded(True, True, kv_dtype=torch.float8_e4m3fn),
               "embedded-compiled-shared": embedded(True, True, shared=True),
               "embedded-compiled-unshared": embedded(True, True, shared=False),
               "embedded-compiled-autotune": embedded(True, "max-autotune-no-cudagraphs"),
               "generate": generate(False), "generate-static": generate(True)}
    if args.profile:
        sampler = EmbeddedSampler(model, pad_id=0, cuda_graphs=False, compile=device == "cuda")
        profile_decode(sampler, prompt_lists, n, params, args.profile, shape)
    for name in args.engines:
        fn = engines[name]
        try:
            seconds, first = timed(fn, device, args.repeats)
        except Exception as exc:  # noqa: BLE001 - report and continue with the other engines
            results.append({"shape": shape, "engine": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        rec = {"shape": shape, "engine": name, "device": device, "batch": args.batch, "generations": n,
               "prompt_len": args.prompt_len,
               "new_tokens": args.new_tokens, "seconds": round(seconds, 4), "first_call_seconds": round(first, 2), "tokens_per_second": round(generated / seconds, 1)}
        if name.startswith("embedded"):
            rec["cuda_graphs"] = bool(getattr(fn, "graphs", False))
            rec["prefill_seconds_last_call"] = round(fn.prefill, 4)
        if device == "cuda":
            rec["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        results.append(rec)
        print("measured", json.dumps(rec), flush=True)  # as soon as measured (a later engine may time out)
    base = next((r for r in results if r["engine"] == "generate" and "tokens_per_second" in r), None)
    for r in results:
        if base and "tokens_per_second" in r:
            r["speedup_vs_generate"] = round(r["tokens_per_second"] / base["tokens_per_second"], 2)
    engines.clear()  # drop the closures holding the model before the next shape is built
    return results


def time_prefill(sampler, device: str) -> list[float]:
    """Record the seconds of each prefill (prompts into the KV cache, decoder set up) of `sampler`: the
    rest of a call is the decode loop. Synchronizes around the prefill, so only for this breakdown."""
    import torch

    seconds = []
    inner = sampler._prefill_and_decoder

    def timed_prefill(*a, **kw):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = inner(*a, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        return out

    sampler._prefill_and_decoder = timed_prefill
    return seconds


def profile_decode(sampler, prompts, n: int, params, path: Path, shape: str) -> None:
    """Kernel-time table of one generation without graph capture (compiled on CUDA): where a step's time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    sampler.generate(prompts, n, params)  # warm-up
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        sampler.generate(prompts, n, params)
    table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=30)
    with Path(path).open("a") as f:
        f.write(f"== {shape}: {params.max_tokens} decode steps\n{table}\n")


def set_inductor(settings: list[str]) -> None:
    import ast

    import torch._inductor.config as config

    for item in settings:
        key, value = item.split("=", 1)
        if not hasattr(config, key):
            raise SystemExit(f"--inductor: torch._inductor.config has no {key!r}")
        setattr(config, key, ast.literal_eval(value))


def _free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["qwen2.5-0.5b", "llama-3.2-1b"], choices=sorted(SHAPES))
    p.add_argument("--engines", nargs="+", default=["embedded", "embedded-eager", "generate", "generate-static"])
    p.add_argument("--batch", type=int, default=256, help="rows generated at once (prompts x generations)")
    p.add_argument("--generations", type=int, default=1, help="completions per prompt (GRPO's num_generations)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--profile", type=Path, default=None, help="append a kernel-time table per shape to this file")
    p.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                   help="torch._inductor.config settings for this process (e.g. combo_kernels=True); run engines "
                        "that compile in a process of their own, as compiled code is reused across engines")
    p.add_argument("--tiny", action="store_true", help="CPU smoke check: tiny shape, batch 8, 16 + 16 tokens")
    p.add_argument("--out", type=Path, default=Path("bench/results/rollout_throughput.jsonl"))
    args = p.parse_args(argv)
    if args.tiny:
        args.shapes, args.batch, args.prompt_len, args.new_tokens, args.repeats = ["tiny"], 8, 16, 16, 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    set_inductor(args.inductor)
    failed = False
    for shape in args.shapes:
        records = run(shape, args)
        _free_cuda()
        for rec in records:
            print(json.dumps(rec), flush=True)
            failed |= "error" in rec
            with args.out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
