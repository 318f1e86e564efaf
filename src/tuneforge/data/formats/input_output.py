"""Format `input_output` (to be implemented)."""
