"""The embedded rollout engine: batched sampling in the training process with the live policy weights.

Why not `model.generate`: it re-plans every step on the host (logits processors, stopping criteria,
cache bookkeeping), so small models are host-bound on a GPU. Here one generation is:

1. Prefill. Prompts are left-padded to a common length P (rounded up to a bucket, so shapes repeat
   across batches) and run once into a static KV cache of P + max_tokens slots: for Llama, Mistral,
   Qwen2 and Qwen3 by tuneforge's own compiled prefill (`fused_decode.py`), once per distinct prompt
   for all its generations; for other models by the transformers forward, once per row.
2. Decode. `_DecodeStep` advances every row by one token using only fixed-shape tensors: the next
   cache slot and position come from a step counter tensor, the attention mask is a preallocated
   [N, 1, 1, L] buffer whose next column is opened in place, and tokens and log-probs are written into
   preallocated output buffers. Because nothing in a step depends on Python values, on CUDA the step is
   captured once as a CUDA graph and replayed (one launch per token instead of hundreds of kernels).
   On CPU, and whenever capture fails, the same step runs eagerly. For Llama, Mistral, Qwen2, Qwen3 and
   Gemma3 the step is tuneforge's own (`fused_decode.py`: fused q/k/v and gate/up projections); other
   models decode through their transformers layers. Either way attention reads only the filled cache
   slots of each row (`models/decode_kernel.py`, a Triton kernel on CUDA), with the query heads that
   share a KV head grouped so the cache is read once.
3. Rows that emitted a stop token keep "generating" padding (masked out) until every row is done or
   max_tokens is reached; completion is checked every `check_every` steps.

Sampling (`sampling.py`): repetition penalty (over prompt and generated tokens, HF's rule), temperature,
top-k, top-p, min-p; temperature 0 is greedy; exact, capturable draws.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time

import torch

from tuneforge.errors import DataError, NotSupportedYet
from tuneforge.models import attention
from tuneforge.models.losses import unwrap_peft

from .base import Rollout, SamplingParams
from .fused_decode import FAMILIES, cache_sizes, fused_decoder, prompt_attention, prompt_positions
from .sampling import sample_next

log = logging.getLogger("tuneforge")


def cache_kwargs(model, cache) -> dict:
    """The KV-cache keyword of this transformers release: `cache` (>= 5.2x) or `past_key_values` (5.17).

    Passing the wrong one is silently swallowed by **kwargs and decoding runs without a cache.
    """
    import inspect

    params = inspect.signature(type(model).forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


# One CUDA graph capture at a time in this process: with trl.async_prefetch a background sampler may capture
# while the training thread's sampler does (the first prefetch_depth steps generate synchronously).
_CAPTURE = threading.Lock()


def _bucket(n: int, multiple: int = 16) -> int:
    return -(-n // multiple) * multiple


class _DecodeStep:
    """One decode step over static buffers (see the module docstring); `run()` advances all rows.

    `decode(ids [N], positions [N], slot, end) -> logits [N, V]` runs the model for one token per row
    (`_TransformersDecode` or `fused_decode.FusedDecoder`); slot is the cache slot of the fed token and
    `end` one past it, both device tensors.
    """

    def __init__(self, decode, prompt_lens: torch.Tensor, P: int, first: torch.Tensor, first_logp: torch.Tensor,
                 params: SamplingParams, seen: torch.Tensor | None, stop_ids: torch.Tensor, pad_id: int, autocast,
                 sample_fn=None):
        N, T = first.shape[0], params.max_tokens
        dev = first.device
        self.decode, self.sample_fn = decode, sample_fn or sample_next
        self.params, self.seen, self.stop_ids, self.pad_id, self.autocast = params, seen, stop_ids, pad_id, autocast
        self.P = P
        self.prompt_lens = prompt_lens
        self.step = torch.zeros((), dtype=torch.long, device=dev)  # tokens already in the output
        self.tokens = torch.full((N, T), pad_id, dtype=torch.long, device=dev)
        self.logps = torch.zeros((N, T), dtype=torch.float32, device=dev)
        self.done = torch.zeros(N, dtype=torch.bool, device=dev)
        self.lengths = torch.zeros(N, dtype=torch.long, device=dev)
        self.current = torch.zeros(N, dtype=torch.long, device=dev)  # static input of the next step
        self._write(first, first_logp)
        self.steps_done = 1  # host-side count of written steps (the tensor `step` never needs a sync)
        self.graph = None

    def _write(self, token: torch.Tensor, logp: torch.Tensor) -> None:
        """Record the token of step `self.step` for unfinished rows, then advance the counter."""
        token = torch.where(self.done, torch.full_like(token, self.pad_id), token)
        col = self.step.view(1, 1).expand(token.shape[0], 1)
        self.tokens.scatter_(1, col, token.unsqueeze(1))
        self.logps.scatter_(1, col, torch.where(self.done, torch.zeros_like(logp), logp).unsqueeze(1))
        self.lengths += (~self.done).long()
        if self.seen is not None:
            self.seen.scatter_(1, token.unsqueeze(1), True)
        self.done |= torch.isin(token, self.stop_ids)
        self.current.copy_(token)  # in place: a captured graph reads this buffer on every replay
        self.step += 1

    def _forward(self) -> None:
        slot = self.P + self.step - 1  # cache slot of the last written token
        with self.autocast():
            logits = self.decode(self.current, self.prompt_lens + self.step - 1, slot, (slot + 1).to(torch.int32).view(1))
        token, logp = self.sample_fn(logits, self.params, self.seen)
        self._write(token, logp)

    def capture(self) -> bool:
        """Record `_forward` as a CUDA graph after one warm-up step on a side stream. False: stay eager.

        The warm-up is a real decode step (its token is kept). Capture itself only records kernels, it
        does not run them, so the buffers are unchanged by it.
        """
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._forward()
            torch.cuda.current_stream().wait_stream(stream)
            self.steps_done += 1
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA work the training thread issues meanwhile (async prefetch decodes in a background
            # thread) does not invalidate the capture, as it would under the default mode, "global"
            with _CAPTURE, torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._forward()
            self.graph = graph
            return True
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager decoding
            log.warning("CUDA graph capture of the decode step failed (%s); decoding eagerly", exc)
            self.graph = None
            return False

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._forward()
        self.steps_done += 1


class _Prompts:
    """Prompts left-padded to a common length P: ids [N, P], real-token mask [N, P], lengths [N], and the
    cache length L = P + max_tokens; `logits` [N, V] of the last prompt position once prefilled."""

    def __init__(self, ids, valid, lens, P: int, L: int, logits=None):
        self.ids, self.valid, self.lens, self.P, self.L, self.logits = ids, valid, lens, P, L, logits

    @classmethod
    def padded(cls, rows: list[list[int]], T: int, pad_id: int, device: torch.device) -> _Prompts:
        lens = [len(r) for r in rows]
        P = _bucket(max(lens))  # bucketed, so shapes repeat across batches
        ids = torch.full((len(rows), P), pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, P - len(r):] = torch.tensor(r, dtype=torch.long)
        lens = torch.tensor(lens, device=device)
        valid = torch.arange(P, device=device).unsqueeze(0) >= (P - lens).unsqueeze(1)
        return cls(ids.to(device), valid, lens, P, P + T)  # one host-to-device copy, not one per row

    def repeated(self, group: int, logits: torch.Tensor) -> _Prompts:
        """Every row `group` times in a row (a prompt's generations), with the prefill's logits."""
        ids, valid, lens, logits = (t.repeat_interleave(group, dim=0) for t in (self.ids, self.valid, self.lens, logits))
        return _Prompts(ids, valid, lens, self.P, self.L, logits)


class EmbeddedSampler:
    """Generates with the given (training) model. `cuda_graphs`: capture the decode step on CUDA."""

    def __init__(self, model, pad_id: int, *, max_batch: int | None = None, cuda_graphs: bool = True,
                 check_every: int = 8, autocast_dtype: torch.dtype | None = None, compile: bool | str = False,
                 filled_range: bool = True, fused: bool = True, kv_cache_dtype: torch.dtype | None = None,
                 shared_prompt_attention: bool | None = None):
        self.model = model
        # decode attention reads a prompt's cache slots once per group of its generations (fused path, CUDA):
        # None where the kernel's rule says it is faster (9.7% more tokens/s for Llama-1B in groups of 8,
        # docs/benchmarks.md), True always, False never
        self.shared_prompt_attention = shared_prompt_attention
        self.kv_cache_dtype = kv_cache_dtype  # e.g. torch.float8_e4m3fn (fused path only); None: the model's
        self.filled_range = filled_range  # False: attention reads the whole static cache (benchmark baseline)
        self.fused = fused  # fused prefill and step for Llama/Mistral/Qwen2/Qwen3/Gemma3 (fused_decode.py)
        self.used_fused = False
        self.compile = compile  # a string: torch.compile's mode for the decode step (benchmarks)
        self.pad_id = pad_id
        self.max_batch = max_batch
        self.cuda_graphs = cuda_graphs
        self.check_every = check_every
        self.autocast_dtype = autocast_dtype
        self.used_graphs = False

    def sync_weights(self, model) -> None:
        self.model = model

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams) -> Rollout:
        start = time.perf_counter()
        rows = [p for p in prompt_ids for _ in range(n)]
        chunk = self.max_batch or len(rows)
        comp, logps, finished = [], [], []
        group = n if chunk % n == 0 else 1  # a chunk holds whole groups of one prompt's generations
        with _generation_mode(self.model) as net:
            for at in range(0, len(rows), chunk):
                c, lp, f = self._generate_rows(net, rows[at : at + chunk], params, group)
                comp += c
                logps += lp
                finished += f
        return Rollout([list(p) for p in prompt_ids], comp, logps, finished, n=n, seconds=time.perf_counter() - start,
                       meta={"cuda_graphs": self.used_graphs})

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext
        return lambda: torch.autocast(device.type, dtype=self.autocast_dtype)

    def _prefill(self, net, prompts: _Prompts):
        """The transformers prefill: prompts through the model into a StaticCache of L slots.
        Returns (cache, attendable cache slots [N, L]) and sets `prompts.logits`."""
        from transformers import StaticCache

        N, P, L, dev = prompts.ids.shape[0], prompts.P, prompts.L, prompts.ids.device
        window = min(cache_sizes(net.config, L))
        if window < L:
            raise NotSupportedYet(f"this model keeps a sliding window of {window} tokens in some layers, shorter than "
                                  f"prompt + completion ({L} here), and the embedded engine supports that only on its "
                                  f"fused path ({FAMILIES} without DoRA or quantized weights, "
                                  f"generation_kwargs.fused_decode on); lower max_completion_length / the prompt "
                                  f"length below the window, or generate with vLLM (trl.use_vllm)")
        slots = torch.zeros((N, L), dtype=torch.bool, device=dev)  # cache slots a row may attend to
        slots[:, :P] = prompts.valid
        allowed = prompt_attention(prompts.valid, L)
        positions = prompt_positions(prompts.valid)

        cache = StaticCache(config=net.config, max_cache_len=L)
        with self._autocast(dev)(), _eager(_compiled_blocks(net)):
            out = net(input_ids=prompts.ids, attention_mask=allowed.unsqueeze(1), position_ids=positions,
                      **cache_kwargs(net, cache), use_cache=True, logits_to_keep=1)
        prompts.logits = out.logits[:, -1]
        return cache, slots

    def _prefill_and_decoder(self, net, rows: list[list[int]], T: int, group: int):
        """(prefilled prompts, decode function). The fused path where it applies: each distinct prompt is
        prefilled once into the cache rows of its whole group; otherwise transformers prefills every row."""
        dev = next(net.parameters()).device
        compiled = self.compile and dev.type == "cuda"
        want_fused = self.fused and self.filled_range
        distinct = _Prompts.padded(rows[::group] if want_fused else rows, T, self.pad_id, dev)
        shared = (group, distinct.P) if group > 1 else None
        decoder = (fused_decoder(net, len(rows), distinct.L, self.autocast_dtype, self.kv_cache_dtype, shared,
                                 self.shared_prompt_attention) if want_fused else None)
        self.used_fused = decoder is not None
        if decoder is None and self.kv_cache_dtype is not None:
            _warn_once(f"kv_cache_dtype {self.kv_cache_dtype} needs the fused decode path ({FAMILIES} without DoRA "
                       f"or quantized weights); this model decodes with a cache in its own dtype")
        if decoder is not None:
            with self._autocast(dev)():
                logits = (_compiled_fused_prefill() if compiled else _fused_prefill)(decoder, distinct.ids,
                                                                                   distinct.valid, group)
            pre = distinct.repeated(group, logits)
            mode = self.compile if isinstance(self.compile, str) else None
            return pre, _FusedDecode(decoder, (pre.P - pre.lens).to(torch.int32), compiled, mode)
        pre = distinct if not want_fused or group == 1 else _Prompts.padded(rows, T, self.pad_id, dev)
        cache, slots = self._prefill(net, pre)
        kv_start = (pre.P - pre.lens).to(torch.int32) if self.filled_range else None  # first slot of each prompt
        mask = slots.view(len(rows), 1, 1, pre.L).clone()
        return pre, _TransformersDecode(net, cache, mask, kv_start, compiled)

    def _generate_rows(self, net, rows: list[list[int]], params: SamplingParams, group: int = 1):
        """Generate for `rows`, which come in runs of `group` identical prompts (GRPO's generations).

        With the fused path each distinct prompt is prefilled once, into the cache rows of its whole
        group: prefill compute divided by the group size.
        """
        if min(len(r) for r in rows) == 0:
            raise DataError("an empty prompt cannot be continued; give every prompt at least one token")
        T = params.max_tokens
        pre, decode = self._prefill_and_decoder(net, rows, T, group)
        N, dev = len(rows), pre.ids.device
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros((N, pre.logits.shape[-1]), dtype=torch.bool, device=dev)
            seen.scatter_(1, pre.ids, pre.valid)
        first, first_logp = sample_next(pre.logits, params, seen)
        stop = torch.tensor(sorted(params.stop_token_ids) or [-1], dtype=torch.long, device=dev)
        compiled = self.compile and dev.type == "cuda"
        step = _DecodeStep(decode, pre.lens, pre.P, first, first_logp, params, seen, stop, self.pad_id,
                           self._autocast(dev), _compiled_sampler() if compiled else None)
        self.used_graphs = False
        if self.cuda_graphs and dev.type == "cuda" and T > 2:
            self.used_graphs = step.capture()
        while step.steps_done < T:
            if step.steps_done % self.check_every == 0 and bool(step.done.all()):
                break
            step.run()
        tokens, logps, lengths = step.tokens.tolist(), step.logps.tolist(), step.lengths.tolist()
        done = step.done.tolist()
        comp = [tokens[i][: lengths[i]] for i in range(N)]
        lps = [logps[i][: lengths[i]] for i in range(N)]
        return comp, lps, done


class _TransformersDecode:
    """Decode through the transformers forward: mask column opened in place, filled range passed along."""

    def __init__(self, net, cache, mask: torch.Tensor, kv_start: torch.Tensor | None, compiled: bool):
        self.forward = _compiled_forward(net) if compiled else net
        self.eager = not compiled and _compiled_blocks(net)
        self.cache_kwargs = cache_kwargs(net, cache)  # once, not per token (it inspects a signature)
        self.mask, self.kv_start = mask, kv_start

    def __call__(self, ids, positions, slot, end):
        self.mask.index_fill_(-1, slot.view(1), True)
        filled = {}
        if self.kv_start is not None:  # attention reads cache slots [kv_start, slot] only
            filled = {attention.KV_START: self.kv_start, attention.KV_END: end}
        with _eager(self.eager):
            out = self.forward(input_ids=ids.unsqueeze(1), attention_mask=self.mask,
                               position_ids=positions.unsqueeze(1), **self.cache_kwargs, **filled, use_cache=True,
                               logits_to_keep=1)
        return out.logits[:, -1]


class _FusedDecode:
    """Decode through `fused_decode.FusedDecoder` (fused projections, filled-range attention)."""

    def __init__(self, decoder, kv_start: torch.Tensor, compiled: bool, mode: str | None = None):
        self.decoder, self.kv_start = decoder, kv_start
        self.step = _compiled_fused_step(mode) if compiled else _fused_step

    def __call__(self, ids, positions, slot, end):
        return self.step(self.decoder, ids, positions, slot, self.kv_start, end)


def _fused_step(decoder, ids, positions, slot, start, end):
    return decoder(ids, positions, slot, start, end)


def _fused_prefill(decoder, ids, valid, group: int):
    return decoder.prefill(ids, valid, group)


# Compiled once per process (or per model) and reused. Measured on an H200, the eager decode step is a
# thousand small kernels of 2-10 us each, so fusion rather than launch overhead (which the CUDA graph
# already removes) decides the speed. The CUDA graph is captured around the compiled kernels. Shapes
# use torch's automatic dynamic mode: every prompt-length bucket gives another cache length (and the
# last batch may be smaller), and a static compile per shape would cost 15-30 s each and hit dynamo's
# recompile limit; instead the second shape compiles once more with that dimension symbolic.
@functools.cache
def _compiled_fused_step(mode: str | None = None):
    return torch.compile(_fused_step, mode=mode)


@functools.cache
def _compiled_fused_prefill():
    return torch.compile(_fused_prefill)


@functools.cache
def _compiled_sampler():
    return torch.compile(sample_next)


def _compiled_forward(net):
    fn = getattr(net, "_tuneforge_decode_forward", None)
    if fn is None:
        fn = net._tuneforge_decode_forward = torch.compile(net.forward)
    return fn


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def _compiled_blocks(net) -> bool:
    """Whether training compiled some of `net`'s modules (`torch_compile` compiles each block in place); a
    deep copy of the model (async prefetch's snapshot, the half-precision snapshot, FSDP2's whole copy)
    drops a module's compiled call, so it has none."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in net.modules())


def _eager(compiled_blocks: bool):
    """Run transformers layers eagerly where training compiled them: with a KV cache they would recompile per
    layer until dynamo's limit, then fall back anyway. The stance is process-wide, so it is set only for a
    model with compiled blocks: a background thread generating from a copy must not make the training
    thread's compiled blocks run eagerly meanwhile."""
    return torch.compiler.set_stance("force_eager") if compiled_blocks else contextlib.nullcontext()


@contextlib.contextmanager
def _generation_mode(model):
    """The transformers model (LoRA layers stay active), in eval mode, with our cache-aware attention."""
    net = unwrap_peft(model)
    was_training = net.training
    impl = net.config._attn_implementation
    net.set_attn_implementation(attention.register_decode())
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)
        net.set_attn_implementation(impl)
