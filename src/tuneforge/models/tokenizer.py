"""Load the tokenizer as the config describes: special tokens, added tokens, chat template."""

from __future__ import annotations

import logging
from pathlib import Path

from tuneforge.config.schema import Config
from tuneforge.errors import ModelError

log = logging.getLogger("tuneforge")


def model_source(cfg: Config, value: str | None = None) -> str:
    """A local folder (relative to the config file or the working directory) or a hub id."""
    return cfg.resolve_path(value or cfg.base_model) or cfg.base_model


def load_tokenizer(cfg: Config, source: str | None = None):
    """Load the fast tokenizer, apply special_tokens/tokens, pad token and the chat template."""
    import transformers

    from tuneforge import chat_templates

    src = source or model_source(cfg, cfg.tokenizer_config or cfg.base_model)
    cls = getattr(transformers, cfg.tokenizer_type) if cfg.tokenizer_type else transformers.AutoTokenizer
    kwargs = {"trust_remote_code": cfg.trust_remote_code, "use_fast": cfg.tokenizer_use_fast}
    if cfg.tokenizer_legacy is not None:
        kwargs["legacy"] = cfg.tokenizer_legacy
    if cfg.model_revision and src == cfg.base_model:
        kwargs["revision"] = cfg.model_revision
    try:
        tokenizer = cls.from_pretrained(src, **kwargs)
    except Exception as exc:
        raise ModelError(_load_hint("tokenizer", src, exc)) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"tokenizer of {src} is not a fast tokenizer; tuneforge needs one for exact label masks.")
    _apply_special_tokens(cfg, tokenizer)
    template = chat_templates.resolve(cfg.chat_template, cfg.chat_template_jinja, tokenizer, cfg.source_dir)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def _apply_special_tokens(cfg: Config, tokenizer) -> None:
    st = cfg.special_tokens
    if st:
        mapping = {k: v for k, v in st.model_dump(exclude_none=True).items() if k != "additional_special_tokens"}
        if mapping:
            tokenizer.add_special_tokens(mapping)
        if st.additional_special_tokens:
            tokenizer.add_tokens(st.additional_special_tokens, special_tokens=True)
    if cfg.tokens:
        tokenizer.add_tokens(cfg.tokens)
    if tokenizer.pad_token is None:
        # Padding is never trained on and never attended to by real tokens, so any token works.
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer has no pad token; using eos_token %r for padding", tokenizer.eos_token)


def _load_hint(what: str, src: str, exc: Exception) -> str:
    p = Path(src)
    if p.exists():
        return f"could not load the {what} from {src}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if src.startswith((".", "/", "~")):
        return f"{what} folder not found: {src}. Check base_model / tokenizer_config."
    return (
        f"could not load the {what} `{src}`: it is not a local folder and the hub is unreachable or has no such "
        f"repository ({type(exc).__name__}). Check the name, or download it and point base_model to the folder."
    )
