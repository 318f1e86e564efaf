"""The fused decode step (rollout/fused_decode.py) decodes exactly like the transformers forward.

Each case generates greedily through both paths of the embedded engine (fused, and the transformers
forward, which tests elsewhere compare with `model.generate`) and compares tokens and log-probs.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

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


def test_a_sliding_window_shorter_than_the_generation_is_one_clear_error():
    model = _model(Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=8, max_window_layers=0))
    from tuneforge.errors import NotSupportedYet

    with pytest.raises(NotSupportedYet, match="sliding window of 8"):
        EmbeddedSampler(model, pad_id=0).generate(PROMPTS, 1, SamplingParams(max_tokens=4))


def test_sliding_window_cache_layers_are_refused():
    from transformers import StaticCache

    from tuneforge.rollout.fused_decode import fused_decoder

    config = Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=8, max_window_layers=0)
    assert fused_decoder(_model(config), StaticCache(config=config, max_cache_len=32), 32) is None
    plain = Qwen2Config(**SMALL)
    assert fused_decoder(_model(plain), StaticCache(config=plain, max_cache_len=32), 32) is not None


def test_the_compiled_step_does_not_recompile_for_every_cache_length(monkeypatch):
    """GRPO prompts fall into many length buckets; each gives another cache length. The compiled decode
    step must compile at most twice (static, then with the length symbolic), not once per length: each
    compilation costs 15-30 s on a GPU and dynamo gives up after 8."""
    from torch._dynamo.testing import CompileCounter
    from transformers import StaticCache

    from tuneforge.rollout import embedded
    from tuneforge.rollout.fused_decode import fused_decoder

    counter, real_compile = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": counter}))
    embedded._compiled_fused_step.cache_clear()
    config = CONFIGS["llama (llama3 RoPE scaling, attention bias)"]()
    model = _model(config)
    try:
        for P in (16, 32, 48, 64):
            L, N = P + 8, 3
            cache = StaticCache(config=config, max_cache_len=L)
            with torch.no_grad():
                model(input_ids=torch.randint(3, 100, (N, P)), past_key_values=cache, use_cache=True)
                decode = embedded._FusedDecode(fused_decoder(model, cache, L), torch.zeros(N, dtype=torch.int32), True)
                slot = torch.tensor(P)
                logits = decode(torch.tensor([5, 6, 7]), torch.full((N,), P), slot, (slot + 1).int().view(1))
            assert logits.shape == (N, config.vocab_size)
    finally:
        embedded._compiled_fused_step.cache_clear()
    assert 1 <= counter.frame_count <= 2, counter.frame_count


@pytest.mark.parametrize("max_batch", [None, 4])  # 4 rows per chunk splits groups of 3: no sharing then
def test_a_prompt_is_prefilled_once_for_all_its_generations(max_batch):
    model = _model(CONFIGS["qwen2 (q/k/v bias)"]())
    params = SamplingParams(temperature=0.0, max_tokens=10)
    results, prefilled = {}, {}
    for fused in (True, False):
        sampler = EmbeddedSampler(model, pad_id=0, fused=fused, max_batch=max_batch)
        rows, real = [], sampler._prefill
        sampler._prefill = lambda net, r, T, real=real, rows=rows: (rows.append(len(r)), real(net, r, T))[1]
        results[fused] = sampler.generate(PROMPTS, 3, params)
        prefilled[fused] = sum(rows)
    _assert_same(results[True], results[False])
    assert prefilled[False] == 3 * len(PROMPTS)
    assert prefilled[True] == (len(PROMPTS) if max_batch is None else 3 * len(PROMPTS))


def test_without_the_fused_step_every_generation_row_is_prefilled():
    """DoRA has no fused path: the shared prefill is dropped and every row is prefilled for transformers."""
    from peft import LoraConfig, get_peft_model

    base = _model(CONFIGS["mistral"]())
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, use_dora=True))
    params = SamplingParams(temperature=0.0, max_tokens=6)
    sampler = EmbeddedSampler(model, pad_id=0)
    out = sampler.generate(PROMPTS, 2, params)
    assert not sampler.used_fused
    _assert_same(out, EmbeddedSampler(model, pad_id=0, fused=False).generate(PROMPTS, 2, params))
