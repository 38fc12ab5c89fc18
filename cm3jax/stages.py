"""Workdir stage folders: resolved config next to the outputs, and an atomic completion marker."""
from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import ml_collections

from cm3jax.config import config_to_json
from cm3jax.errors import WorkdirError

COMPLETE_MARKER = "COMPLETE.json"


def atomic_write_text(path: str, text: str) -> None:
    """Write to a temporary name, then rename: readers see the old file or the whole new one, never a part."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_workdir(workdir: str) -> None:
    """Creates the workdir if needed and checks that a file can be written there (remote stores, `scheme://...`,
    are left to the stages); raises WorkdirError saying what is wrong."""
    if "://" in workdir:
        return
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir={workdir} is a file, not a folder")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"--workdir={workdir} cannot be created: {e.strerror}") from e
    try:
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-check-"):
            pass
    except OSError as e:
        raise WorkdirError(f"--workdir={workdir} is not writable: {e.strerror}") from e


def prepare_stage(workdir: str, stage: str, config: ml_collections.ConfigDict) -> str:
    """Creates DIR/stage and writes its resolved config there (process 0); returns the folder."""
    stage_dir = os.path.join(workdir, stage)
    os.makedirs(stage_dir, exist_ok=True)
    if jax.process_index() == 0:
        atomic_write_text(os.path.join(stage_dir, "config.json"), config_to_json(config))
    return stage_dir


def is_complete(stage_dir: str) -> bool:
    return os.path.exists(os.path.join(stage_dir, COMPLETE_MARKER))


def mark_complete(stage_dir: str, summary: dict) -> None:
    if jax.process_index() == 0:
        record = {"completed_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **summary}
        atomic_write_text(os.path.join(stage_dir, COMPLETE_MARKER), json.dumps(record, indent=2, default=float))
