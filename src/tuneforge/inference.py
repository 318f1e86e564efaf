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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.chat_templates import stop_token_ids  # noqa: F401 - part of this module's API
from tuneforge.errors import ModelError, TuneforgeError

log = logging.getLogger("tuneforge")

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


# ---------------------------------------------------------------- what to load
@dataclass
class Sources:
    model: str  # folder or hub id passed to from_pretrained
    adapter: Path | None  # PEFT adapter folder, if any
    tokenizer: Path | None  # folder with the run's saved tokenizer, if any


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists()


def find_sources(cfg, lora_model_dir: str | None = None, base_model: str | None = None) -> Sources:
    from tuneforge.models.tokenizer import model_source

    out = cfg.output_path()
    base = model_source(cfg, base_model)
    if not base_model and cfg.reinit_weights and (out / "base_model").is_dir():
        base = str(out / "base_model")  # an adapter trained on a randomly initialised base saved there
    if lora_model_dir:
        adapter = Path(cfg.resolve_path(lora_model_dir))
        if not (adapter / "adapter_config.json").exists():
            raise ModelError(f"--lora-model-dir {adapter} holds no adapter_config.json; pass the adapter folder.")
    elif (out / "adapter_config.json").exists():
        adapter = out
    elif not base_model and (out / "config.json").exists() and any((out / f).exists() for f in WEIGHT_FILES):
        return Sources(model=str(out), adapter=None, tokenizer=out if _has_tokenizer(out) else None)
    elif cfg.lora_model_dir:
        adapter = Path(cfg.resolve_path(cfg.lora_model_dir))
    else:
        log.warning("no trained model in %s; generating with the base model %s", out, base)
        adapter = None
    tokenizer = next((d for d in (adapter, out) if d is not None and _has_tokenizer(d)), None)
    return Sources(model=base, adapter=adapter, tokenizer=tokenizer)


# ---------------------------------------------------------------- loading
def _dtype(cfg):
    import torch

    if cfg.torch_dtype and cfg.torch_dtype != "auto":
        return getattr(torch, cfg.torch_dtype)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _adapter_vocab(adapter: Path) -> int | None:
    """Rows of the embedding the adapter saved (training resized the vocabulary), else None."""
    file = adapter / "adapter_model.safetensors"
    if not file.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
            if key.endswith(("embed_tokens.weight", "embed_tokens.base_layer.weight", "lm_head.weight")):
                return f.get_slice(key).get_shape()[0]
    return None


def load_tokenizer_for(cfg, sources: Sources):
    if sources.tokenizer is not None:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(sources.tokenizer), trust_remote_code=cfg.trust_remote_code)
        except Exception as exc:
            raise ModelError(f"could not load the tokenizer saved in {sources.tokenizer}: {exc}") from None
    from tuneforge.models.tokenizer import load_tokenizer

    return load_tokenizer(cfg)


def load_model(cfg, lora_model_dir: str | None = None, base_model: str | None = None):
    """(model, tokenizer) ready to generate, on CUDA when available."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    sources = find_sources(cfg, lora_model_dir, base_model)
    tokenizer = load_tokenizer_for(cfg, sources)
    kwargs: dict[str, Any] = {"dtype": _dtype(cfg), "trust_remote_code": cfg.trust_remote_code}
    quantized = cfg.load_in_4bit or cfg.load_in_8bit
    if quantized:
        kwargs["quantization_config"] = _quantization(cfg)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(sources.model, **kwargs)
    except Exception as exc:
        raise ModelError(f"could not load the model from {sources.model}: {type(exc).__name__}: {exc}") from None
    if sources.adapter is not None:
        from peft import PeftModel

        rows = _adapter_vocab(sources.adapter)
        if rows and rows != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(rows)
        try:
            model = PeftModel.from_pretrained(model, str(sources.adapter))
        except Exception as exc:
            raise ModelError(
                f"could not load the adapter in {sources.adapter} onto {sources.model}: {exc}. Is base_model the "
                "model this adapter was trained on?"
            ) from None
    if not quantized and torch.cuda.is_available():
        model = model.to("cuda")
    log.info("loaded %s%s", sources.model, f" + adapter {sources.adapter}" if sources.adapter else "")
    return model.eval(), tokenizer


def _quantization(cfg):
    """The training run's bitsandbytes settings (CUDA only), with a clear error elsewhere."""
    import importlib.util

    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(
            "this run trained on a 4/8-bit base (load_in_4bit/load_in_8bit), which needs a CUDA GPU and the "
            "bitsandbytes package. Elsewhere, load the base unquantized: add `--adapter lora --load-in-4bit false` "
            "(or `--load-in-8bit false`), or run `tuneforge merge-lora --dequant` and generate from the merged folder."
        )
    from tuneforge.models.load import quantization_config

    return quantization_config(cfg)


# ---------------------------------------------------------------- prompts and stopping
def render(tokenizer, messages: list[dict[str, str]], chat_template_kwargs: dict | None = None) -> list[int]:
    """Prompt token ids: the chat template with a generation prompt, or the raw text when there is none."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **(chat_template_kwargs or {})
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    # No template: a completion model continues the text as given.
    text = "\n".join(m["content"] for m in messages)
    return tokenizer(text, add_special_tokens=True)["input_ids"]


class _TextStream:
    """A transformers streamer that hands decoded text to `on_text` as tokens arrive.

    The whole completion is decoded again at each step and only the new suffix is emitted, so tokens that
    merge with their neighbours (byte-level pieces, multi-byte characters) come out right.
    """

    def __init__(self, tokenizer, on_text: Callable[[str], None], stop_ids: list[int]):
        self.tokenizer, self.on_text, self.stop = tokenizer, on_text, set(stop_ids)
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        self.ids.extend(t for t in value.reshape(-1).tolist() if t not in self.stop)
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for its next byte
        if len(text) > self.sent:
            self.on_text(text[self.sent:])
            self.sent = len(text)


def generate(
    model,
    tokenizer,
    messages: list[dict[str, str]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_ids: list[int] | None = None,
    on_text: Callable[[str], None] | None = None,
    chat_template_kwargs: dict | None = None,
) -> str:
    """The assistant's reply to `messages` (greedy when temperature is 0), without the stop token."""
    import torch

    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or max_new_tokens < 1:
        raise TuneforgeError("sampling: need temperature >= 0, 0 < top_p <= 1, top_k >= 0, max_new_tokens >= 1.")
    stop = stop_ids or stop_token_ids(tokenizer)
    prompt = render(tokenizer, messages, chat_template_kwargs)
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt], device=device)
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": stop,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0],
        "do_sample": temperature > 0,
    }
    if temperature > 0:  # greedy decoding (do_sample=False) ignores these, and the model's own defaults
        options.update(temperature=temperature, top_p=top_p, top_k=top_k)
    streamer = _TextStream(tokenizer, on_text, stop) if on_text else None
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **options
        )
    new = out[0, len(prompt):].tolist()
    while new and new[-1] in stop:
        new.pop()
    return tokenizer.decode(new, skip_special_tokens=True)


# ---------------------------------------------------------------- the REPL
HELP = "commands: /reset (new conversation), /system <text>, /undo (drop the last exchange), /exit"


def chat_loop(
    reply: Callable[[list[dict[str, str]]], str],
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = print,
    system: str | None = None,
) -> list[dict[str, str]]:
    """Multi-turn chat; `reply(messages)` streams and returns the assistant's answer. Returns the history."""
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    write(HELP)
    while True:
        try:
            line = read(">>> ")
        except (EOFError, KeyboardInterrupt):
            write("")
            return messages
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return messages
        if text == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            write("(new conversation)")
        elif text == "/system" or text.startswith("/system "):
            messages = [m for m in messages if m["role"] != "system"]
            prompt = text[len("/system"):].strip()
            if prompt:
                messages.insert(0, {"role": "system", "content": prompt})
            write(f"(system prompt {'set' if prompt else 'cleared'})")
        elif text == "/undo":
            while messages and messages[-1]["role"] != "user" and messages[-1]["role"] != "system":
                messages.pop()
            if messages and messages[-1]["role"] == "user":
                messages.pop()
            write("(last exchange removed)")
        elif text.startswith("/"):
            write(f"unknown command {text.split()[0]}; {HELP}")
        else:
            messages.append({"role": "user", "content": line})
            try:
                messages.append({"role": "assistant", "content": reply(messages)})
            except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session
                messages.pop()
                write("\n(interrupted)")


# ---------------------------------------------------------------- the command
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
    model, tokenizer = load_model(cfg, lora_model_dir, base_model)
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
