"""`cm3jax data`: build the embedded dataset (DIR/data) or check the configured raw source; print a summary."""
from __future__ import annotations

import json

import ml_collections

from cm3jax.stages.stage import Stage
from cm3jax.workdir import Workdir


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> bool:
    from cm3jax.data.prepare import prepare_raw_data

    config = workdir.resolve(config)
    stage_dir = workdir.data.create()
    summary = prepare_raw_data(config.raw_data, str(stage_dir))
    stage_dir.mark_complete(config, {"dataset": config.raw_data.dataset, "splits": summary})
    print(f"data: {config.raw_data.dataset} in {stage_dir}: {json.dumps(summary)}", flush=True)
    return True


def validate(config: ml_collections.ConfigDict) -> None:
    from cm3jax.config_validation import validate_raw_data_config

    validate_raw_data_config(config)


STAGE = Stage(name="data", command="data", run=run, validate=validate, config_fields=("raw_data",),
              summary="build the embedded dataset (DIR/data) or check the configured raw source; print a summary")
