"""`cm3jax data`: build the embedded dataset (DIR/data) or check the configured raw source; print a summary."""
from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from cm3jax.errors import UserError
from cm3jax.stages.stage import Stage
from cm3jax.workdir import COMPLETE_MARKER, Workdir


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> bool:
    """Process 0 builds and checks the data while the others wait (processes building one dataset into one folder
    would clash); when it fails, every process stops."""
    from cm3jax.data.embedded import embedded_version
    from cm3jax.data.prepare import prepare_raw_data

    config = workdir.resolve(config)
    stage_dir = workdir.data.create()
    failure = None
    if jax.process_index() == 0:
        try:
            summary = prepare_raw_data(config.raw_data, str(stage_dir))
            stage_dir.mark_complete(config, {"dataset": config.raw_data.dataset,
                                             "version": embedded_version(config.raw_data.dataset), "splits": summary})
            print(f"data: {config.raw_data.dataset} in {stage_dir}: {json.dumps(summary)}", flush=True)
        except Exception as e:  # raised below, once the other processes know
            failure = e
    if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(np.int32(failure is not None)):
        if failure is None:
            raise UserError("data: process 0 could not prepare the data (its output says why)")
    if failure is not None:
        raise failure
    return True


def outdated(config: ml_collections.ConfigDict, workdir: Workdir) -> str | None:
    """Why the complete data stage no longer holds what this code builds: an embedded dataset of another version
    than the one it recorded (a stage completed before versions were recorded is taken as it is)."""
    from cm3jax.data.embedded import embedded_version

    version = embedded_version(config.raw_data.dataset)
    if version is None:
        return None
    try:
        built = json.loads((workdir.data.path / COMPLETE_MARKER).read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        return f"its {COMPLETE_MARKER} cannot be read"
    if built is not None and built != version:
        return f"it holds {config.raw_data.dataset} {built}, this cm3jax builds {version}"
    return None


def validate(config: ml_collections.ConfigDict) -> None:
    from cm3jax.config_validation import validate_raw_data_config

    validate_raw_data_config(config)


STAGE = Stage(name="data", command="data", run=run, validate=validate, outdated=outdated, config_fields=("raw_data",),
              summary="build the embedded dataset (DIR/data) or check the configured raw source; print a summary")
