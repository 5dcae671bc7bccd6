"""Crash-safe file writes shared by checkpoints, ledgers and logs."""
