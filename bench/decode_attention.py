"""Decode attention kernel (models/decode_kernel.py) alone: effective bandwidth per launch configuration.

Workload: the rollout benchmark's Llama-3.2-1B step at batch 256 (32 query heads over 8 KV heads of 64,
a 768-slot bf16 cache, every row attending to slots [0, --filled)), and the Qwen2.5-0.5B one (14 over 2).
For each (BLOCK, num_warps, num_stages) the kernel's GPU time per call (see `time_call`) and
the bytes of filled K and V it must read per call divided by that time. The torch path over the same
slots (`decode_kernel.reference`) is timed as a same-run baseline. With --group G the rows come in runs of G
that share a --prompt-len prompt (GRPO), and the shared-prompt kernel is timed too; its TB/s counts the
per-row bytes it avoids reading, so it is an equivalent, not a measured, bandwidth.

    python bench/decode_attention.py            # on a CUDA machine with Triton
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

SHAPES = {"llama-3.2-1b": (256, 32, 8, 768, 64), "qwen2.5-0.5b": (256, 14, 2, 768, 64)}


def time_call(fn, iters: int, per_graph: int = 16) -> float:
    """Median GPU seconds of one fn() call: `per_graph` calls are captured in a CUDA graph and each replay
    timed between CUDA events. Launching from Python (Triton's launcher takes tens of microseconds) would
    otherwise leave the GPU idle between calls and time the host instead, as it does not in the rollout,
    where the decode step is one captured graph."""
    import torch

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    graph.replay()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1000 / per_graph)
    return statistics.median(times)


def measure(name: str, shape: tuple, args) -> list[dict]:
    import torch

    from tuneforge.models import decode_kernel

    B, Hq, Hkv, L, D = shape
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    start = torch.zeros(B, dtype=torch.int32, device="cuda")
    end = torch.tensor([args.filled], dtype=torch.int32, device="cuda")
    read = 2 * B * Hkv * args.filled * D * k.element_size()
    runs = {"torch-reference": lambda: decode_kernel.reference(q, k, v, start, end, D ** -0.5)}
    # stages: software pipelining depth; each stage holds a K and a V block in shared memory, which bounds
    # how many programs an SM keeps resident (None: Triton's default)
    grid = list(itertools.product((32, 64, 128), (2, 4, 8), (None, 1, 2, 3)) if args.configs == "all"
                else [(64, 4, None)])
    for block, warps, stages in grid:
        runs[f"triton-b{block}-w{warps}-s{stages or 'default'}"] = (
            lambda b=block, w=warps, s=stages: decode_kernel._triton_decode(q, k, v, start, end, D ** -0.5, b, w, s))
    if args.fp8:  # the opt-in FP8 cache: half the bytes to read, widened in registers
        scales = torch.stack([k.abs().amax(), v.abs().amax()]).float() / 224
        k8, v8 = ((x.float() / s).to(torch.float8_e4m3fn) for x, s in ((k, scales[0]), (v, scales[1])))
        # splits: a row's slots over several programs (shorter dependent chains per program, one more merge
        # pass); the FP8 kernel reads half the bytes, so its per-program latency may now dominate
        for block, warps, splits in itertools.product((32, 64, 128), (2, 4), (1, 2, 4)):
            runs[f"triton-fp8-b{block}-w{warps}-S{splits}"] = (lambda b=block, w=warps, n=splits: decode_kernel._triton_decode(
                q, k8, v8, start, end, D ** -0.5, b, w, kv_scales=scales, splits=n))
    for splits in (2, 4):
        runs[f"triton-b64-w4-S{splits}"] = (lambda n=splits: decode_kernel._triton_decode(
            q, k, v, start, end, D ** -0.5, splits=n))
    if args.group > 1:  # GRPO: rows continue a prompt of --prompt-len slots `group` times; read once per group
        P = args.prompt_len
        for x in (k, v):
            x[:, :, :P] = x[::args.group, :, :P].repeat_interleave(args.group, 0)
        for block, warps, stages in grid:  # block and stages apply to both kernels, warps to the per-row one
            runs[f"triton-shared-prompt-g{args.group}-b{block}-w{warps}-s{stages or 'default'}"] = (
                lambda b=block, w=warps, s=stages: decode_kernel._triton_decode(
                    q, k, v, start, end, D ** -0.5, b, w, s, group=args.group, prompt_len=P))
    want = decode_kernel.reference(q.float(), k.float(), v.float(), start, end, D ** -0.5)
    records = []
    for label, fn in runs.items():
        try:
            err = (fn().float() - want).abs().max().item()
            seconds = time_call(fn, args.iters)
        except Exception as exc:  # noqa: BLE001 - a configuration Triton cannot build is reported, not fatal
            rec = {"shape": name, "config": label, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        else:
            rec = {"shape": name, "config": label, "filled": args.filled, "us": round(seconds * 1e6, 2),
                   "tb_per_s": round(read / seconds / 1e12, 3), "max_abs_err": err}
        print(json.dumps(rec), flush=True)
        records.append(rec)
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--filled", type=int, default=512, help="filled slots per row (the rollout's average)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--fp8", action="store_true", help="also time an FP8 cache (bytes counted as bf16's)")
    p.add_argument("--configs", choices=["all", "default"], default="all", help="default: only BLOCK=64, 4 warps")
    p.add_argument("--group", type=int, default=1, help="> 1: also time the shared-prompt kernel (GRPO groups)")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt slots shared by a group (with --group)")
    p.add_argument("--out", type=Path, default=Path("bench/results/decode_attention.jsonl"))
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, shape in SHAPES.items():
        with args.out.open("a") as f:
            f.writelines(json.dumps(rec) + "\n" for rec in measure(name, shape, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
