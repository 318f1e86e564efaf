"""Tiny local models and tokenizers for tests, examples and benchmarks (no hub access needed).

`build_tiny_tokenizer` trains a byte-level BPE tokenizer on a small built-in corpus and registers the
special tokens of every named chat template, so each template renders and masks exactly.
`build_tiny_model` saves a randomly initialised Llama-architecture model next to it. Both load back
through `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained`, the same path users take.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

SPECIAL_TOKENS = [
    "<pad>", "<s>", "</s>", "<unk>",
    "<|im_start|>", "<|im_end|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<start_of_turn>", "<end_of_turn>",
    "[INST]", "[/INST]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]",
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
]


def _corpus(n: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "a", "an", "of", "to", "and", "in", "is", "it", "you", "that", "he", "was", "for", "on", "are", "with", "as", "his", "they", "be", "at", "one", "have", "this", "from", "or", "had", "by", "word", "but", "what", "some", "we", "can", "out", "other", "were", "all", "there", "when", "up", "use", "your", "how", "said", "each", "she", "which", "do", "their", "time", "if", "will", "way", "about", "many", "then", "them", "write", "would", "like", "so", "these", "her", "long", "make", "thing", "see", "him", "two", "has", "look", "more", "day", "could", "go", "come", "did", "number", "sound", "no", "most", "people", "my", "over", "know", "water", "than", "call", "first", "who", "may", "down", "side", "been", "now", "find", "any", "new", "work", "part", "take", "get", "place", "made", "live", "where", "after", "back", "little", "only", "round", "man", "year", "came", "show", "every", "good", "me", "give", "our", "under", "name", "very", "through", "just", "form", "sentence", "great", "think", "say", "help", "low", "line", "differ", "turn", "cause", "much", "mean", "before", "move", "right", "boy", "old", "too", "same", "tell", "does", "set", "three", "want", "air", "well", "also", "play", "small", "end", "put", "home", "read", "hand", "port", "large", "spell", "add", "even", "land", "here", "must", "big", "high", "such", "follow", "act", "why", "ask", "men", "change", "went", "light", "kind", "off", "need", "house", "picture", "try", "us", "again", "animal", "point", "mother", "world", "near", "build", "self", "earth", "father", "answer", "question", "reverse", "copy", "sort", "count", "sum", "user", "assistant", "system", "tool", "call", "result", "weather", "city", "function", "arguments", "name", "value", "true", "false", "null", "hello", "thanks", "please", "instruction", "input", "output", "response", "task"]
    lines = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.5:
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))).capitalize() + ".")
        elif kind < 0.7:
            lines.append(" ".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 10))))
        elif kind < 0.85:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            lines.append(f"{a} + {b} = {a + b}")
        else:
            lines.append('{"name": "%s", "arguments": {"%s": "%s"}}' % tuple(rng.choice(words) for _ in range(3)))  # noqa: UP031
    lines += ["### Instruction:\n", "### Input:\n", "### Response:\n", "Below is an instruction"]
    return lines


def build_tiny_tokenizer(path: str | Path, vocab_size: int = 1000):
    """Train and save a byte-level BPE tokenizer with every chat template's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    fast.model_max_length = 4096
    Path(path).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(path))
    return fast


def tiny_llama_config(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                      intermediate: int | None = None, max_positions: int = 4096, tie: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        rms_norm_eps=1e-6,
    )


def build_tiny_model(path: str | Path, seed: int = 0, weights: bool = True, **config_kwargs):
    """Save a tiny Llama model (random weights) and its tokenizer under `path`; return the folder."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer = build_tiny_tokenizer(path)
    config = tiny_llama_config(len(tokenizer), **config_kwargs)
    if weights:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(str(path))
    else:
        config.save_pretrained(str(path))
    return path
