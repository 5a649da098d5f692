"""The embedded driver: a local supervisor running workers as OS processes."""
