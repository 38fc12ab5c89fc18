"""Input sources for training."""
