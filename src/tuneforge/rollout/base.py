"""The sampler interface of online RL: prompts in, completions with per-token log-probs out.

Backends: `embedded.EmbeddedSampler` (the default; generates in the training process with the current
weights) and `vllm_client.VLLMServerSampler` (experimental; talks to a vLLM server). The objective
only sees this interface, so the importance-sampling logic is the same for every backend.

Log-probs convention: `logprobs[i][t]` is log softmax(logits / temperature) of the sampled token, the
quantity the trainer recomputes. Top-k/top-p/min-p truncation and the repetition penalty shape which
token is drawn but are not folded into the returned log-prob, so an on-policy sampler gives
importance weights of exactly 1 up to kernel numerics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

# trl.generation_kwargs keys the embedded engine reads; the others are for vLLM (SamplingParams.extra).
EMBEDDED_GENERATION_KWARGS = frozenset({"stop_token_ids", "cuda_graphs", "compile", "half_precision_copy", "fused_decode",
                                        "kv_cache_dtype"})


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()  # generation of a row ends after any of these (it is kept)
    # Other `trl.generation_kwargs` (not the embedded engine's own keys): handed to vLLM's SamplingParams as
    # they are (seed, presence_penalty, ...); the embedded engine does not read them.
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_trl(cls, trl, tokenizer, max_completion_length: int) -> SamplingParams:
        """The `trl:` block's sampling keys; stops on EOS and the chat template's end-of-turn tokens."""
        extra = dict(getattr(trl, "generation_kwargs", None) or {}) if trl is not None else {}
        def get(k, d):
            return (d if trl is None or getattr(trl, k, None) is None else getattr(trl, k))
        stops = list(extra.get("stop_token_ids") or [])
        stops += end_of_turn_ids(tokenizer)
        return cls(temperature=float(get("temperature", 1.0)), top_p=float(get("top_p", 1.0)),
                   top_k=int(get("top_k", 0) or 0), min_p=float(get("min_p", 0.0) or 0.0),
                   repetition_penalty=float(get("repetition_penalty", 1.0)), max_tokens=max_completion_length,
                   stop_token_ids=tuple(dict.fromkeys(stops)),
                   extra={k: v for k, v in extra.items() if k not in EMBEDDED_GENERATION_KWARGS})


def end_of_turn_ids(tokenizer) -> list[int]:
    """EOS plus the chat template's end-of-turn tokens (none without a tokenizer): where a completion ends,
    the same tokens that `tuneforge inference` stops on."""
    from tuneforge.chat_templates import stop_token_ids
    from tuneforge.errors import ModelError

    if tokenizer is None:
        return []
    try:
        return stop_token_ids(tokenizer)
    except ModelError:  # no eos and no known end-of-turn token: completions end at their length limit
        return []


@dataclass
class Rollout:
    """Completions of a batch of prompts, `n` per prompt, grouped: rows [p*n, (p+1)*n) share prompt p."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    finished: list[bool]  # ended on a stop token (False: cut at max_tokens, i.e. truncated)
    n: int = 1
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)


class Sampler(Protocol):
    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams) -> Rollout: ...

    def sync_weights(self, model) -> None:
        """Make the sampler generate with `model`'s current weights."""
        ...
