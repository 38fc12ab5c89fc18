"""Workdir stage folders: resolved config next to the outputs, an atomic completion marker, and the identity of the
inputs a stage was made from (`inputs.json`), so a stage never runs on, or resumes with, inputs that changed."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from typing import Any

import jax
import ml_collections

from cm3jax.config import config_to_json
from cm3jax.errors import UserError, WorkdirError

COMPLETE_MARKER = "COMPLETE.json"
INPUTS_FILE = "inputs.json"


class ChangedInputsError(UserError):
    """A stage's inputs are not the ones its existing outputs were made from."""


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


def files_digest(*paths: str) -> str | None:
    """sha256 of the contents of the files among `paths` that exist (None when none does)."""
    digest, found = hashlib.sha256(), False
    for path in paths:
        if os.path.exists(path):
            found = True
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest() if found else None


def arrays_digest(tree: Any) -> str:
    """sha256 of every array of a pytree (e.g. a model's parameters), in tree order."""
    import numpy as np

    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(jax.device_get(tree)):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def stage_identity(stage_dir: str) -> str | None:
    """What later stages record of this stage's outputs: the digest of the inputs it was made from."""
    return files_digest(os.path.join(stage_dir, INPUTS_FILE))


def check_inputs(stage_dir: str, inputs: dict) -> None:
    """Raises ChangedInputsError when stage_dir already holds outputs made from other inputs."""
    path = os.path.join(stage_dir, INPUTS_FILE)
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    changed = [f"{key}: {saved.get(key)} then, {inputs.get(key)} now" for key in sorted(set(saved) | set(inputs))
               if saved.get(key) != inputs.get(key)]
    if changed:
        raise ChangedInputsError(f"{stage_dir} was made from other inputs than the ones in this workdir now "
                                 f"({'; '.join(changed)}); running on would mix the two. Move {stage_dir} away to "
                                 f"redo it from the current inputs")


def record_inputs(stage_dir: str, inputs: dict) -> None:
    if jax.process_index() == 0:
        os.makedirs(stage_dir, exist_ok=True)
        atomic_write_text(os.path.join(stage_dir, INPUTS_FILE), json.dumps(inputs, indent=2, sort_keys=True))
