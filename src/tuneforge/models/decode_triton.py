"""Triton kernels of the decode attention (`decode_kernel.py` holds the contract, the torch path and the
launch; this module is imported only where Triton is usable).

- `split`: program (row, KV head, split) over the row's own cache slots;
- `shared_prompt`: program (prompt group, KV head) over the prompt slots that a group of rows shares;
- `combine`: merges the partial softmax sums of a row's splits;
- `attend`: the online-softmax loop they share; `scaled`: their handling of an FP8 cache.
"""

import triton
import triton.language as tl


@triton.jit
def attend(q, k_base, v_base, skl, svl, lo, hi, qk_scale, d, M: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
           PRECISION: tl.constexpr):
    """Online softmax of the query rows q [M, D] over cache slots [lo, hi): (acc [M, D], max, sum)."""
    m = tl.full([M], float("-inf"), tl.float32)
    total = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    # Every block from the one holding `lo` up to `hi` has at least one valid slot, so the running
    # max is finite after the first iteration; an empty range runs no iteration at all.
    for n in range((lo // BLOCK) * BLOCK, hi, BLOCK):
        slot = n + tl.arange(0, BLOCK)
        valid = (slot >= lo) & (slot < hi)
        kb = tl.load(k_base + slot[:, None] * skl + d[None, :], mask=valid[:, None], other=0.0).to(q.dtype)
        scores = tl.dot(q, tl.trans(kb), input_precision=PRECISION) * qk_scale  # log2 units
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        vb = tl.load(v_base + slot[:, None] * svl + d[None, :], mask=valid[:, None], other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
        total = total * alpha + tl.sum(p, 1)
        m = m_new
    return acc, m, total


@triton.jit
def scaled(q, K, Scales, qk_scale, SCALED: tl.constexpr):
    """(q in the compute dtype, softmax scale, value scale). An FP8 cache (SCALED) is widened to q's dtype
    as it is loaded; its key scale folds into the softmax scale, its value scale into the output."""
    v_scale = 1.0
    if SCALED:
        qk_scale = qk_scale * tl.load(Scales)
        v_scale = tl.load(Scales + 1)
    else:
        q = q.to(K.dtype.element_ty)
    return q, qk_scale, v_scale


@triton.jit
def split(Q, K, V, Start, End, Scales, Acc, Max, Sum, Out, qk_scale,
          sqb, sqh, skb, skh, skl, svb, svh, svl, sob, soh, Hkv, S, split_len, first, s0,
          G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
          DIRECT: tl.constexpr, MERGE: tl.constexpr, SCALED: tl.constexpr):
    """Program (row b, KV head h, split s): slots [first + s * split_len, ...) of [start[b], end), stored
    as partial number s0 + s of the row (s0 = 1 when a shared-prompt kernel wrote partial 0). DIRECT (one
    split per row): the output is written here, merged with partial 0 first when MERGE (a merge pass of its
    own cost ~6 us per layer on an H200, about a tenth of the attention)."""
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    lo = tl.maximum(tl.load(Start + b), first + s * split_len)
    hi = tl.minimum(tl.load(End), first + (s + 1) * split_len)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    q = tl.load(Q + b * sqb + (h * G + g)[:, None] * sqh + d[None, :], mask=(g < G)[:, None], other=0.0)
    q, qk_scale, v_scale = scaled(q, K, Scales, qk_scale, SCALED)
    acc, m, total = attend(q, K + b * skb + h * skh, V + b * svb + h * svh, skl, svl, lo, hi, qk_scale, d,
                           GP, D, BLOCK, PRECISION)
    acc = acc * v_scale  # partial sums are linear in V: scaling them scales the merged output
    if DIRECT:  # the only split: its softmax sums are final (a filled range is never empty)
        if MERGE:  # the shared prompt's partial (written by the kernel launched before this one)
            row = (b * Hkv + h) * S * GP + g
            m0 = tl.load(Max + row)
            top = tl.maximum(m, m0)
            w, w0 = tl.exp2(m - top), tl.exp2(m0 - top)
            acc = acc * w[:, None] + tl.load(Acc + row[:, None] * D + d[None, :]) * w0[:, None]
            total = total * w + tl.load(Sum + row) * w0
        tl.store(Out + b * sob + (h * G + g)[:, None] * soh + d[None, :],
                 (acc / total[:, None]).to(Out.dtype.element_ty), mask=(g < G)[:, None])
    else:
        row = ((b * Hkv + h) * S + s0 + s) * GP + g
        tl.store(Acc + row[:, None] * D + d[None, :], acc)
        tl.store(Max + row, m)
        tl.store(Sum + row, total)


@triton.jit
def shared_prompt(Q, K, V, Start, Scales, Acc, Max, Sum, qk_scale,
                  sqb, sqh, skb, skh, skl, svb, svh, svl, Hkv, S, prompt_len,
                  G: tl.constexpr, GP: tl.constexpr, GROUP: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
                  BLOCK: tl.constexpr, PRECISION: tl.constexpr, SCALED: tl.constexpr):
    """Program (prompt group, KV head): the GROUP rows continuing one prompt share its cache slots
    [start, prompt_len) (identical copies), so they are read once, from the group's first row, for all
    GROUP x G query rows at once; stored as partial 0 of each row."""
    grp, h = tl.program_id(0), tl.program_id(1)
    r = tl.arange(0, M)  # query row r: generation r // G of the group, query head h * G + r % G
    live = r < GROUP * G
    b = grp * GROUP + r // G
    d = tl.arange(0, D)
    q = tl.load(Q + b[:, None] * sqb + (h * G + r % G)[:, None] * sqh + d[None, :], mask=live[:, None], other=0.0)
    q, qk_scale, v_scale = scaled(q, K, Scales, qk_scale, SCALED)
    lead = grp * GROUP
    acc, m, total = attend(q, K + lead * skb + h * skh, V + lead * svb + h * svh, skl, svl,
                           tl.load(Start + lead), prompt_len, qk_scale, d, M, D, BLOCK, PRECISION)
    row = ((b * Hkv + h) * S) * GP + r % G
    tl.store(Acc + row[:, None] * D + d[None, :], acc * v_scale, mask=live[:, None])
    tl.store(Max + row, m, mask=live)
    tl.store(Sum + row, total, mask=live)


@triton.jit
def combine(Acc, Max, Sum, Out, sob, soh, Hkv, S,
            G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, SP: tl.constexpr):
    b, h = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, SP)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    row = ((b * Hkv + h) * S + s)[:, None] * GP + g[None, :]  # [SP, GP]
    live = (s < S)[:, None]
    m = tl.load(Max + row, mask=live, other=float("-inf"))
    weight = tl.exp2(m - tl.max(m, 0)[None, :])  # empty splits (max -inf) weigh 0
    denom = tl.sum(weight * tl.load(Sum + row, mask=live, other=0.0), 0)
    acc = tl.load(Acc + row[:, :, None] * D + d[None, None, :], mask=live[:, :, None], other=0.0)
    out = tl.sum(acc * weight[:, :, None], 0) / denom[:, None]
    tl.store(Out + b * sob + (h * G + g)[:, None] * soh + d[None, :], out.to(Out.dtype.element_ty),
             mask=(g < G)[:, None])
