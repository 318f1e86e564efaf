"""Format `user_defined` (to be implemented)."""
