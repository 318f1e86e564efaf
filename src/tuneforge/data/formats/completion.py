"""Format `completion` (to be implemented)."""
