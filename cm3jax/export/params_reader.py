"""A trained model's parameters read from its checkpoint one tensor at a time, whole on every process.

Export never holds the model: each parameter is restored alone (an orbax partial restore of one leaf, onto this
process's first device, whatever mesh wrote it), converted, written and dropped, so host memory needs room for the
largest tensor only. The optimizer state is never read.
"""
from __future__ import annotations

from collections.abc import Iterator

import jax
import ml_collections
import numpy as np

from cm3jax.train.checkpoint import Checkpointer
from cm3jax.workdir import StageDir

ParamPath = tuple[str, ...]


def abstract_params(config: ml_collections.ConfigDict) -> dict:
    """The parameter tree's shapes and dtypes (nothing allocated)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from cm3jax import vocab as vocab_lib
    from cm3jax.models.transformer import CM3LeonDecoder, DecoderConfig

    vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
    model = CM3LeonDecoder(DecoderConfig.from_config(config.model, vocab.padded_size))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return nn.meta.unbox(variables["params"])


def leaves(tree: dict, prefix: ParamPath = ()) -> Iterator[tuple[ParamPath, jax.ShapeDtypeStruct]]:
    """(path, leaf) of a nested dict, keys in sorted order (a stable export order)."""
    for key in sorted(tree):
        value = tree[key]
        if isinstance(value, dict):
            yield from leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _nested(path: ParamPath, value) -> dict:
    for key in reversed(path):
        value = {key: value}
    return value


class ParamsReader:
    """Reads single parameters of `stage_dir`'s checkpoint at `step`."""

    def __init__(self, stage_dir: StageDir, step: int):
        self.step = step
        self._checkpointer = Checkpointer(stage_dir.checkpoints, keep=1)
        self._sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def read(self, path: ParamPath, spec: jax.ShapeDtypeStruct) -> np.ndarray:
        target = _nested(path, jax.ShapeDtypeStruct(spec.shape, spec.dtype))
        shardings = _nested(path, self._sharding)
        restored = self._checkpointer.restore_params(self.step, target, shardings)
        for key in path:
            restored = restored[key]
        return np.asarray(jax.device_get(restored))

    def close(self) -> None:
        self._checkpointer.close()
