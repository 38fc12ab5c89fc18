"""A trained model's parameters read from its checkpoint piece by piece, straight from the stored arrays.

Export never holds the model: a parameter is read from its checkpoint array through tensorstore, converted, written
and dropped. A parameter stacked over layers is read in blocks of the layers stored together (one layer each in a
checkpoint that cm3jax writes: train/checkpoint.py), so host memory needs room for one layer's tensor or the largest
other parameter (the embedding), never the model. The optimizer state is never read; the reads need no devices and
no other process.
"""
from __future__ import annotations

import json
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from cm3jax.models.transformer import STACKED_LAYERS
from cm3jax.train.checkpoint import damaged
from cm3jax.workdir import StageDir

ParamPath = tuple[str, ...]


def abstract_params(config: ml_collections.ConfigDict) -> dict:
    """The parameter tree's shapes and dtypes (nothing allocated)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from cm3jax import vocab as vocab_lib
    from cm3jax.models.transformer import CM3LeonDecoder, DecoderConfig

    vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
    model = CM3LeonDecoder(DecoderConfig.for_run(config, vocab))
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


def is_stacked_layers(path: ParamPath) -> bool:
    """Whether the parameter at `path` is stacked over layers (leading layer axis)."""
    return path[0] == STACKED_LAYERS


class ParamsReader:
    """Reads parameters of `stage_dir`'s checkpoint at `step` (the `params` of its `state` item)."""

    def __init__(self, stage_dir: StageDir, step: int):
        self._step = step
        self._checkpoints = stage_dir.checkpoints
        self._state_dir = self._checkpoints / str(step) / "state"
        try:
            layout = json.loads((self._state_dir / "_METADATA").read_text())
        except (OSError, ValueError) as e:
            raise damaged(self._checkpoints, step, e) from e
        self._use_ocdbt, self._use_zarr3 = bool(layout["use_ocdbt"]), bool(layout["use_zarr3"])
        self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self._use_ocdbt)

    def _open(self, path: ParamPath, spec: jax.ShapeDtypeStruct) -> ts.TensorStore:
        info = ocp.type_handlers.ParamInfo(name=".".join(("params", *path)), parent_dir=self._state_dir,
                                           is_ocdbt_checkpoint=self._use_ocdbt, use_zarr3=self._use_zarr3,
                                           ts_context=self._context)
        tspec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._use_ocdbt)
        try:
            store = ts.open(tspec, open=True, read=True, context=self._context).result()
        except Exception as e:  # tensorstore reports a missing or unreadable array in several ways
            raise damaged(self._checkpoints, self._step, e) from e
        if tuple(store.shape) != tuple(spec.shape):
            raise ValueError(f"params/{'/'.join(path)}: the checkpoint holds shape {tuple(store.shape)}, "
                             f"the config gives {tuple(spec.shape)}")
        return store

    def read(self, path: ParamPath, spec: jax.ShapeDtypeStruct) -> np.ndarray:
        """The whole parameter at `path`."""
        return self._open(path, spec).read().result()

    def read_layer_blocks(self, path: ParamPath, spec: jax.ShapeDtypeStruct) -> Iterator[tuple[int, np.ndarray]]:
        """(first layer, [layers, ...] block) of a stacked parameter, a block per stored chunk along the layer axis:
        one layer at a time from a checkpoint cm3jax wrote, all at once from one written with whole-array chunks."""
        store = self._open(path, spec)
        block = int(store.chunk_layout.read_chunk.shape[0] or store.shape[0])
        for first in range(0, store.shape[0], block):
            yield first, store[first:first + block].read().result()
