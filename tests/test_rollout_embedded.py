"""The embedded rollout engine (static KV cache, fixed-shape decode step) against plain transformers:
greedy continuations equal `model.generate`, returned log-probs equal a full forward pass, left
padding changes nothing, and every sampling filter equals transformers' logits processor."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from interpreted_support import run_interpreted
from tuneforge.rollout.base import SamplingParams, end_of_turn_ids
from tuneforge.rollout.embedded import EmbeddedSampler
from tuneforge.rollout.sampling import apply_repetition_penalty, filter_logits, sample_next


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    texts = ["hello world the", "a", "1 + 2 = 3 and more words here", "sum of the"]
    return [tiny_tokenizer(t)["input_ids"] for t in texts]


def _full_logps(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_greedy_equals_generate_and_padding_changes_nothing(model, prompts, impl):
    model.set_attn_implementation(impl)
    try:
        sampler = EmbeddedSampler(model, pad_id=0)
        batch = sampler.generate(prompts, 2, SamplingParams(temperature=0, max_tokens=12))
        for i, p in enumerate(prompts):
            ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
            assert batch.completion_ids[2 * i] == ref[0, len(p):].tolist()
            assert batch.completion_ids[2 * i + 1] == batch.completion_ids[2 * i]
            alone = sampler.generate([p], 1, SamplingParams(temperature=0, max_tokens=12))
            assert alone.completion_ids[0] == batch.completion_ids[2 * i]
        assert batch.finished == [False] * 8  # no stop token: all cut at max_tokens
    finally:
        model.set_attn_implementation("sdpa")


def test_sampled_logprobs_equal_a_full_forward(model, prompts):
    torch.manual_seed(0)
    params = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, max_tokens=10)
    r = EmbeddedSampler(model, pad_id=0, max_batch=3).generate(prompts, 3, params)
    assert len(r.completion_ids) == 12 and r.n == 3
    for i, (c, lp) in enumerate(zip(r.completion_ids, r.logprobs, strict=True)):
        expect = _full_logps(model, prompts[i // 3], c, 0.7)
        assert torch.allclose(torch.tensor(lp), expect, atol=2e-5), i


def test_stop_tokens_end_rows_and_are_kept(model, prompts):
    greedy = EmbeddedSampler(model, pad_id=0).generate(prompts, 1, SamplingParams(temperature=0, max_tokens=8))
    stop = greedy.completion_ids[0][2]  # the third greedy token of the first prompt
    r = EmbeddedSampler(model, pad_id=0, check_every=1).generate(
        prompts, 1, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=(stop,)))
    for full, cut, done in zip(greedy.completion_ids, r.completion_ids, r.finished, strict=True):
        if stop in full:
            k = full.index(stop)
            assert cut == full[: k + 1] and done
        else:
            assert cut == full and not done


def test_lora_weights_are_used(model, prompts):
    import copy

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                 init_lora_weights=False))
    peft_model.train()
    torch.manual_seed(1)
    r = EmbeddedSampler(peft_model, pad_id=0).generate(prompts[:2], 2, SamplingParams(temperature=1.0, max_tokens=6))
    for i, (c, lp) in enumerate(zip(r.completion_ids, r.logprobs, strict=True)):
        assert torch.allclose(torch.tensor(lp), _full_logps(peft_model, prompts[i // 2], c, 1.0), atol=2e-5)
        assert not torch.allclose(torch.tensor(lp), _full_logps(model, prompts[i // 2], c, 1.0), atol=1e-3)
    assert peft_model.training  # generation ran in eval mode and restored the caller's mode
    peft_model.eval()


# ---------------------------------------------------------------- sampling filters vs transformers
@pytest.mark.parametrize("top_k,top_p,min_p", [(5, 1.0, 0.0), (0, 0.8, 0.0), (0, 1.0, 0.1), (7, 0.6, 0.05)])
def test_filters_equal_transformers_processors(top_k, top_p, min_p):
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(6, 40) * 2
    ours = filter_logits(logits, top_k, top_p, min_p) > torch.finfo(torch.float32).min
    theirs = logits.clone()
    ids = torch.zeros(6, 1, dtype=torch.long)
    if top_k:
        theirs = TopKLogitsWarper(top_k)(ids, theirs)
    if min_p:
        theirs = MinPLogitsWarper(min_p)(ids, theirs)
    if top_p < 1:
        theirs = TopPLogitsWarper(top_p)(ids, theirs)
    assert torch.equal(ours, theirs > -float("inf"))


def test_repetition_penalty_equals_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(3, 20)
    ids = torch.tensor([[1, 4, 4], [0, 19, 7], [3, 3, 3]])
    seen = torch.zeros(3, 20, dtype=torch.bool).scatter(1, ids, True)
    expect = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3), expect)


def test_sampling_frequencies_match_the_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).expand(40000, 5)
    params = SamplingParams(temperature=0.8, top_k=3)
    tokens, logps = sample_next(logits, params)
    p = torch.softmax(logits[0] / 0.8, -1)
    kept = torch.zeros(5).index_fill(0, torch.tensor([0, 1, 4]), 1.0)
    q = p * kept / (p * kept).sum()
    freq = torch.bincount(tokens, minlength=5).float() / len(tokens)
    assert torch.allclose(freq, q, atol=0.01)
    assert torch.allclose(logps, torch.log(p)[tokens])  # log-prob of the temperature-scaled distribution


def test_two_stage_draw_is_exact_sampling():
    """Unfiltered sampling over a large vocabulary (block, then token in block) has the softmax's frequencies."""
    from tuneforge.rollout.sampling import DRAW_BLOCK

    torch.manual_seed(0)
    V = 3 * DRAW_BLOCK + 77  # a partial last block
    base = torch.full((V,), -30.0)
    hot = torch.tensor([0, 5, DRAW_BLOCK + 3, 2 * DRAW_BLOCK + 9, V - 1])  # mass in several blocks
    base[hot] = torch.tensor([1.0, 0.2, 0.8, -0.5, 0.4])
    logits = base.expand(60000, V)
    tokens, logps = sample_next(logits, SamplingParams(temperature=0.9))
    p = torch.softmax(base / 0.9, -1)
    freq = torch.bincount(tokens, minlength=V).float() / len(tokens)
    assert torch.allclose(freq[hot], p[hot], atol=0.01)
    assert freq.sum() - freq[hot].sum() < 1e-3
    torch.testing.assert_close(logps, torch.log_softmax(base / 0.9, -1)[tokens])


def test_end_of_turn_ids(tiny_tokenizer):
    from tuneforge.chat_templates import resolve

    tok = tiny_tokenizer
    old = tok.chat_template
    try:
        tok.chat_template = None
        assert end_of_turn_ids(tok) == [tok.eos_token_id]
        tok.chat_template = resolve("chatml", None, tok, None)
        assert end_of_turn_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    finally:
        tok.chat_template = old


def test_decode_attention_equals_sdpa_with_expanded_heads():
    """The grouped decode attention equals SDPA over repeated KV heads, with padding and unwritten slots masked."""
    from tuneforge.models.attention import decode_attention_forward

    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, L, D = 3, 6, 2, 11, 8
    q, k, v = (torch.randn(B, h, t, D, generator=g) for h, t in ((Hq, 1), (Hkv, L), (Hkv, L)))
    mask = torch.rand(B, 1, 1, L, generator=g) > 0.4
    mask[..., 0] = True
    out, _ = decode_attention_forward(None, q, k, v, mask, scaling=0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(Hq // Hkv, dim=1), v.repeat_interleave(Hq // Hkv, dim=1), attn_mask=mask, scale=0.3)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-6)


BLOCK_LSE_INTERPRETED = """
import torch
from tuneforge.rollout.sampling import block_logsumexp

for dtype, V in ((torch.float32, 3 * 64 + 7), (torch.float16, 4 * 64)):  # a partial last block, and none
    x = (torch.randn(5, V, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    x[0, :64] = float("-inf")  # masked tokens (never a whole row)
    got = block_logsumexp(x, 64, 0.7)
    blocks = -(-V // 64)
    padded = torch.nn.functional.pad(x.double() / 0.7, (0, blocks * 64 - V), value=float("-inf"))
    want = torch.logsumexp(padded.view(5, blocks, 64), -1).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_block_logsumexp_kernel_interpreted():
    """The Triton block log-sum-exp of the two-stage draw, on CPU via TRITON_INTERPRET=1."""
    run_interpreted(BLOCK_LSE_INTERPRETED, timeout=300)


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_two_stage_draw_on_cuda_is_exact_sampling(compiled):
    """The CUDA draw (Triton block log-sum-exp, compiled or not) from bf16 logits: the softmax's frequencies
    and log-probs."""
    from tuneforge.rollout.sampling import DRAW_BLOCK

    V = 3 * DRAW_BLOCK + 77
    base = torch.full((V,), -30.0)
    hot = torch.tensor([0, 5, DRAW_BLOCK + 3, 2 * DRAW_BLOCK + 9, V - 1])
    base[hot] = torch.tensor([1.0, 0.2, 0.8, -0.5, 0.4])
    base = base.bfloat16().float()  # what the bf16 logits hold
    logits = base.bfloat16().cuda().expand(60000, V)
    draw = torch.compile(sample_next) if compiled else sample_next
    torch.manual_seed(0)
    tokens, logps = draw(logits, SamplingParams(temperature=0.9))
    p = torch.softmax(base / 0.9, -1)
    freq = torch.bincount(tokens.cpu(), minlength=V).float() / len(tokens)
    assert torch.allclose(freq[hot], p[hot], atol=0.01)
    assert freq.sum() - freq[hot].sum() < 1e-3
    torch.testing.assert_close(logps.cpu(), torch.log_softmax(base / 0.9, -1)[tokens.cpu()], rtol=1e-5, atol=1e-5)


def test_only_a_model_with_compiled_blocks_switches_the_compiler_to_eager(model, prompts):
    """torch's compile stance is process-wide: generating from a copy (async prefetch's snapshot, in a
    background thread) must leave it alone, or the training thread's compiled blocks would run eagerly
    meanwhile; the model whose blocks training compiled generates under force_eager (transformers path)."""
    import copy

    from torch._dynamo import eval_frame

    def stances_seen(net) -> set[str]:
        seen = set()
        hook = net.model.layers[0].register_forward_pre_hook(lambda *_: seen.add(eval_frame._stance.stance))
        EmbeddedSampler(net, pad_id=0, fused=False).generate(prompts[:2], 1, SamplingParams(temperature=0.0,
                                                                                            max_tokens=4))
        hook.remove()
        return seen

    compiled = copy.deepcopy(model)
    for layer in compiled.model.layers:
        layer.compile(backend="eager")
    assert stances_seen(compiled) == {"force_eager"}
    assert stances_seen(copy.deepcopy(compiled)) == {"default"}  # the copy has no compiled blocks
    assert eval_frame._stance.stance == "default"


@pytest.mark.gpu
def test_cuda_graph_captured_in_a_background_thread_beside_cuda_work(model, prompts):
    """trl.async_prefetch decodes in a background thread while the training thread keeps the GPU busy: the
    decode step's CUDA graph must still be captured (under torch's default capture mode, the other thread's
    work invalidates it) and give the completions that the same sampler gives alone (greedy)."""
    import copy
    import threading

    net = copy.deepcopy(model).cuda()
    sampler = EmbeddedSampler(net, pad_id=0)
    params = SamplingParams(temperature=0.0, max_tokens=12)
    alone = sampler.generate(prompts, 2, params)
    assert alone.meta["cuda_graphs"]
    stop, x = threading.Event(), torch.randn(2048, 2048, device="cuda")

    def busy():  # allocates, frees and launches kernels, as a training step does
        while not stop.is_set():
            (x @ x).sum().item()

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        beside = [sampler.generate(prompts, 2, params) for _ in range(3)]
    finally:
        stop.set()
        worker.join()
    for rollout in beside:
        assert rollout.meta["cuda_graphs"]
        assert rollout.completion_ids == alone.completion_ids
