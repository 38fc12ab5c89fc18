"""Distributed start-up and the named device mesh (axes data, fsdp, tensor; in-slice ici x cross-slice dcn)."""
from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from cm3jax.config_validation import MESH_AXES, resolve_mesh_shape

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
