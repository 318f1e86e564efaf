"""EBFT strided mode: where the blocks of a document start, where their tokens sit, and what they see.

A document x[0:S] gets blocks at the anchors a_j = anchor_offset + j * stride, j = 0 .. num_blocks - 1,

    num_blocks = floor((S - generate_max_len - anchor_offset) / stride) + 1      (0 when negative)

so that every block's ground truth x[a_j : a_j + generate_max_len] lies inside the document. The
anchor offset is `context_length` for raw text, and max(prompt_length + min_completion_prefix,
context_length) for prompt/completion rows (no block starts inside the prompt).

All blocks of a document share one sequence: the document, then the generated tokens step-major (the
token of block j at generation step s sits at S + s * num_blocks + j, so the first L tokens of the
sequence are exactly "the document plus the first few steps", which is what generation extends). Block
j's token at step s has position id a_j + s (it continues the document from the anchor), and sees the
document before its anchor, x[0:a_j], plus the earlier tokens of its own block; never another block,
never the document at or after its anchor. So one forward pass over the whole sequence gives each block
exactly the logits and hidden states of a separate forward over x[0:a_j] + block j (tested).
Document tokens see the document causally, as in a plain forward.

Both mask forms come from one rule, allowed(q, k) = k < limit[q] or (group[k] == group[q] and k <= q),
with limit = 0 and group = -1 for document tokens, limit = a_j and group = j for block j's tokens:
a dense additive [1, 1, T, T] mask (sdpa / eager; CPU) and a flex-attention BlockMask (GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


def anchor_offset(context_length: int, prompt_length: int | None = None, min_completion_prefix: int = 0) -> int:
    """Index of the first anchor: `context_length` for raw text (prompt_length None); for prompt/completion
    rows also at least prompt_length + min_completion_prefix, so that blocks start inside the completion."""
    if prompt_length is None:
        return context_length
    return max(prompt_length + min_completion_prefix, context_length)


def num_blocks(doc_len: int, offset: int, stride: int, gen_len: int) -> int:
    """floor((S - gen_len - offset) / stride) + 1, or 0 when the document has no room for one block."""
    room = doc_len - gen_len - offset
    return room // stride + 1 if room >= 0 else 0


def block_anchors(doc_len: int, offset: int, stride: int, gen_len: int) -> list[int]:
    return [offset + j * stride for j in range(num_blocks(doc_len, offset, stride, gen_len))]


@dataclass(frozen=True)
class StridedLayout:
    """One document of `doc_len` tokens with blocks of `gen_len` generated tokens at `anchors`."""

    doc_len: int
    anchors: tuple[int, ...]
    gen_len: int

    @property
    def num_blocks(self) -> int:
        return len(self.anchors)

    @property
    def length(self) -> int:
        """Tokens of the whole sequence: the document and every block."""
        return self.doc_len + self.num_blocks * self.gen_len

    def slot(self, block: int, step: int) -> int:
        """Index in the sequence of block `block`'s token at generation step `step`."""
        return self.doc_len + step * self.num_blocks + block

    @cached_property
    def slots(self) -> torch.Tensor:
        """[num_blocks, gen_len]: index of each block's tokens in the sequence."""
        blocks = torch.arange(self.num_blocks).unsqueeze(1)
        steps = torch.arange(self.gen_len).unsqueeze(0)
        return self.doc_len + steps * self.num_blocks + blocks

    @cached_property
    def predictors(self) -> torch.Tensor:
        """[num_blocks, gen_len]: the index whose logits predict each block token: the document token just
        before the anchor for step 0, the block's previous token after that."""
        first = torch.tensor(self.anchors, dtype=torch.long).unsqueeze(1) - 1
        return torch.cat([first, self.slots[:, :-1]], dim=1)

    @cached_property
    def truth(self) -> torch.Tensor:
        """[num_blocks, gen_len]: document indices of each block's ground truth x[a_j : a_j + gen_len]."""
        return torch.tensor(self.anchors, dtype=torch.long).unsqueeze(1) + torch.arange(self.gen_len).unsqueeze(0)

    @cached_property
    def _per_token(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(position ids, group, limit) of every token of the sequence ([T] each)."""
        doc = torch.arange(self.doc_len)
        anchors = torch.tensor(self.anchors, dtype=torch.long)
        step_major = torch.arange(self.gen_len).repeat_interleave(self.num_blocks)  # step of each block token
        block_ids = torch.arange(self.num_blocks).repeat(self.gen_len)  # block of each block token
        positions = torch.cat([doc, anchors[block_ids] + step_major])
        group = torch.cat([torch.full((self.doc_len,), -1), block_ids])
        limit = torch.cat([torch.zeros(self.doc_len, dtype=torch.long), anchors[block_ids]])
        return positions, group, limit

    @property
    def position_ids(self) -> torch.Tensor:
        return self._per_token[0]

    def allowed(self, length: int | None = None, queries: slice | None = None) -> torch.Tensor:
        """Boolean [q, k] mask (True: may attend) over the first `length` tokens (default all), for the
        query rows `queries` (default all of them)."""
        length = self.length if length is None else length
        _, group, limit = (t[:length] for t in self._per_token)
        q = torch.arange(length)[queries if queries is not None else slice(None)]
        k = torch.arange(length)
        same = (group[q].unsqueeze(1) == group[k].unsqueeze(0)) & (k.unsqueeze(0) <= q.unsqueeze(1))
        return (k.unsqueeze(0) < limit[q].unsqueeze(1)) | same

    def additive_mask(self, dtype: torch.dtype, device=None, length: int | None = None,
                      queries: slice | None = None) -> torch.Tensor:
        """[1, 1, q, k]: 0 where allowed, the dtype's minimum elsewhere (what eager adds to the scores and
        sdpa accepts as a float mask)."""
        allowed = self.allowed(length, queries).to(device)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]

    def block_mask(self, device):
        """The same rule as a flex-attention BlockMask over the whole sequence (GPU; compiled kernels)."""
        from torch.nn.attention.flex_attention import create_block_mask

        _, group, limit = (t.to(device) for t in self._per_token)

        def mask_mod(b, h, q, k):
            return (k < limit[q]) | ((group[k] == group[q]) & (k <= q))

        return create_block_mask(mask_mod, B=None, H=None, Q_LEN=self.length, KV_LEN=self.length, device=device)
