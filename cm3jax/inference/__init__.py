"""Decoding and generation tasks."""
