"""Distributed start-up and the named device mesh (axes data, fsdp, tensor; in-slice ici x cross-slice dcn)."""
from __future__ import annotations

import math
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from cm3jax.config_validation import require

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(config: ml_collections.ConfigDict, num_devices: int, num_slices: int) -> tuple[dict, dict]:
    """Fills the -1 entries of mesh.ici / mesh.dcn; returns ({axis: ici}, {axis: dcn})."""
    resolved = []
    for group, total in (("ici", num_devices // num_slices), ("dcn", num_slices)):
        sizes = {axis: int(config.mesh[group][axis]) for axis in MESH_AXES}
        fill = [axis for axis, size in sizes.items() if size == -1]
        require(len(fill) <= 1, f"mesh.{group}", f"at most one axis may be -1, got {fill}")
        for axis, size in sizes.items():
            require(size == -1 or size >= 1, f"mesh.{group}.{axis}", f"must be >= 1 or -1, got {size}")
        known = math.prod(size for size in sizes.values() if size != -1)
        if fill:
            require(total % known == 0, f"mesh.{group}",
                    f"fixed axes multiply to {known}, which does not divide the {total} {group} devices")
            sizes[fill[0]] = total // known
        require(math.prod(sizes.values()) == total, f"mesh.{group}",
                f"{sizes} multiplies to {math.prod(sizes.values())}, but there are {total} {group} devices")
        resolved.append(sizes)
    return resolved[0], resolved[1]


def _expects_several_processes() -> bool:
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize_distributed(dist: ml_collections.ConfigDict) -> None:
    """Starts jax.distributed when the run spans several processes; must run before any other jax call.

    Explicit: `distributed.coordinator_address`, `num_processes`, `process_id` all set (e.g. processes on localhost).
    Automatic: on TPU pods, SLURM and Open MPI clusters jax finds the coordinator itself.
    Otherwise: a single process, nothing to start.
    """
    if dist.coordinator_address:
        if dist.num_processes < 1 or dist.process_id < 0:
            raise ValueError("config.distributed: coordinator_address needs num_processes >= 1 and process_id >= 0")
        if jax.config.jax_platforms in (None, "", "cpu") and dist.cpu_collectives:
            jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
        jax.distributed.initialize(dist.coordinator_address, num_processes=dist.num_processes,
                                   process_id=dist.process_id)
    elif _expects_several_processes():
        jax.distributed.initialize()
    else:
        return
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def _is_tpu_slice(device) -> bool:
    return device.platform == "tpu" and hasattr(device, "slice_index")


def num_slices(devices) -> int:
    """Groups joined by the slower network: TPU slices (multislice), else processes (hosts)."""
    if _is_tpu_slice(devices[0]):
        return len({d.slice_index for d in devices})
    return len({d.process_index for d in devices})


def create_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh; each axis is ici[axis] * dcn[axis] devices, slices outermost."""
    devices = list(devices if devices is not None else jax.devices())
    slices = num_slices(devices)
    ici, dcn = resolve_mesh_shape(config, len(devices), slices)
    ici_shape = [ici[a] for a in MESH_AXES]
    dcn_shape = [dcn[a] for a in MESH_AXES]
    if slices > 1:
        device_array = mesh_utils.create_hybrid_device_mesh(
            ici_shape, dcn_shape, devices, process_is_granule=not _is_tpu_slice(devices[0]))
    elif len(devices) == len(jax.devices()) and jax.default_backend() == "tpu":
        device_array = mesh_utils.create_device_mesh(ici_shape, devices)  # follows the physical torus
    else:
        device_array = np.asarray(devices).reshape(ici_shape)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def data_parallel_mesh(devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh with every one of `devices` (default: this process's) on the data axis, for
    models that are copied whole to each device (e.g. the VQ-GAN while it tokenizes)."""
    devices = list(devices if devices is not None else jax.local_devices())
    return Mesh(np.asarray(devices).reshape(-1, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
