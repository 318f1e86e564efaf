"""A frozen LoRA base layer in float8, three ways, on one Llama-3.1-8B MLP projection (4,096 -> 14,336) at 8,192
tokens: forward plus the input's gradient (a frozen base has no weight gradient), compiled, against bf16.

- bf16: the reference.
- torchao `Float8Linear` (what `fp8: true` uses): the weights stay bf16 and are cast to float8 at each call.
- torchao `Float8Tensor` (`quantize_` with `Float8DynamicActivationFloat8WeightConfig`, per row and per tensor):
  the weights stored in float8, half the memory, if its matmul can be differentiated.

Prints each one's time, its relative error against bf16 (output and input gradient), and failures as one line.

    python bench/fp8_frozen_probe.py      # needs a GPU of compute capability 8.9+ and torchao
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _time(name: str, layer: nn.Module, ref: nn.Module, x0: torch.Tensor, g0: torch.Tensor, compiled: bool) -> None:
    run = torch.compile(layer) if compiled else layer
    try:
        for i in range(13):  # 3 warm-up calls, 10 timed
            if i == 3:
                torch.cuda.synchronize()
                t = time.perf_counter()
            x = x0.clone().requires_grad_(True)
            y = run(x)
            y.backward(g0)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t) * 100
    except Exception as e:  # noqa: BLE001 - the probe reports what fails
        print(f"{name}: FAILED {type(e).__name__}: {str(e).splitlines()[-1][:200]}", flush=True)
        return
    xr = x0.clone().requires_grad_(True)
    yr = ref(xr)
    yr.backward(g0)
    print(f"{name}: {ms:.2f} ms; relative error: output {_rel(y, yr):.4f}, input gradient {_rel(x.grad, xr.grad):.4f}",
          flush=True)


def main() -> None:
    from torchao.float8 import convert_to_float8_training
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    torch.manual_seed(0)
    ref = nn.Linear(4096, 14336, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    x0 = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    g0 = torch.randn(8192, 14336, device="cuda", dtype=torch.bfloat16)
    _time("bf16", copy.deepcopy(ref), ref, x0, g0, compiled=True)
    wrapped = nn.Sequential(copy.deepcopy(ref))
    convert_to_float8_training(wrapped)
    _time("Float8Linear (bf16 weights, cast per call)", wrapped[0], ref, x0, g0, compiled=True)
    for granularity in (PerRow(), PerTensor()):
        wrapped = nn.Sequential(copy.deepcopy(ref))
        quantize_(wrapped, Float8DynamicActivationFloat8WeightConfig(granularity=granularity))
        for compiled in (True, False):
            _time(f"Float8Tensor {type(granularity).__name__} ({'compiled' if compiled else 'eager'})", wrapped[0],
                  ref, x0, g0, compiled)


if __name__ == "__main__":
    main()
