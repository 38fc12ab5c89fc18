"""Orbax checkpoints with three items: `state` (params, optimizer state, step), `data` (input iterator state) and
`config` (the resolved config as JSON). Restoring takes target shardings, so a checkpoint written on one mesh shape
restores onto another."""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from cm3jax.config_validation import ConfigError

ITEMS = ("state", "data", "config")


class Checkpointer:
    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        """Starts an (async) save; earlier saves are finished first, so at most one is in flight."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any, shardings: Any) -> tuple[Any, dict]:
        """Restores `state` laid out by `shardings` (any mesh) and the `data` iterator state."""
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_state, shardings)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()),
        )
        return restored.state, restored.data

    def restore_config(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def gather_process_states(local_state: dict) -> dict:
    """Every process's data-iterator state in one JSON item (orbax writes JSON items from the primary process only)."""
    if jax.process_count() == 1:
        return {"process_count": 1, "processes": [local_state]}
    encoded = np.frombuffer(json.dumps(local_state).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray(len(encoded), np.int32))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[:len(encoded)] = encoded
    gathered = multihost_utils.process_allgather(padded)
    states = [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, lengths)]
    return {"process_count": jax.process_count(), "processes": states}


def select_process_state(saved: dict) -> dict:
    """This process's iterator state from a gathered `data` item; the process count must not have changed."""
    if saved.get("process_count") != jax.process_count():
        raise ConfigError(
            f"config.data.restore_iterator: the checkpoint's data iterators were saved by {saved.get('process_count')} "
            f"processes but this run has {jax.process_count()}. Resume with the same number of processes, or set "
            f"--config.data.restore_iterator=False and a new --config.data.seed to continue with a fresh data order.")
    return saved["processes"][jax.process_index()]
