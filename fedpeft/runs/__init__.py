"""A run directory: its layout, checkpoints, the server state that makes a run resumable, and export."""
