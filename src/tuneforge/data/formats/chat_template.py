"""Format `chat_template` (to be implemented)."""
