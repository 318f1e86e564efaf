"""Data pipeline: load sources -> format (tokenize + mask) -> length rules -> cache -> batches."""
