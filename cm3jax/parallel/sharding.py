"""Logical axis names -> mesh shardings, and global batches built from each process's rows."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def logical_axis_rules(config: ml_collections.ConfigDict) -> tuple:
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.logical_axis_rules)


def logical_to_shardings(boxed_tree: Any, mesh: Mesh, rules: tuple) -> Any:
    """A pytree with flax LogicallyPartitioned leaves (e.g. from jax.eval_shape of init) -> NamedSharding tree
    matching the unboxed tree; unannotated leaves (step counters, optimizer counts) are replicated."""
    logical_specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, ...] arrays: batch split over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shard_count(mesh: Mesh) -> int:
    """How many ways batch_sharding splits the batch."""
    return int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))


def split_over_batch_axes(rows: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array that every process holds whole (the same rows everywhere), as a global array whose rows are
    split over data x fsdp: each device keeps only its rows. len(rows) must be a multiple of batch_shard_count."""
    return jax.make_array_from_callback(rows.shape, batch_sharding(mesh), lambda index: rows[index])


def gather_rows(array: jax.Array) -> np.ndarray:
    """A global array whole on every process (an all-gather across processes where it spans several)."""
    if array.is_fully_addressable:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def process_rows(mesh: Mesh, global_batch_size: int) -> tuple[int, int]:
    """The contiguous [start, stop) rows of the global batch that this process's devices hold."""
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    rows = sorted({r for idx in index_map.values() for r in range(*idx[0].indices(global_batch_size))})
    start, stop = rows[0], rows[-1] + 1
    if len(rows) != stop - start:
        raise ValueError("this process's batch rows are not contiguous; use a mesh with dcn axes outermost")
    return start, stop


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh, global_batch_size: int) -> dict[str, jax.Array]:
    """Assembles each process's rows into global jax.Arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, value, (global_batch_size,) + value.shape[1:])
        for key, value in local_batch.items()
    }
