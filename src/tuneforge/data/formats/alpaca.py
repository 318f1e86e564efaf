"""Format `alpaca` (to be implemented)."""
