"""Format `pretokenized` (to be implemented)."""
