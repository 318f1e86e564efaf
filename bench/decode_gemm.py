"""The decode step's GEMMs alone: cuBLAS as `F.linear` calls it, against split-K variants, at decode batch sizes.

Why: at batch 256 a decode step's projections have M = 256 rows, so cuBLAS's tiles give few thread blocks
for the narrow outputs (Llama-3.2-1B's o projection, 2048 x 2048, is 32 tiles of 128 x 128 on 132 SMs),
and the profile of the compiled step showed them at ~1 TB/s. Splitting K over more blocks, each writing
an fp32 partial that one small pass sums, uses the whole GPU. Variants per (shape, projection):

- linear:     F.linear (cuBLAS, torch's default heuristics), the baseline
- lt:         the same through cuBLASLt (`torch.backends.cuda.preferred_blas_library("cublaslt")`)
- nn:         the weight stored transposed ([K, N], contiguous), `torch.mm(x, weight_t)`
- bmm-S:      K split in S slices as one batched GEMM with fp32 output (`torch.bmm(out_dtype=float32)`),
              partials summed in fp32 and cast (two kernels)
- triton-...: a Triton split-K kernel (tile BM x BN x BK, S slices, warps, stages), partials summed as above

Each is timed as 16 calls captured in a CUDA graph (median of replays), against the weight bytes it must
read; the largest difference from the fp32 product is reported too.

    python bench/decode_gemm.py --rows 256            # on a CUDA machine
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from decode_attention import time_call  # noqa: E402 - the bench scripts share the graph timer

# (N, K) per projection of the fused decode step: q/k/v fused, o, gate/up fused, down, LM head
SHAPES = {
    "llama-3.2-1b": {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192),
                     "lm_head": (128256, 2048)},
    "qwen2.5-0.5b": {"qkv": (1152, 896), "o": (896, 896), "gate_up": (9728, 896), "down": (896, 4864),
                     "lm_head": (151936, 896)},
}


def triton_kernel():
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def splitk_mm(x, w, out, M, N, K, K_PER: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  STAGES: tl.constexpr):
        """out[s] = x[:, s*K_PER:(s+1)*K_PER] @ w[:, s*K_PER:(s+1)*K_PER].T in fp32, s = program_id(2)."""
        pm, pn, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pm * BM + tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        base = s * K_PER
        for k in tl.range(0, K_PER, BK, num_stages=STAGES):
            a = tl.load(x + rm[:, None] * K + (base + k + rk)[None, :], mask=rm[:, None] < M, other=0.0)
            b = tl.load(w + rn[:, None] * K + (base + k + rk)[None, :], mask=rn[:, None] < N, other=0.0)
            acc = tl.dot(a, tl.trans(b), acc)
        tl.store(out + s * M * N + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))

    def call(x, weight, BM, BN, BK, S, warps, stages):
        M, K = x.shape
        N = weight.shape[0]
        part = torch.empty((S, M, N), dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(M, BM), triton.cdiv(N, BN), S)
        splitk_mm[grid](x, weight, part, M, N, K, K // S, BM, BN, BK, stages, num_warps=warps)
        return part.sum(0).to(x.dtype) if S > 1 else part[0].to(x.dtype)

    return call


def variants(x, weight, triton_call, configs):
    import torch
    import torch.nn.functional as F

    M, K = x.shape
    N = weight.shape[0]
    yield "linear", lambda: F.linear(x, weight)
    yield "lt", lambda: F.linear(x, weight)  # timed with cuBLASLt preferred (see measure)
    transposed = weight.t().contiguous()  # [K, N]: cuBLAS sees an NN product and may pick other tiles
    yield "nn", lambda: torch.mm(x, transposed)
    for S in (2, 3, 4, 8):
        if K % S or (K // S) % 64:
            continue
        xs = x.view(M, S, K // S).transpose(0, 1)  # [S, M, K/S]
        ws = weight.view(N, S, K // S).permute(1, 2, 0)  # [S, K/S, N]
        yield f"bmm-{S}", (lambda xs=xs, ws=ws: torch.bmm(xs, ws, out_dtype=torch.float32).sum(0).to(x.dtype))
    if triton_call is None:
        return
    for BM, BN, BK, S, warps, stages in configs:
        if K % S or (K // S) % BK:
            continue
        yield (f"triton-{BM}x{BN}x{BK}-s{S}-w{warps}-st{stages}",
               lambda c=(BM, BN, BK, S, warps, stages): triton_call(x, weight, *c))


def measure(shape: str, rows: int, triton_call, configs, iters: int) -> list[dict]:
    import torch

    out = []
    for proj, (N, K) in SHAPES[shape].items():
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16, generator=g)
        weight = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) / K**0.5
        exact = x.float() @ weight.float().T
        for name, fn in variants(x, weight, triton_call, configs):
            if name == "lt":
                torch.backends.cuda.preferred_blas_library("cublaslt")
            try:
                err = (fn().float() - exact).abs().max().item()
                us = time_call(fn, iters) * 1e6
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                out.append({"shape": shape, "proj": proj, "variant": name, "error": f"{type(exc).__name__}: {exc}"[:200]})
                continue
            finally:
                torch.backends.cuda.preferred_blas_library("cublas")
            out.append({"shape": shape, "proj": proj, "rows": rows, "N": N, "K": K, "variant": name, "us": round(us, 2),
                        "tb_per_s": round(N * K * 2 / us / 1e6, 2), "max_err": round(err, 5)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=sorted(SHAPES), choices=sorted(SHAPES))
    p.add_argument("--rows", type=int, nargs="+", default=[256])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--triton-shapes", nargs="*", default=["llama-3.2-1b"], help="shapes the Triton kernel is timed on")
    p.add_argument("--out", type=Path, default=Path("bench/results/decode_gemm.jsonl"))
    args = p.parse_args(argv)
    configs = [(bm, bn, 64, s, 4, 4) for bm, bn, s in itertools.product((64, 128), (64, 128), (1, 2, 4))]
    triton_call = triton_kernel() if args.triton_shapes else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for shape, rows in itertools.product(args.shapes, args.rows):
        recs = measure(shape, rows, triton_call if shape in args.triton_shapes else None, configs, args.iters)
        with args.out.open("a") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
        for proj in SHAPES[shape]:
            mine = sorted((r for r in recs if r.get("proj") == proj and "us" in r), key=lambda r: r["us"])
            base = next(r for r in recs if r.get("proj") == proj and r["variant"] == "linear")
            print(f"{shape} M={rows} {proj}: linear {base['us']} us; best " +
                  ", ".join(f"{r['variant']} {r['us']} us (err {r['max_err']})" for r in mine[:4]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
