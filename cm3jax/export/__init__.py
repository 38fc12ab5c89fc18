"""Trained models written for use outside cm3jax (`cm3jax export`, docs/export.md)."""
