"""cm3jax: retrieval-augmented CM3leon-style multimodal pretraining and instruction tuning in JAX/Flax."""

__version__ = "0.1.0"
