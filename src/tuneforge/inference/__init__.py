"""`tuneforge inference`: generate with the trained model, formatting prompts exactly as training did.

What is loaded, in order of precedence:
- `--lora-model-dir DIR`: the base model plus the adapter in DIR;
- output_dir holding `adapter_config.json`: the base plus that adapter;
- output_dir holding a full model (`config.json` and weights): that model;
- the config's `lora_model_dir`, else the base model alone (with a warning).
The tokenizer is the one the run saved (training-time chat template and special tokens), else the one
the config describes. Plain-text prompts become a user turn of the chat template when there is one.
Generation stops at eos and at the template's end-of-turn token(s).
"""

from __future__ import annotations

import json
import logging
import sys

from tuneforge.chat_templates import stop_token_ids
from tuneforge.errors import TuneforgeError

from .chat import HELP, chat_loop
from .generate import generate, render
from .load import Sources, find_sources, load_for_generation, load_tokenizer_for

log = logging.getLogger("tuneforge")

__all__ = ["HELP", "Sources", "chat_loop", "find_sources", "generate", "load_for_generation", "load_tokenizer_for",
           "render", "run", "stop_token_ids"]


def run(
    cfg,
    lora_model_dir: str | None = None,
    base_model: str | None = None,
    prompt: str | None = None,
    chat: bool = False,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
) -> str | None:
    """Entry point of `tuneforge inference`: one-shot (--prompt or stdin) or --chat."""
    if prompt is None and not chat and sys.stdin.isatty():
        print("Enter a prompt, end with Ctrl-D:", file=sys.stderr)
    model, tokenizer = load_for_generation(cfg, lora_model_dir, base_model)
    if not tokenizer.chat_template:
        log.info("the tokenizer has no chat template: prompts are given to the model as raw text")
    stop = stop_token_ids(tokenizer, cfg.eot_tokens)
    options = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "stop_ids": stop,
        "chat_template_kwargs": cfg.chat_template_kwargs,
    }

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if chat:
        def reply(messages):
            text = generate(model, tokenizer, messages, on_text=write, **options)
            write("\n")
            return text

        history = chat_loop(reply, system=cfg.default_system_message)
        log.debug("chat history: %s", json.dumps(history))
        return None
    text = prompt if prompt is not None else sys.stdin.read()
    if not text.strip():
        raise TuneforgeError("empty prompt: pass --prompt TEXT or pipe the prompt on stdin.")
    messages = [{"role": "system", "content": cfg.default_system_message}] if cfg.default_system_message else []
    messages.append({"role": "user", "content": text.rstrip("\n")})
    answer = generate(model, tokenizer, messages, on_text=write, **options)
    write("\n")
    return answer
