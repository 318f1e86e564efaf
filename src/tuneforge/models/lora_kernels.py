"""Fused LoRA blocks: one autograd Function per block (MLP, QKV, output projection).

A LoRA linear layer computes  y = x W^T + b + s (x A^T) B^T  with W, b frozen and A (r x in), B (out x r)
trained (Hu et al., 2021, "LoRA", eq. 3; s = alpha / r, or alpha / sqrt(r) with rsLoRA). PEFT builds it
from separate modules, so autograd keeps every intermediate and runs one kernel per small op. Here each
block is one Function whose backward is written out:

    dB = s (dy^T xa)        dxa = s (dy B)        dA = dxa^T x        dx = dy W + dxa A      (xa = x A^T)

- MLP (SwiGLU, as in Llama/Qwen/Mistral: down(silu(gate(x)) * up(x))): saves x, the gate and up outputs
  and the three rank-r products; silu(gate) and its product with up (two tensors of the intermediate
  width per layer) are recomputed in backward instead of saved.
- QKV: the three A matrices are stacked so one matmul of x gives all three rank-r products, and the
  LoRA part of dx and all three dA are one matmul each in backward.
- Output projection: one LoRA linear, dx in one addmm.

The frozen base weight W may be a bitsandbytes 4-bit weight (QLoRA, `load_in_4bit`): it is dequantized
where it is used, once in forward and once again in backward, so no 16-bit copy of it lives between the
two (bitsandbytes' own 4-bit matmul does the same); without autocast the base matmul then runs in the
input's dtype.

Everything is plain torch, so it runs on CPU (where the tests compare it with PEFT) and on CUDA, and
torch.compile traces through it when `torch_compile` is on. Autocast state is captured in forward and
re-entered in backward (what torch.amp.custom_fwd/custom_bwd do, without fixing a device type).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# One LoRA linear layer's tensors: (W, b or None, A, B, scaling).
Lora = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, float]


def _amp_state(x: torch.Tensor) -> tuple[str, bool, torch.dtype]:
    device = x.device.type
    return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)


def _lora_in(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """x as PEFT feeds it to lora_A: cast to A's dtype (under autocast the matmul recasts it anyway)."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(A.dtype)


def _dense(W: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The base weight as a matrix of floats (a 4-bit bitsandbytes weight dequantized), in `dtype` if given."""
    state = getattr(W, "quant_state", None)
    if state is not None:
        from bitsandbytes.functional import dequantize_4bit

        W = dequantize_4bit(W.data, state)
    return W if dtype is None else W.to(dtype)


def _forward(x: torch.Tensor, W, b, B, s: float, xa: torch.Tensor) -> torch.Tensor:
    """base(x) + s * xa B^T. Under autocast (or one dtype throughout) the LoRA term is added inside one
    in-place GEMM, without the two temporaries of the output's size that PEFT's `+ lora * s` makes; else
    in PEFT's order and result dtype (LoRA in A's dtype, cast back)."""
    autocast = torch.is_autocast_enabled(x.device.type)
    y = F.linear(x, _dense(W, None if autocast else x.dtype), b)
    if autocast or xa.dtype == y.dtype:
        _flat(y).addmm_(_flat(xa).to(y.dtype), B.to(y.dtype).t(), alpha=s)
        return y
    return (y + F.linear(xa, B) * s).to(y.dtype)


def _lora_dy(dy: torch.Tensor, xa: torch.Tensor, B: torch.Tensor, s: float):
    """(dy in the LoRA path's dtype, dxa = s dy B): the LoRA path runs in xa's dtype (A's dtype without
    autocast, as PEFT casts x to it; the autocast dtype with it)."""
    dyl = dy.to(xa.dtype)
    return dyl, (dyl @ B.to(xa.dtype)) * s


def _dB(dyl: torch.Tensor, xa: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    return ((dyl.t() @ xa) * s).to(B.dtype)


def _dA(dxa: torch.Tensor, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    return (dxa.t() @ x.to(dxa.dtype)).to(A.dtype)


def _plus_lora_dx(dx: torch.Tensor, dxa: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """dx + dxa A: one addmm when the dtypes agree (always under autocast), else added in dx's dtype as
    autograd does for PEFT's cast of x."""
    if dxa.dtype == dx.dtype or torch.is_autocast_enabled(dx.device.type):
        return torch.addmm(dx, dxa, A.to(dxa.dtype))
    return dx + (dxa @ A.to(dxa.dtype)).to(dx.dtype)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class LoRALinearFn(torch.autograd.Function):
    """One LoRA linear layer (the attention output projection)."""

    @staticmethod
    def forward(ctx, x, W, b, A, B, s):
        xa = F.linear(_lora_in(x, A), A)
        ctx.save_for_backward(x, W, A, B, xa)
        ctx.s, ctx.amp = s, _amp_state(x)
        return _forward(x, W, b, B, s, xa)

    @staticmethod
    def backward(ctx, dy):
        x, W, A, B, xa = ctx.saved_tensors
        device, enabled, dtype = ctx.amp
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            dy2, x2, xa2 = _flat(dy), _flat(x), _flat(xa)
            dyl, dxa = _lora_dy(dy2, xa2, B, ctx.s)
            dA, dB = _dA(dxa, x2, A), _dB(dyl, xa2, B, ctx.s)
            dx = _plus_lora_dx(dy2 @ _dense(W, dy2.dtype), dxa, A).view(x.shape) if ctx.needs_input_grad[0] else None
        return dx, None, None, dA, dB, None


class LoRAQKVFn(torch.autograd.Function):
    """q, k and v projections with LoRA from one input; the A matrices stacked into one matmul."""

    @staticmethod
    def forward(ctx, x, Wq, bq, Aq, Bq, sq, Wk, bk, Ak, Bk, sk, Wv, bv, Av, Bv, sv):
        ranks = (Aq.shape[0], Ak.shape[0], Av.shape[0])
        A = torch.cat([Aq, Ak, Av])
        xa = F.linear(_lora_in(x, A), A)
        xq, xk, xv = xa.split(ranks, dim=-1)
        outs = tuple(_forward(x, W, b, B, s, part) for (W, b, B, s, part) in (
            (Wq, bq, Bq, sq, xq), (Wk, bk, Bk, sk, xk), (Wv, bv, Bv, sv, xv)))
        ctx.save_for_backward(x, Wq, Bq, Wk, Bk, Wv, Bv, A, xa)
        ctx.scales, ctx.ranks, ctx.amp = (sq, sk, sv), ranks, _amp_state(x)
        return outs

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x, Wq, Bq, Wk, Bk, Wv, Bv, A, xa = ctx.saved_tensors
        device, enabled, dtype = ctx.amp
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            x2, xa2 = _flat(x), _flat(xa)
            dys = [_flat(d) for d in (dq, dk, dv)]
            parts = xa2.split(ctx.ranks, dim=-1)
            lora = [_lora_dy(dy, p, B, s) for dy, p, B, s in zip(dys, parts, (Bq, Bk, Bv), ctx.scales, strict=True)]
            dBs = [_dB(dyl, p, B, s) for (dyl, _), p, B, s in zip(lora, parts, (Bq, Bk, Bv), ctx.scales, strict=True)]
            dxa = torch.cat([d for _, d in lora], dim=-1)
            dA = _dA(dxa, x2, A)  # all three dA in one matmul
            dx = None
            if ctx.needs_input_grad[0]:
                dx = torch.addmm(dys[0] @ _dense(Wq, dys[0].dtype), dys[1], _dense(Wk, dys[1].dtype))
                dx = _plus_lora_dx(torch.addmm(dx, dys[2], _dense(Wv, dys[2].dtype)), dxa, A).view(x.shape)
        dAq, dAk, dAv = dA.split(ctx.ranks)
        return (dx, None, None, dAq, dBs[0], None, None, None, dAk, dBs[1], None, None, None, dAv, dBs[2], None)


# On CUDA the element-wise SwiGLU steps run as one compiled (Triton) kernel each, without the fp32
# temporaries of the intermediate width that eager mode makes; False keeps them eager (the CPU path).
COMPILE_ELEMENTWISE = True
_compiled: dict = {}


def _elementwise(fn, t: torch.Tensor):
    if not (COMPILE_ELEMENTWISE and t.is_cuda) or torch.compiler.is_compiling():
        return fn  # inside a compiled block inductor fuses them anyway
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]


def _silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


def _silu_mul_grads(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor):
    """(dg, du) of h = silu(g) * u, with silu recomputed from g in fp32:
    silu'(g) = sig(g) (1 + g (1 - sig(g)))."""
    gf = g.float()
    sig = torch.sigmoid(gf)
    du = (dh.float() * gf * sig).to(u.dtype)
    dg = (dh.float() * u.float() * sig * (1 + gf * (1 - sig))).to(g.dtype)
    return dg, du


class LoRASwiGLUFn(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) with LoRA on all three projections."""

    @staticmethod
    def forward(ctx, x, Wg, bg, Ag, Bg, sg, Wu, bu, Au, Bu, su, Wd, bd, Ad, Bd, sd):
        ranks = (Ag.shape[0], Au.shape[0])
        A = torch.cat([Ag, Au])
        xa = F.linear(_lora_in(x, A), A)
        xg, xu = xa.split(ranks, dim=-1)
        g = _forward(x, Wg, bg, Bg, sg, xg)
        u = _forward(x, Wu, bu, Bu, su, xu)
        h = _elementwise(_silu_mul, g)(g, u)
        ha = F.linear(_lora_in(h, Ad), Ad)
        y = _forward(h, Wd, bd, Bd, sd, ha)
        ctx.save_for_backward(x, g, u, Wg, Bg, Wu, Bu, A, xa, Wd, Ad, Bd, ha)  # not silu(g) nor h
        ctx.scales, ctx.ranks, ctx.amp = (sg, su, sd), ranks, _amp_state(x)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, g, u, Wg, Bg, Wu, Bu, A, xa, Wd, Ad, Bd, ha = ctx.saved_tensors
        sg, su, sd = ctx.scales
        device, enabled, dtype = ctx.amp
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            dy2, g2, u2, ha2 = _flat(dy), _flat(g), _flat(u), _flat(ha)
            h2 = _elementwise(_silu_mul, g2)(g2, u2)  # recomputed, not saved
            dyl, dxa_d = _lora_dy(dy2, ha2, Bd, sd)
            dAd, dBd = _dA(dxa_d, h2, Ad), _dB(dyl, ha2, Bd, sd)
            del h2
            dh = _plus_lora_dx(dy2 @ _dense(Wd, dy2.dtype), dxa_d, Ad)
            dg, du = _elementwise(_silu_mul_grads, dh)(dh, g2, u2)
            del dh
            x2, xa2 = _flat(x), _flat(xa)
            xg, xu = xa2.split(ctx.ranks, dim=-1)
            (dgl, dxa_g), (dul, dxa_u) = _lora_dy(dg, xg, Bg, sg), _lora_dy(du, xu, Bu, su)
            dBg, dBu = _dB(dgl, xg, Bg, sg), _dB(dul, xu, Bu, su)
            dxa = torch.cat([dxa_g, dxa_u], dim=-1)
            dA = _dA(dxa, x2, A)  # both dA in one matmul
            dx = None
            if ctx.needs_input_grad[0]:
                dx = torch.addmm(dg @ _dense(Wg, dg.dtype), du, _dense(Wu, du.dtype))
                dx = _plus_lora_dx(dx, dxa, A).view(x.shape)
        dAg, dAu = dA.split(ctx.ranks)
        return (dx, None, None, dAg, dBg, None, None, None, dAu, dBu, None, None, None, dAd, dBd, None)


def lora_linear(x: torch.Tensor, p: Lora) -> torch.Tensor:
    return LoRALinearFn.apply(x, *p)


def lora_qkv(x: torch.Tensor, q: Lora, k: Lora, v: Lora) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return LoRAQKVFn.apply(x, *q, *k, *v)


def lora_swiglu(x: torch.Tensor, gate: Lora, up: Lora, down: Lora) -> torch.Tensor:
    return LoRASwiGLUFn.apply(x, *gate, *up, *down)
