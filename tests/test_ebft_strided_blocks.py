"""EBFT strided mode: anchor/block arithmetic, the block attention mask element by element, and that one
masked forward gives each block what a separate forward of its context + block gives."""

from __future__ import annotations

import pytest
import torch

from tuneforge.methods.ebft.blocks import StridedLayout, anchor_offset, block_anchors, num_blocks


# ---------------------------------------------------------------- arithmetic
@pytest.mark.parametrize(("S", "offset", "stride", "g", "expected"), [
    (32, 8, 8, 8, 3),   # floor((32 - 8 - 8) / 8) + 1: anchors 8, 16, 24; the last block ends at 32
    (31, 8, 8, 8, 2),   # one token short of a third block
    (16, 8, 8, 8, 1),   # exactly one block: x[8:16]
    (15, 8, 8, 8, 0),   # no room
    (20, 4, 3, 5, 4),   # floor(11 / 3) + 1: anchors 4, 7, 10, 13 (13 + 5 = 18 <= 20; 16 + 5 > 20)
])
def test_num_blocks_closed_form(S, offset, stride, g, expected):
    assert num_blocks(S, offset, stride, g) == expected
    anchors = block_anchors(S, offset, stride, g)
    assert anchors == [offset + j * stride for j in range(expected)]
    assert all(a + g <= S for a in anchors)
    if anchors:
        assert anchors[-1] + stride + g > S  # no further block would fit


def test_anchor_offset_raw_text_and_prompt_completion():
    assert anchor_offset(8) == 8  # raw text: context_length
    assert anchor_offset(8, prompt_length=5) == 8  # short prompt: still at least context_length
    assert anchor_offset(8, prompt_length=12) == 12  # blocks start after the prompt
    assert anchor_offset(8, prompt_length=12, min_completion_prefix=3) == 15


def test_layout_indices():
    lay = StridedLayout(doc_len=10, anchors=(4, 6), gen_len=3)
    assert lay.length == 16 and lay.num_blocks == 2
    # step-major: step 0 of blocks 0, 1 at 10, 11; step 1 at 12, 13; step 2 at 14, 15
    assert lay.slots.tolist() == [[10, 12, 14], [11, 13, 15]]
    assert lay.predictors.tolist() == [[3, 10, 12], [5, 11, 13]]
    assert lay.truth.tolist() == [[4, 5, 6], [6, 7, 8]]
    assert lay.position_ids.tolist() == list(range(10)) + [4, 6, 5, 7, 6, 8]


# ---------------------------------------------------------------- the mask
def test_mask_element_by_element():
    lay = StridedLayout(doc_len=6, anchors=(2, 3), gen_len=2)
    # sequence: doc 0..5 | b0s0=6 b1s0=7 | b0s1=8 b1s1=9
    allowed = lay.allowed()
    expected = torch.zeros(10, 10, dtype=torch.bool)
    for q in range(6):
        expected[q, : q + 1] = True  # the document is causal
    for q, (anchor, own) in {6: (2, [6]), 8: (2, [6, 8]), 7: (3, [7]), 9: (3, [7, 9])}.items():
        expected[q, :anchor] = True  # the document before the block's anchor
        expected[q, own] = True  # its own earlier tokens and itself
    assert torch.equal(allowed, expected)
    # rows of a later step's queries over a prefix: the same entries
    assert torch.equal(lay.allowed(length=8, queries=slice(6, 8)), expected[6:8, :8])
    add = lay.additive_mask(torch.float32)
    assert add.shape == (1, 1, 10, 10)
    assert torch.equal(add[0, 0] == 0, expected)
    assert (add[0, 0][~expected] == torch.finfo(torch.float32).min).all()


def test_flex_block_mask_is_the_dense_mask():
    """The BlockMask (flex attention, eager here) gives sdpa-with-the-dense-mask's attention output."""
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    lay = StridedLayout(150, tuple(block_anchors(150, 8, 8, 8)), 8)  # 18 blocks, 294 tokens: several 128-blocks
    q, k, v = (torch.randn(2, 4, lay.length, 16) for _ in range(3))
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=lay.allowed()[None, None])
    flex = flex_attention(q, k, v, block_mask=lay.block_mask("cpu"))
    assert torch.allclose(flex, dense, atol=1e-5)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_one_masked_forward_equals_separate_forwards_per_block(tiny_model_dir, impl):
    """Every block's logits in the shared forward equal a forward of x[:a_j] + block j alone."""
    from transformers import AutoModelForCausalLM

    from tuneforge.methods.ebft.strided_rollout import hidden_states

    net = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=impl).eval()
    torch.manual_seed(0)
    lay = StridedLayout(doc_len=14, anchors=tuple(block_anchors(14, 4, 3, 3)), gen_len=3)
    assert lay.anchors == (4, 7, 10)
    seq = torch.randint(5, 900, (2, lay.length))
    with torch.no_grad():
        hidden = hidden_states(net, lay, seq)
        logits = net.lm_head(hidden)
        doc_alone = net(input_ids=seq[:, : lay.doc_len]).logits
        assert torch.allclose(logits[:, : lay.doc_len], doc_alone, atol=1e-5)  # the document is unaffected
        for j, a in enumerate(lay.anchors):
            block = seq[:, lay.slots[j]]
            alone = net(input_ids=torch.cat([seq[:, :a], block], dim=1)).logits  # positions 0 .. a + g - 1
            assert torch.allclose(logits[:, lay.slots[j]], alone[:, a:], atol=1e-5), j
            assert torch.allclose(logits[:, a - 1], alone[:, a - 1], atol=1e-5)  # step 0's predictor


def test_generation_matches_the_masked_forward(model):
    """Greedy sampling with the KV cache picks, at every block token, the argmax of the loss forward's
    logits at that token's predictor: generation and training see the same distribution."""
    from tuneforge.methods.ebft.strided_rollout import generate_blocks, hidden_states
    from tuneforge.models.losses import LogitHead
    from tuneforge.rollout.base import SamplingParams

    torch.manual_seed(1)
    doc = torch.randint(5, 900, (20,))
    lay = StridedLayout(20, tuple(block_anchors(20, 6, 4, 4)), 4)
    tokens = generate_blocks(model, LogitHead(model), lay, doc, 3, SamplingParams(temperature=0.0))
    assert tokens.shape == (3, lay.length)
    assert torch.equal(tokens[:, :20], doc.expand(3, -1))
    assert torch.equal(tokens[0], tokens[2])  # greedy: every sample the same
    with torch.no_grad():
        logits = model.lm_head(hidden_states(model, lay, tokens))
    predicted = logits[:, lay.predictors.flatten()].argmax(-1)
    assert torch.equal(predicted, tokens[:, lay.slots.flatten()])


def test_sampled_blocks_differ_and_respect_the_vocabulary(model):
    from tuneforge.methods.ebft.strided_rollout import generate_blocks
    from tuneforge.models.losses import LogitHead
    from tuneforge.rollout.base import SamplingParams

    torch.manual_seed(2)
    doc = torch.randint(5, 900, (16,))
    lay = StridedLayout(16, tuple(block_anchors(16, 8, 4, 4)), 4)
    tokens = generate_blocks(model, LogitHead(model), lay, doc, 4, SamplingParams(temperature=1.0))
    gen = tokens[:, 16:]
    assert gen.min() >= 0 and gen.max() < model.config.vocab_size
    assert len({tuple(r.tolist()) for r in gen}) > 1  # a random tiny model at T=1: samples differ


@pytest.mark.gpu
def test_flex_block_mask_matches_the_dense_mask_on_gpu(tiny_model_dir):
    """flex_attention with the BlockMask gives the dense sdpa mask's hidden states (bf16 tolerance)."""
    from transformers import AutoModelForCausalLM

    from tuneforge.methods.ebft.strided_rollout import hidden_states

    torch.manual_seed(0)
    lay = StridedLayout(300, tuple(block_anchors(300, 16, 8, 8)), 8)
    seq = torch.randint(5, 900, (4, lay.length), device="cuda")
    out = {}
    for impl in ("flex_attention", "sdpa"):
        net = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=impl,
                                                   dtype=torch.bfloat16).cuda().eval()
        with torch.no_grad():
            out[impl] = hidden_states(net, lay, seq).float()
    assert torch.allclose(out["flex_attention"], out["sdpa"], atol=3e-2, rtol=3e-2)


def test_a_flex_attention_model_generates_with_sdpa_and_keeps_flex(tiny_model_dir, model):
    """Decoding steps change the key length each time; they run on sdpa's dense mask (same tokens), and
    the model is flex_attention again afterwards (for the BlockMask forwards)."""
    from transformers import AutoModelForCausalLM

    from tuneforge.methods.ebft.strided_rollout import generate_blocks
    from tuneforge.models.losses import LogitHead
    from tuneforge.rollout.base import SamplingParams

    flex = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="flex_attention").eval()
    doc = torch.randint(5, 900, (20,))
    lay = StridedLayout(20, tuple(block_anchors(20, 6, 4, 4)), 4)
    greedy = SamplingParams(temperature=0.0)
    tokens = generate_blocks(flex, LogitHead(flex), lay, doc, 2, greedy)
    assert flex.config._attn_implementation == "flex_attention"
    assert torch.equal(tokens, generate_blocks(model, LogitHead(model), lay, doc, 2, greedy))
