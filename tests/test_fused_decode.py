"""The fused decode step (rollout/fused_decode.py) decodes exactly like the transformers forward.

Each case generates greedily through both paths of the embedded engine (fused, and the transformers
forward, which tests elsewhere compare with `model.generate`) and compares tokens and log-probs.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from tuneforge.rollout.base import SamplingParams
from tuneforge.rollout.embedded import EmbeddedSampler

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=100)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
CONFIGS = {
    "llama (llama3 RoPE scaling, attention bias)": lambda: LlamaConfig(**SMALL, rope_scaling=LLAMA3_ROPE, attention_bias=True),
    "qwen2 (q/k/v bias)": lambda: Qwen2Config(**SMALL),
    "qwen3 (q/k norms, head_dim 32)": lambda: Qwen3Config(**SMALL, head_dim=32),
    "mistral": lambda: MistralConfig(**SMALL),
    # sandwich norms, (1 + w) RMSNorm, scaled embedding, local and global RoPE, logit soft-capping
    "gemma3 (window longer than the generation)": lambda: Gemma3TextConfig(
        **SMALL, head_dim=32, sliding_window=64, layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=30.0),
}
PROMPTS = [[5, 6, 7, 9, 10], [8, 9], [11] * 20]


def _model(config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # move the biases and norms off their zero / one initial values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _generate(model, fused: bool):
    sampler = EmbeddedSampler(model, pad_id=0, fused=fused)
    out = sampler.generate(PROMPTS, 1, SamplingParams(temperature=0.0, max_tokens=12))
    return out, sampler.used_fused


def _assert_same(a, b):
    assert a.completion_ids == b.completion_ids
    for la, lb in zip(a.logprobs, b.logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_decode_equals_the_transformers_forward(name):
    model = _model(CONFIGS[name]())
    fused, used = _generate(model, True)
    plain, used_plain = _generate(model, False)
    assert used and not used_plain
    _assert_same(fused, plain)


@pytest.mark.parametrize("dora", [False, True])
def test_lora_adapters_are_folded_in_and_dora_falls_back(dora):
    from peft import LoraConfig, get_peft_model

    base = _model(CONFIGS["llama (llama3 RoPE scaling, attention bias)"]())
    before, _ = _generate(base, False)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                            use_dora=dora))
    fused, used = _generate(model, True)
    plain, _ = _generate(model, False)
    assert used is (not dora)
    _assert_same(fused, plain)
    assert fused.completion_ids != before.completion_ids  # the adapter changes what is generated


SLIDING = {  # windows of 8 slots, shorter than prompt + completion (up to 32 here)
    "qwen2 (layer 0 full, layer 1 sliding)": lambda: Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=8,
                                                                 max_window_layers=1),
    "mistral (every layer sliding)": lambda: MistralConfig(**SMALL, sliding_window=8),
    "gemma3 (sliding layer with local RoPE, then a global one)": lambda: Gemma3TextConfig(
        **SMALL, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=30.0),
}
LONG_PROMPTS = PROMPTS[:2] + [list(range(30, 50))]  # 20 distinct tokens (a repeated token is blind to windows)


@pytest.mark.parametrize("name", list(SLIDING))
def test_sliding_window_layers_decode_like_the_transformers_forward(name):
    """Sampled tokens' log-probs (greedy, 12 tokens past prompts of 2-20) equal a teacher-forced transformers
    forward over each prompt + completion, whose mask applies the window."""
    config = SLIDING[name]()
    assert config.sliding_window < max(map(len, LONG_PROMPTS))
    model = _model(config)
    sampler = EmbeddedSampler(model, pad_id=0)
    out = sampler.generate(LONG_PROMPTS, 1, SamplingParams(temperature=0.0, max_tokens=12))
    assert sampler.used_fused
    for prompt, completion, logps in zip(LONG_PROMPTS, out.completion_ids, out.logprobs, strict=True):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        want = logits.log_softmax(-1).gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(torch.tensor(logps), want, rtol=0, atol=1e-5)
        assert completion == logits.argmax(-1).tolist()


def test_the_window_matters_in_that_test():
    """Without the window (the same weights under a config without one) the log-probs differ: the test
    above would catch a window that is ignored."""
    windowed, plain = (_model(c) for c in (SLIDING["mistral (every layer sliding)"](), MistralConfig(**SMALL)))
    params = SamplingParams(temperature=0.0, max_tokens=12)
    a = EmbeddedSampler(windowed, pad_id=0).generate(LONG_PROMPTS, 1, params)
    b = EmbeddedSampler(plain, pad_id=0).generate(LONG_PROMPTS, 1, params)
    assert a.logprobs[2][0] != b.logprobs[2][0]  # the 20-token prompt exceeds the window: the prefill differs


def test_a_sliding_window_without_the_fused_path_is_one_clear_error():
    model = _model(SLIDING["qwen2 (layer 0 full, layer 1 sliding)"]())
    from tuneforge.errors import NotSupportedYet

    with pytest.raises(NotSupportedYet, match="sliding window of 8 tokens"):
        EmbeddedSampler(model, pad_id=0, fused=False).generate(PROMPTS, 1, SamplingParams(max_tokens=4))


def test_the_fused_prefill_fills_the_cache_like_transformers():
    """Keys and values of every real prompt slot, for each generation row of a prompt, equal the
    transformers prefill's StaticCache; the last position's logits too."""
    from tuneforge.rollout.embedded import _Prompts
    from tuneforge.rollout.fused_decode import fused_decoder

    model = _model(CONFIGS["qwen3 (q/k norms, head_dim 32)"]())
    group, T = 2, 4
    sampler = EmbeddedSampler(model, pad_id=0)
    plain = _Prompts.padded([p for p in PROMPTS for _ in range(group)], T, 0, torch.device("cpu"))
    cache, _ = sampler._prefill(model, plain)
    distinct = _Prompts.padded(PROMPTS, T, 0, torch.device("cpu"))
    decoder = fused_decoder(model, len(PROMPTS) * group, distinct.L)
    with torch.no_grad():
        logits = decoder.prefill(distinct.ids, distinct.valid, group)
    torch.testing.assert_close(logits.repeat_interleave(group, 0), plain.logits, rtol=0, atol=1e-5)
    real = plain.valid.view(-1, 1, plain.P, 1)  # padded slots hold values nobody reads
    for ours, theirs in zip(decoder.layers, cache.layers, strict=True):
        for a, b in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
            torch.testing.assert_close(a[:, :, :plain.P] * real, b[:, :, :plain.P] * real, rtol=0, atol=1e-5)


def test_an_fp8_kv_cache_stores_scaled_fp8_and_decodes_close_to_the_exact_cache():
    """kv_cache_dtype fp8: the cache holds float8_e4m3fn values that, times the layer's scale, are the exact
    keys/values to fp8 precision; greedy decoding stays close to the exact cache's (log-probs within 0.05)."""
    from tuneforge.rollout.embedded import _Prompts
    from tuneforge.rollout.fused_decode import fused_decoder

    model = _model(CONFIGS["llama (llama3 RoPE scaling, attention bias)"]())
    prompts = _Prompts.padded(PROMPTS, 4, 0, torch.device("cpu"))
    exact, fp8 = (fused_decoder(model, len(PROMPTS), prompts.L, kv_dtype=d) for d in (None, torch.float8_e4m3fn))
    with torch.no_grad():
        exact.prefill(prompts.ids, prompts.valid)
        fp8.prefill(prompts.ids, prompts.valid)
    real = prompts.valid.view(len(PROMPTS), 1, prompts.P, 1)
    for a, b in zip(exact.layers, fp8.layers, strict=True):
        assert b.cached()[0].dtype == torch.float8_e4m3fn and b.keys.element_size() == 1
        for which, (x, x8) in enumerate(zip(a.cached(), b.cached(), strict=True)):
            x, back = x[:, :, :prompts.P] * real, x8[:, :, :prompts.P].float() * b.scales[which] * real
            assert (back - x).abs().max() <= x.abs().max() * 2 ** -4  # within fp8 e4m3 rounding (3 mantissa bits)
    params = SamplingParams(temperature=0.0, max_tokens=12)
    plain = EmbeddedSampler(model, pad_id=0).generate(PROMPTS, 1, params)
    quantized = EmbeddedSampler(model, pad_id=0, kv_cache_dtype=torch.float8_e4m3fn).generate(PROMPTS, 1, params)
    for a, b, la, lb in zip(plain.completion_ids, quantized.completion_ids, plain.logprobs, quantized.logprobs,
                            strict=True):
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        assert same >= 1  # the first token comes from the exact prefill
        torch.testing.assert_close(torch.tensor(lb[:same]), torch.tensor(la[:same]), rtol=0, atol=0.05)
    assert quantized.logprobs != plain.logprobs  # the cache really was rounded


@pytest.mark.parametrize("config,kv_dtype", [(CONFIGS["llama (llama3 RoPE scaling, attention bias)"], None),
                                             (CONFIGS["llama (llama3 RoPE scaling, attention bias)"], torch.float8_e4m3fn),
                                             (lambda: MistralConfig(**SMALL, sliding_window=8), None),
                                             (SLIDING["gemma3 (sliding layer with local RoPE, then a global one)"], None)],
                         ids=["llama", "llama-fp8-cache", "mistral-sliding-window", "gemma3-sliding-window"])
def test_the_compiled_prefill_and_step_equal_eager(config, kv_dtype):
    """What runs on a GPU is the inductor-compiled prefill and step (writes into the cache included);
    inductor's CPU backend checks the same graphs here."""
    from tuneforge.rollout import embedded
    from tuneforge.rollout.fused_decode import fused_decoder

    model = _model(config())
    prompts = embedded._Prompts.padded(PROMPTS[:2] + [list(range(30, 50))], 4, 0, torch.device("cpu"))
    slot = torch.tensor(prompts.P)
    results = []
    for prefill, step in ((embedded._fused_prefill, embedded._fused_step),
                          (torch.compile(embedded._fused_prefill), torch.compile(embedded._fused_step))):
        decoder = fused_decoder(model, len(PROMPTS), prompts.L, kv_dtype=kv_dtype)
        with torch.no_grad():
            first = prefill(decoder, prompts.ids, prompts.valid, 1)
            logits = step(decoder, torch.tensor([5, 6, 7]), prompts.lens, slot, (prompts.P - prompts.lens).int(),
                          (slot + 1).int().view(1))
        results.append([first, logits, *(t.float() for layer in decoder.layers for t in layer.cached())])
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_the_compiled_prefill_and_step_do_not_recompile_for_every_cache_length(monkeypatch):
    """GRPO prompts fall into many length buckets; each gives another cache length. The compiled prefill
    and decode step must compile at most twice each (static, then with the length symbolic), not once per
    length: each compilation costs 15-30 s on a GPU and dynamo gives up after 8."""
    from torch._dynamo.testing import CompileCounter

    from tuneforge.rollout import embedded
    from tuneforge.rollout.fused_decode import fused_decoder

    counter, real_compile = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": counter}))
    compiled = (embedded._compiled_fused_step, embedded._compiled_fused_prefill)
    for fn in compiled:
        fn.cache_clear()
    config = CONFIGS["llama (llama3 RoPE scaling, attention bias)"]()
    model = _model(config)
    try:
        for P in (16, 32, 48, 64):
            N = 3
            prompts = embedded._Prompts.padded([[5] * (P - 2)] * N, 8, 0, torch.device("cpu"))
            decoder = fused_decoder(model, N, prompts.L)
            with torch.no_grad():
                embedded._compiled_fused_prefill()(decoder, prompts.ids, prompts.valid, 1)
                decode = embedded._FusedDecode(decoder, torch.zeros(N, dtype=torch.int32), True)
                slot = torch.tensor(P)
                logits = decode(torch.tensor([5, 6, 7]), torch.full((N,), P), slot, (slot + 1).int().view(1))
            assert logits.shape == (N, config.vocab_size)
    finally:
        for fn in compiled:
            fn.cache_clear()
    assert 2 <= counter.frame_count <= 4, counter.frame_count


@pytest.mark.parametrize("max_batch", [None, 4])  # 4 rows per chunk splits groups of 3: no sharing then
def test_a_prompt_is_prefilled_once_for_all_its_generations(max_batch, monkeypatch):
    model = _model(CONFIGS["qwen2 (q/k/v bias)"]())
    params = SamplingParams(temperature=0.0, max_tokens=10)
    results, prefilled = {}, {}
    for fused in (True, False):
        sampler = EmbeddedSampler(model, pad_id=0, fused=fused, max_batch=max_batch)
        rows = _count_prefilled_rows(monkeypatch, sampler)
        results[fused] = sampler.generate(PROMPTS, 3, params)
        prefilled[fused] = sum(rows)
    _assert_same(results[True], results[False])
    assert prefilled[False] == 3 * len(PROMPTS)
    assert prefilled[True] == (len(PROMPTS) if max_batch is None else 3 * len(PROMPTS))


def _count_prefilled_rows(monkeypatch, sampler) -> list[int]:
    """Rows run through either prefill (transformers' or the fused one) by `sampler`, appended per call."""
    from tuneforge.rollout.fused_decode import FusedDecoder

    rows, fused_prefill, plain_prefill = [], FusedDecoder.prefill, sampler._prefill
    monkeypatch.setattr(FusedDecoder, "prefill", lambda self, ids, *a: (rows.append(len(ids)),
                                                                          fused_prefill(self, ids, *a))[1])
    sampler._prefill = lambda net, prompts: (rows.append(len(prompts.ids)), plain_prefill(net, prompts))[1]
    return rows


def test_without_the_fused_step_every_generation_row_is_prefilled(monkeypatch):
    """DoRA has no fused path: the shared prefill is dropped and every row is prefilled for transformers."""
    from peft import LoraConfig, get_peft_model

    base = _model(CONFIGS["mistral"]())
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, use_dora=True))
    params = SamplingParams(temperature=0.0, max_tokens=6)
    sampler = EmbeddedSampler(model, pad_id=0)
    rows = _count_prefilled_rows(monkeypatch, sampler)
    out = sampler.generate(PROMPTS, 2, params)
    assert not sampler.used_fused and sum(rows) == 2 * len(PROMPTS)
    _assert_same(out, EmbeddedSampler(model, pad_id=0, fused=False).generate(PROMPTS, 2, params))


SHARED_INTERPRETED = textwrap.dedent("""
    import torch
    import triton.runtime.interpreter as interp
    from tuneforge.models import decode_kernel
    from tuneforge.rollout.base import SamplingParams
    from tuneforge.rollout.embedded import EmbeddedSampler
    from tests.test_fused_decode import CONFIGS, PROMPTS, _model

    original = interp._patch_lang_tensor  # numpy >= 2.4 and Triton 3.6's interpreter: see test_decode_kernel
    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    interp._patch_lang_tensor = patched

    groups, launch = [], decode_kernel._triton_decode
    def counted(*a, group=1, **kw):
        groups.append(group)
        return launch(*a, group=group, **kw)
    decode_kernel._triton_decode = counted

    model = _model(CONFIGS["qwen2 (q/k/v bias)"]())
    params = SamplingParams(temperature=0.0, max_tokens=6)
    plain = EmbeddedSampler(model, pad_id=0).generate(PROMPTS, 3, params)
    assert set(groups) == {1}, set(groups)
    shared = EmbeddedSampler(model, pad_id=0, shared_prompt_attention=True).generate(PROMPTS, 3, params)
    assert set(groups) == {1, 3}, set(groups)
    assert shared.completion_ids == plain.completion_ids
    for a, b in zip(shared.logprobs, plain.logprobs):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    print("ok")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_shared_prompt_attention_decodes_like_per_row_attention_interpreted():
    """The fused decoder with the shared-prompt kernel (each prompt's slots read once for its 3 generations)
    generates what per-row attention does, through Triton's interpreter on CPU."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", SHARED_INTERPRETED], env=env, capture_output=True, text=True,
                            timeout=600, cwd=root)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_the_compiled_prefill_and_step_under_autocast_with_lora_stay_close_to_eager():
    """GRPO with LoRA on a GPU: fp32 model and adapters, bf16 fused weights and cache, under autocast.
    Here bf16 autocast on the CPU: compiled and eager agree to bf16 rounding, in bf16 throughout."""
    from peft import LoraConfig, get_peft_model

    from tuneforge.models.losses import unwrap_peft
    from tuneforge.rollout import embedded
    from tuneforge.rollout.fused_decode import fused_decoder

    model = get_peft_model(_model(CONFIGS["qwen2 (q/k/v bias)"]()),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    net = unwrap_peft(model)
    prompts = embedded._Prompts.padded(PROMPTS, 4, 0, torch.device("cpu"))
    slot = torch.tensor(prompts.P)
    results = []
    for prefill, step in ((embedded._fused_prefill, embedded._fused_step),
                          (torch.compile(embedded._fused_prefill), torch.compile(embedded._fused_step))):
        decoder = fused_decoder(net, len(PROMPTS), prompts.L, torch.bfloat16)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            first = prefill(decoder, prompts.ids, prompts.valid, 1)
            logits = step(decoder, torch.tensor([5, 6, 7]), prompts.lens, slot, (prompts.P - prompts.lens).int(),
                          (slot + 1).int().view(1))
        assert first.dtype == logits.dtype == decoder.layers[0].keys.dtype == torch.bfloat16
        results.append([first.float(), logits.float()])
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0.05 * eager.abs().max().item())


@pytest.mark.parametrize("share, pays, shared", [(None, True, True), (None, False, False), (True, False, True),
                                                 (False, True, False)])
def test_shared_prompt_attention_follows_the_rule_unless_forced(monkeypatch, share, pays, shared):
    """share None asks `shared_prompt_pays` per layer; True / False override it. Sliding-window layers never
    share (each row's window starts elsewhere)."""
    from tuneforge.rollout import fused_decode

    asked = []
    monkeypatch.setattr(fused_decode, "shared_prompt_pays", lambda keys, group, P: asked.append((group, P)) or pays)
    model = _model(SLIDING["qwen2 (layer 0 full, layer 1 sliding)"]())
    decoder = fused_decode.fused_decoder(model, 6, 30, shared_prompt=(3, 20), share=share)
    assert [layer.shared for layer in decoder.layers] == [(3, 20) if shared else (1, 0), (1, 0)]
    assert asked == ([(3, 20)] if share is None else [])
