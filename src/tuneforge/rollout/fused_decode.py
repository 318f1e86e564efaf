"""tuneforge's own prefill and decode step for the standard decoder family (Llama, Mistral, Qwen2, Qwen3,
Gemma3 text models).

Why: at decode time a step is bound by reading the weights, and transformers' layers issue seven
separate projections per layer. The small ones (k and v: 2 MB each for Llama-3.2-1B) run at a fraction
of the memory bandwidth; measured on an H200 the seven GEMMs of a layer moved 116 MB in 74 us (1.6 TB/s).
Here q/k/v and gate/up are concatenated once per generation, so a layer runs four GEMMs, and decode
calls the filled-range decode attention (`models/decode_kernel.py`) on the decoder's own KV cache.

The prefill is this module's too, for the same layers: the eager transformers prefill spent as long in
small elementwise kernels (norms, rotary, casts) as in its GEMMs and attended over every static-cache
slot; this one is compiled on CUDA, attends over the prompt only, and writes each prompt's keys and
values straight into the cache rows of all its generations (GRPO's `num_generations`), so a prompt is
prefilled once per group.

What is reused from the transformers model, as modules: the token embedding, the RMSNorms (and Qwen3's
per-head q/k norms), the rotary embedding (so every RoPE scaling type is the model's own), the MLP
activation and the LM head. What is re-implemented: the layer wiring and rotate-half RoPE, identical to
transformers' for these architectures (tests compare tokens and log-probs with the model's own
forward). Gemma3's norms around the attention output and the MLP, its local and global rotary
embeddings and its final logit soft-capping are followed; attention soft-capping (Gemma2) is not.
LoRA adapters are folded into the fused weights (`W + B A * scale`, PEFT's `get_delta_weight`).
Sliding-window layers (Mistral, Qwen2 with `use_sliding_window`, Gemma3's local layers) keep every slot
of the cache and read only their window of it. Anything else (other architectures, DoRA, quantized base
weights) returns None from `fused_decoder`, and the caller prefills and decodes through the transformers
forward.

Memory: the fused q/k/v and gate/up copies exist only during a generation (for a 1B model ~1.2 GB,
for 8B ~9 GB); `generation_kwargs: {fused_decode: false}` turns this path off.

FP8 KV cache (opt-in, `generation_kwargs: {kv_cache_dtype: fp8}`, as vLLM's `kv_cache_dtype`): keys and
values are stored as float8_e4m3fn with one scale per layer for each, set from the prompts' largest
absolute key / value (x2 headroom; decoded values beyond it saturate). Decode attention reads half the
bytes, which is most of a large batch's step time; the prompt's own attention in the prefill is exact.
The sampled tokens' log-probs then come from a slightly different model than the trainer's, which the
importance-sampling correction (`vllm_importance_sampling_correction`) is there to absorb.
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.nn.functional as F

from tuneforge.models.decode_kernel import decode_attention, shared_prompt_pays

log = logging.getLogger("tuneforge")

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM")


FAMILIES = "Llama, Mistral, Qwen2, Qwen3, Gemma3"  # ARCHITECTURES in words, for messages


def cache_sizes(config, length: int) -> list[int]:
    """Cache slots transformers gives each layer for a cache of `length` (a sliding-window layer keeps
    min(window, length)); read from a StaticCache, which allocates lazily, so nothing is allocated."""
    from transformers import StaticCache

    return [layer.max_cache_len for layer in StaticCache(config=config, max_cache_len=length).layers]


class Unsupported(Exception):
    """This model (or one of its layers) has no fused decode path; decode through transformers instead."""


def fused_decoder(net, rows: int, length: int, dtype: torch.dtype | None = None, kv_dtype: torch.dtype | None = None,
                  shared_prompt: tuple[int, int] | None = None, share: bool | None = None) -> FusedDecoder | None:
    """A FusedDecoder over `net` with a KV cache of `rows` x `length` slots, or None (reason logged)."""
    try:
        return FusedDecoder(net, rows, length, dtype, kv_dtype, shared_prompt, share)
    except Unsupported as exc:
        log.debug("fused decode unavailable, decoding through transformers: %s", exc)
        return None


def prompt_positions(valid: torch.Tensor) -> torch.Tensor:
    """RoPE positions of left-padded prompts (valid [n, P]: real tokens): 0 at each first real token."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def prompt_attention(valid: torch.Tensor, length: int) -> torch.Tensor:
    """[n, P, length] bool: the cache slots (the prompt's, at slots [0, P)) each prompt position attends to,
    causal over real tokens. A padded position sees itself only, so its softmax is defined; its output is
    never used."""
    P = valid.shape[1]
    q = torch.arange(P, device=valid.device).view(1, P, 1)
    k = torch.arange(length, device=valid.device).view(1, 1, length)
    real = torch.nn.functional.pad(valid, (0, length - P)).unsqueeze(1)
    return (real & (k <= q)) | (k == q)


def windowed(P: int, window: int, device) -> torch.Tensor:
    """[P, P] bool: key slot k within the sliding window of query slot q (q - window < k), transformers' rule."""
    q = torch.arange(P, device=device).view(P, 1)
    return torch.arange(P, device=device).view(1, P) > q - window


def _effective_linear(linear, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a plain Linear or a PEFT LoRA Linear with its active adapters folded in."""
    from tuneforge.models.nf4 import is_nf4

    if is_nf4(getattr(getattr(linear, "base_layer", linear), "weight", None)):
        # QLoRA under FSDP2: folding would dequantize every weight into a 16-bit copy of the model.
        raise Unsupported("4-bit NF4 weights")
    if type(linear) is torch.nn.Linear:
        weight, bias = linear.weight, linear.bias
    else:
        base = getattr(linear, "base_layer", None)
        if type(base) is not torch.nn.Linear or not hasattr(linear, "get_delta_weight"):
            raise Unsupported(f"{type(linear).__name__} layers")
        weight, bias = base.weight, base.bias
        if not (linear.merged or linear.disable_adapters):
            for name in linear.active_adapters:
                if name not in linear.lora_A:
                    continue
                if linear.use_dora.get(name) or getattr(linear, "lora_bias", {}).get(name):
                    raise Unsupported("DoRA / LoRA-bias adapters")
                weight = weight + linear.get_delta_weight(name).to(weight.dtype)
    dtype = dtype or weight.dtype
    return weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype)


def _fuse(linears, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    parts = [_effective_linear(m, dtype) for m in linears]
    weight = torch.cat([w for w, _ in parts]) if len(parts) > 1 else parts[0][0]
    if all(b is None for _, b in parts):
        return weight, None
    biases = [b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) for w, b in parts]
    return weight, torch.cat(biases)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_HEADROOM = 2.0  # the per-layer scale leaves room for decoded keys/values up to 2x the prompts' largest


class _Layer:
    def __init__(self, layer, rows: int, length: int, dtype, kv_dtype=None, window: int | None = None):
        attn, mlp = layer.self_attn, layer.mlp
        if getattr(attn, "attn_logit_softcapping", None) is not None:
            raise Unsupported("attention logit soft-capping")
        self.window = window  # sliding-window attention: a token sees itself and the window - 1 before it
        self.rope_kind = None  # Gemma3: the layer type, which picks the rotary embedding (local / global)
        self.input_norm = layer.input_layernorm
        if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma3: norms around attention output and MLP too
            self.attn_out_norm, self.post_norm = layer.post_attention_layernorm, layer.pre_feedforward_layernorm
            self.mlp_out_norm = layer.post_feedforward_layernorm
        else:
            self.attn_out_norm, self.post_norm, self.mlp_out_norm = None, layer.post_attention_layernorm, None
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.sizes = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
        self.qkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj], dtype)
        self.o = _fuse([attn.o_proj], dtype)
        self.gate_up = _fuse([mlp.gate_proj, mlp.up_proj], dtype)
        self.down = _fuse([mlp.down_proj], dtype)
        self.act = mlp.act_fn
        weight = self.qkv[0]
        # Zeros, not empty: the torch attention path multiplies unattended slots by probability 0.
        shape = (rows, self.sizes[1] // self.head_dim, length, self.head_dim)
        fp8 = kv_dtype is not None and kv_dtype.itemsize == 1
        # An FP8 cache is held as bytes (uint8) and read as float8 by the attention: index_copy has no
        # float8 kernels, and compiled code may not write to a view of another dtype.
        self.kv_dtype = kv_dtype or weight.dtype
        self.keys = torch.zeros(shape, dtype=torch.uint8 if fp8 else self.kv_dtype, device=weight.device)
        self.values = torch.zeros_like(self.keys)
        # FP8 cache: one scale for the keys and one for the values of this layer, set by the prefill
        self.scales = torch.ones(2, device=weight.device) if fp8 else None
        self.shared = (1, 0)  # (group, prompt length) when attention reads a group's prompt slots once

    def _to_cache(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """x as the cache holds it (FP8: scaled, saturated, rounded, as bytes)."""
        if self.scales is None:
            return x.to(self.keys.dtype)
        return (x.float() / self.scales[which]).clamp(-FP8_MAX, FP8_MAX).to(self.kv_dtype).view(torch.uint8)

    def cached(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) in their element type (float8 views of the bytes for an FP8 cache)."""
        return self.keys.view(self.kv_dtype), self.values.view(self.kv_dtype)

    def _qkv(self, h, cos, sin):
        """q, k, v [..., heads, head_dim] of hidden states h [..., hidden], RoPE applied to q and k."""
        q, k, v = F.linear(self.input_norm(h), *self.qkv).split(self.sizes, dim=-1)
        shape = (*h.shape[:-1], -1, self.head_dim)
        q, k, v = q.view(shape), k.view(shape), v.view(shape)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def _rest(self, h, attn):
        """The layer after attention: output projection, residual, MLP, residual (Gemma3: each branch's
        output normalised before its residual add)."""
        out = F.linear(attn.to(h.dtype), *self.o)
        h = h + (out if self.attn_out_norm is None else self.attn_out_norm(out))
        gate, up = F.linear(self.post_norm(h), *self.gate_up).chunk(2, dim=-1)
        out = F.linear(self.act(gate) * up, *self.down)
        return h + (out if self.mlp_out_norm is None else self.mlp_out_norm(out))

    def __call__(self, h, cos, sin, slot, start, end):
        """One token per row: h [N, hidden], cos/sin [N, 1, head_dim]; `start` already narrowed to this
        layer's window (the cache keeps every slot; a window only narrows what is read)."""
        q, k, v = self._qkv(h, cos, sin)
        for which, (cache, new) in enumerate(((self.keys, k), (self.values, v))):
            cache.index_copy_(2, slot.view(1), self._to_cache(new.unsqueeze(2), which))
        attn = decode_attention(q, *self.cached(), start, end, self.scaling, self.scales, *self.shared)
        return self._rest(h, attn.reshape(h.shape[0], -1))

    def prefill(self, h, cos, sin, allowed, group: int):
        """Prompts: h [n, P, hidden], cos/sin [n, P, 1, head_dim], allowed [n, 1, P, P] (this layer's window
        applied). Keys and values go to cache slots [0, P) of rows i * group ... i * group + group - 1."""
        n, P = h.shape[:2]
        q, k, v = self._qkv(h, cos, sin)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [n, Hkv, P, D], the cache's layout
        if self.scales is not None:  # attention below reads the unrounded prompt keys and values
            amax = torch.stack([k.abs().amax(), v.abs().amax()]).float().clamp(min=1e-12)
            self.scales.copy_(amax * (FP8_HEADROOM / FP8_MAX))
        for which, (cache, new) in enumerate(((self.keys, k), (self.values, v))):
            cache.view(n, group, *cache.shape[1:])[:, :, :, :P] = self._to_cache(new.unsqueeze(1), which)
        repeat = q.shape[2] // k.shape[1]  # query heads per KV head, as transformers' repeat_kv orders them
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(repeat, 1),
                                              v.repeat_interleave(repeat, 1), attn_mask=allowed, scale=self.scaling)
        return self._rest(h, attn.transpose(1, 2).reshape(n, P, -1))


class FusedDecoder:
    """`prefill(ids, valid, group)` fills the cache with the prompts; then one decode step is
    `decoder(ids [N], positions [N], slot, start [N], end [1]) -> logits [N, V]`.

    `slot` (0-d long tensor) is the cache slot the new token's keys and values go to; attention reads
    slots start[b] <= s < end. All inputs are tensors, so the step can be captured as a CUDA graph.
    """

    def __init__(self, net, rows: int, length: int, dtype: torch.dtype | None = None,
                 kv_dtype: torch.dtype | None = None, shared_prompt: tuple[int, int] | None = None,
                 share: bool | None = None):
        """shared_prompt (group, P): rows come in runs of `group` continuing one prompt of P slots, which
        decode attention then reads once per run (CUDA kernel; see `decode_kernel`): where that is faster
        (share None, `shared_prompt_pays`), always (True: tests, benchmarks) or never (False)."""
        if type(net).__name__ not in ARCHITECTURES:
            raise Unsupported(f"architecture {type(net).__name__}")
        # Every layer here keeps all `length` slots; a window shorter than that narrows the slots it attends to.
        sizes = cache_sizes(net.config, length)
        if getattr(net.config, "use_bidirectional_attention", False):
            raise Unsupported("bidirectional attention")
        base = net.model
        self.embed, self.norm, self.rotary, self.lm_head = base.embed_tokens, base.norm, base.rotary_emb, net.lm_head
        self.softcap = getattr(net.config, "final_logit_softcapping", None)  # Gemma: cap * tanh(logits / cap)
        with torch.no_grad():
            self.layers = [_Layer(layer, rows, length, dtype, kv_dtype, size if size < length else None)
                           for layer, size in zip(base.layers, sizes, strict=True)]
        if "layer_type" in inspect.signature(type(self.rotary).forward).parameters:  # one rotary per layer type
            for ours, theirs in zip(self.layers, base.layers, strict=True):
                ours.rope_kind = theirs.self_attn.layer_type
        self._share_prompts(shared_prompt, share)

    def _share_prompts(self, shared_prompt: tuple[int, int] | None, share: bool | None) -> None:
        """One decision for the whole cache (every layer's has the same shape); sliding-window layers never
        share, as a window gives each row its own first slot."""
        if shared_prompt is None:
            return
        if share is None:
            share = shared_prompt_pays(self.layers[0].keys, *shared_prompt)
        for layer in self.layers:
            if share and layer.window is None:
                layer.shared = shared_prompt

    def prefill(self, ids: torch.Tensor, valid: torch.Tensor, group: int = 1) -> torch.Tensor:
        """Run left-padded prompts ids [n, P] (valid: real tokens) into cache slots [0, P) of their `group`
        rows each (n x group = the cache's rows); returns the last position's logits [n, V]."""
        allowed = {None: prompt_attention(valid, ids.shape[1]).unsqueeze(1)}  # per window size
        for w in {layer.window for layer in self.layers} - {None}:
            allowed[w] = allowed[None] & windowed(ids.shape[1], w, ids.device)
        h = self.embed(ids)
        rope = self._rope(h, prompt_positions(valid), heads_axis=True)  # [n, P, 1, D]: broadcasts over the heads
        for layer in self.layers:
            h = layer.prefill(h, *rope[layer.rope_kind], allowed[layer.window], group)
        return self._logits(h[:, -1])

    def __call__(self, ids, positions, slot, start, end) -> torch.Tensor:
        h = self.embed(ids)
        rope = self._rope(h, positions.view(-1, 1))  # [N, 1, D]: the length-1 axis broadcasts over the heads
        starts = {w: start if w is None else torch.maximum(start, end - w) for w in {la.window for la in self.layers}}
        for layer in self.layers:
            h = layer(h, *rope[layer.rope_kind], slot, starts[layer.window], end)
        return self._logits(h)

    def _rope(self, h, positions, heads_axis: bool = False) -> dict:
        """{layer type: (cos, sin)}: the model's rotary embedding, per layer type where it has several
        (Gemma3: local for sliding layers, global for the others); `heads_axis` adds one before D."""
        out = {}
        for kind in {layer.rope_kind for layer in self.layers}:
            cos, sin = self.rotary(h, positions) if kind is None else self.rotary(h, positions, kind)
            out[kind] = (cos.unsqueeze(-2), sin.unsqueeze(-2)) if heads_axis else (cos, sin)
        return out

    def _logits(self, h):
        logits = self.lm_head(self.norm(h))
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap
