"""cm3jax: retrieval-augmented CM3leon-style multimodal pretraining and instruction tuning in JAX/Flax."""

__version__ = "0.1.0"


def load_pretrained(folder, devices=None):
    """The Generator of `cm3jax generate` for a params export (`cm3jax export --config.export.format=params`); see
    cm3jax/export/params_bundle.py. Imported on call, so `import cm3jax` stays light."""
    from cm3jax.export.params_bundle import load_pretrained as load

    return load(folder, devices)
