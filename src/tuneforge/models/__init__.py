"""Model and tokenizer loading, adapters, attention and losses."""
