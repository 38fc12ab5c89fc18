"""Flax models: the CM3leon decoder."""
