"""Named chat templates (chatml, llama3, mistral, gemma, qwen3, phi_3) and template resolution.

To be implemented: `resolve(name, jinja, tokenizer) -> str | None` and `eot_tokens(name) -> list[str]`.
"""
