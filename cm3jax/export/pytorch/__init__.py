"""Files copied into an hf export and run by PyTorch users with `trust_remote_code` (they need torch and transformers
only, never cm3jax)."""
