"""The coordinator side: ServerApp wiring, the round loop, checkpoints, progress."""
