"""`cm3jax pipeline`: every registered stage in order, skipping the complete ones whose config is unchanged."""
from __future__ import annotations

import os

import jax
import ml_collections
from jax.experimental import multihost_utils

from cm3jax.config import config_differences
from cm3jax.config_validation import ConfigError
from cm3jax.stages import STAGES, Stage
from cm3jax.storage import absolute_path
from cm3jax.workdir import USER_PATH_FIELDS, Workdir

# Settings that change how a stage runs, not what it produces: a complete stage given other values is still complete.
RUNTIME_ONLY = ("log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
                "async_checkpointing", "peak_tflops_per_device", "restore_step", "num_workers", "worker_buffer_size",
                "scan_unroll", "remat_policy", "attention", "restore_iterator",
                "token_dir", "neighbours_dir")  # where the inputs are; what they are is checked by their digests


def complete_stage_changes(config: ml_collections.ConfigDict, workdir: Workdir,
                           stage: Stage) -> list[tuple[str, object, object]]:
    """Fields that differ between `config` and the config the complete `stage` ran with (runtime-only settings,
    which do not change its outputs, and fields newer than the run left out)."""
    saved = workdir.stage(stage.name).saved_config()
    if saved is None:
        return []
    return [d for d in config_differences(config, saved, stage.config_fields, only_saved_fields=True)
            if d[0].rsplit(".", 1)[-1] not in RUNTIME_ONLY and not _same_path(*d)]


def _same_path(field: str, given: object, saved: object) -> bool:
    """A path field saved relative (by a cm3jax that kept paths as given) naming the folder now given absolute."""
    return (field in USER_PATH_FIELDS and isinstance(given, str) and isinstance(saved, str) and bool(saved)
            and os.fspath(absolute_path(saved)) == given)


def continues(stage: Stage, changes: list) -> bool:
    """Only a larger step count of a training stage changed: rerunning it trains on from its last checkpoint."""
    return bool(changes) and all(field in stage.resumable and isinstance(given, int) and isinstance(saved, int) and
                                 given > saved for field, given, saved in changes)


def run_pipeline(config: ml_collections.ConfigDict, workdir: Workdir) -> bool:
    """Runs the stages in order; a complete stage is skipped when its config is unchanged, continued when only its
    step count grew, run again when it is outdated (Stage.outdated), and refused (ConfigError naming the fields)
    otherwise; once a stage has run, the complete
    stages after it run again, each checking its inputs (a rerun of unchanged work resumes and finds it done). A
    preempted stage ends the pipeline (the same command resumes it), so no later stage runs on its unfinished
    outputs. Returns False when a stage was preempted."""
    enabled = [stage for stage in STAGES if not stage.skipped_because(config)]
    for stage in enabled:  # a mistake in a late stage's settings stops the pipeline before the first runs
        stage.validate(config)
    earlier_stage_ran = False
    for stage in STAGES:
        reason = stage.skipped_because(config)
        if reason:
            print(f"{stage.name}: skipped ({reason})", flush=True)
            continue
        stage_dir = workdir.stage(stage.name)
        if jax.process_count() > 1:  # each process decides from what every process has finished, so all decide alike
            multihost_utils.sync_global_devices(f"cm3jax pipeline: {stage.name}")
        if stage_dir.is_complete():
            changes = complete_stage_changes(config, workdir, stage)
            listed = "; ".join(f"config.{f}={g!r} (it ran with {s!r})" for f, g, s in changes)
            if changes and not continues(stage, changes):
                raise ConfigError(f"{stage.name} is complete but its config differs from the one it ran with: "
                                  f"{listed}. Run with the values it ran with, or use a new --workdir (or move "
                                  f"{stage_dir} and the stages after it away) to redo it")
            outdated = stage.outdated(config, workdir)
            if outdated:
                print(f"{stage.name}: complete, but {outdated}: running it again", flush=True)
            elif not changes and not earlier_stage_ran:
                print(f"{stage.name}: complete, skipped", flush=True)
                continue
            elif not changes:
                print(f"{stage.name}: complete, run again to check it against the stage before, which ran", flush=True)
            else:
                print(f"{stage.name}: complete, but {listed}: training on from its last checkpoint", flush=True)
        earlier_stage_ran = True
        if not stage.run(config, workdir):
            print(f"pipeline: stopped, {stage.name} was preempted (its checkpoint is saved); rerun the same command "
                  f"to resume", flush=True)
            return False
    return True
