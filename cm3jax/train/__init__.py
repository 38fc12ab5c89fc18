"""Training loop, losses, optimizer, checkpoints and metrics."""
