"""Orbax checkpoints with three items: `state` (params, optimizer state, step), `data` (input iterator state) and
`config` (the resolved config as JSON). Restoring takes target shardings, so a checkpoint written on one mesh shape
restores onto another.

Before a run resumes, its checkpoint's saved config is compared with the given one on the fields that fix the
state's shapes (a mismatch is refused with the fields named), and a checkpoint that cannot be read back is reported
as damaged with the step to resume from instead (`train.restore_step`); checkpoints after a chosen restore step are
moved aside to `checkpoints_set_aside/`, not deleted.

A parameter stacked over layers (under a `layers` key: nn.scan's leading layer axis) is stored in chunks of one
layer, so one layer can be read without the others (export streams a model layer by layer this way).
"""
from __future__ import annotations

import copy
import json
import logging
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from cm3jax.config import config_differences
from cm3jax.config_validation import ConfigError
from cm3jax.errors import DamagedCheckpointError
from cm3jax.storage import PathLike, absolute_path, move

ITEMS = ("state", "data", "config")


class Checkpointer:
    def __init__(self, directory: PathLike, *, keep: int, async_save: bool = True, create: bool = True):
        """create=False: only read (a missing folder has no checkpoints and is not made)."""
        self.directory = absolute_path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=create,
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
                state=ocp.args.StandardSave(state, save_args=layer_chunked_save_args(state)),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any, shardings: Any) -> tuple[Any, dict]:
        """Restores `state` laid out by `shardings` (any mesh) and the `data` iterator state; a checkpoint whose
        files cannot be read raises DamagedCheckpointError."""
        restored = self._restore(step, state=ocp.args.StandardRestore(_target(abstract_state, shardings)),
                                 data=ocp.args.JsonRestore())
        if not isinstance(restored.data, dict):
            raise damaged(self.directory, step, ValueError("the data item is empty"))
        return restored.state, restored.data

    def restore_params(self, step: int, abstract_params: Any, shardings: Any) -> Any:
        """The parameters alone of the `state` item (no optimizer state), laid out by `shardings`: what fine-tuning
        starts from."""
        target = {"params": _target(abstract_params, shardings)}
        restored = self._restore(step, state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
        return restored.state["params"]

    def _restore(self, step: int, **items) -> Any:
        """The checkpoint's `items` (orbax restore args by item name); files that cannot be read raise
        DamagedCheckpointError."""
        hooks = _quiet_background_reports()
        try:
            _require_index_files(self.directory / str(step))
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax and tensorstore raise many kinds for unreadable files
            raise damaged(self.directory, step, e) from e  # the reports stay quiet: the run ends here
        _restore_background_reports(hooks)
        return restored

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def layer_chunked_save_args(tree: Any) -> Any:
    """orbax SaveArgs for `tree`: arrays under a `layers` key (layer axis first) are chunked one layer each."""
    from cm3jax.models.transformer import STACKED_LAYERS

    def save_args(path, leaf) -> ocp.SaveArgs:
        stacked = any(getattr(key, "key", None) == STACKED_LAYERS for key in path) and np.ndim(leaf) >= 2
        return ocp.SaveArgs(shard_axes=(0,) if stacked else ())

    return jax.tree_util.tree_map_with_path(save_args, tree)


def _target(abstract: Any, shardings: Any) -> Any:
    """Shapes and dtypes of `abstract` with the shardings to restore them onto."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


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


class _DropUnretrievedFutures(logging.Filter):
    """asyncio's "exception was never retrieved" reports, logged when orbax's abandoned reads are collected."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "exception was never retrieved" not in record.getMessage()


_ASYNCIO_LOGGER = logging.getLogger("asyncio")


def _quiet_background_reports() -> tuple:
    """Stops printing of background reports (unraisable exceptions, exceptions in threads, asyncio's reports of
    futures whose exception nobody read) and returns what to put back (`_restore_background_reports`). While a
    restore runs, and after it fails: once one array read fails, orbax's other reads still finish into its closed
    event loop or are collected unawaited, each printing a traceback that says nothing about the damage, some of
    them before the failure reaches this module, some when the interpreter exits; the run then ends with the
    damaged-checkpoint error."""
    previous = sys.unraisablehook, threading.excepthook
    sys.unraisablehook = lambda unraisable: None
    threading.excepthook = lambda args: None
    quiet = _DropUnretrievedFutures()
    _ASYNCIO_LOGGER.addFilter(quiet)
    return (*previous, quiet)


def _restore_background_reports(hooks: tuple) -> None:
    sys.unraisablehook, threading.excepthook, quiet = hooks
    _ASYNCIO_LOGGER.removeFilter(quiet)


# Files a readable checkpoint has, whole. Checked before orbax opens them: an empty manifest makes tensorstore fail
# while other reads are in flight, and their late callbacks print tracebacks that say nothing about the damage.
INDEX_FILES = ("state/_METADATA", "state/manifest.ocdbt", "data/metadata", "config/metadata")


def _require_index_files(step_dir: epath.Path) -> None:
    for name in INDEX_FILES:
        path = step_dir / name
        if not path.is_file() or path.stat().length == 0:
            raise OSError(f"{name} is missing or empty")


def checkpoint_steps(directory: PathLike) -> list[int]:
    """Steps of the finished checkpoints under `directory` (as orbax tells them: a folder named by its step once
    renamed into place, or in a bucket once it holds orbax's commit marker)."""
    return sorted(ocp.utils.checkpoint_steps(directory))


def resume_step(directory: PathLike, restore_step: int) -> int | None:
    """The step to resume from: the latest checkpoint for restore_step -1, else restore_step, which must exist."""
    steps = checkpoint_steps(directory)
    if restore_step < 0:
        return steps[-1] if steps else None
    if restore_step not in steps:
        raise ConfigError(f"config.train.restore_step: no checkpoint at step {restore_step} under {directory} "
                          f"(saved steps: {steps or 'none'})")
    return restore_step


def damaged(directory: PathLike, step: int, cause: BaseException) -> DamagedCheckpointError:
    earlier = [s for s in checkpoint_steps(directory) if s < step]
    what = str(cause).strip().splitlines()[0][:200] if str(cause).strip() else type(cause).__name__
    advice = (f"resume from the one before with --config.train.restore_step={earlier[-1]} (later checkpoints are "
              f"moved to checkpoints_set_aside/)" if earlier else
              f"no earlier checkpoint is left: move {directory}/{step} away to start this stage over")
    return DamagedCheckpointError(f"checkpoint {directory}/{step} is damaged and cannot be restored "
                                  f"({type(cause).__name__}: {what}); {advice}")


def saved_config(directory: PathLike, step: int) -> dict:
    """The config a checkpoint was saved with (its `config` item), as a nested dict."""
    path = epath.Path(directory) / str(step) / "config" / "metadata"
    try:
        return json.loads(json.loads(path.read_text())["json"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise damaged(directory, step, e) from e


def state_differences(config, saved: dict, state_fields: Sequence[str]) -> str:
    """The state-fixing fields (shapes, vocabulary) where `config` differs from a checkpoint's saved config, as one
    line naming each (`config.model.d_model=64 but 32 in the checkpoint`); "" where none differs. A field the saved
    config lacks (added to cm3jax after it was written) was its default then: a field is added with the default that
    keeps the earlier behaviour."""
    from cm3jax.config import default

    saved = copy.deepcopy(saved)
    for field in state_fields:
        *sections, name = field.split(".")
        parent = saved
        for section in sections:
            parent = parent.get(section) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and name not in parent:
            parent[name] = json.loads(json.dumps(default(field), default=str))
    differences = config_differences(config, saved, state_fields, only_saved_fields=True)
    return "; ".join(f"config.{n}={g!r} but {s!r} in the checkpoint" for n, g, s in differences)


def require_resumable(config, saved: dict, state_fields: Sequence[str], where: str) -> None:
    """Refuses (ConfigError naming each field) to resume the checkpoint at `where` with other state-fixing values."""
    listed = state_differences(config, saved, state_fields)
    if listed:
        raise ConfigError(f"{listed}: {where} cannot be resumed with another model shape. Set these back, or train "
                          f"in a new --workdir")


def set_aside_checkpoints_after(directory: PathLike, step: int, aside: PathLike) -> None:
    """Moves the checkpoints after `step` to `aside/<step>-<time>` (process 0), so the run continues from `step`
    and nothing is deleted. Every process waits for the move, whatever it listed: one that listed after process 0
    moved them finds none."""
    later = [s for s in checkpoint_steps(directory) if s > step]
    if later and jax.process_index() == 0:
        aside = epath.Path(aside)
        aside.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for s in later:
            move(epath.Path(directory) / str(s), aside / f"{s}-{stamp}")
        print(f"resuming from step {step}: checkpoints {later} moved to {aside}", flush=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("cm3jax: checkpoints set aside")
