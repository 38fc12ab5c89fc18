"""`cm3jax train`: train the CM3leon language model on the token shards and their neighbours (DIR/lm)."""
from __future__ import annotations

import ml_collections

from cm3jax.stages.stage import Stage, run_training_stage
from cm3jax.workdir import Workdir


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> bool:
    from cm3jax.train.lm import train_language_model

    config, stage_dir = workdir.resolve(config), workdir.lm
    return run_training_stage(config, workdir, "lm", stage_dir,
                              lambda **hooks: train_language_model(config, str(stage_dir), **hooks))


def validate(config: ml_collections.ConfigDict) -> None:
    """The model, training and data sections, and the eval section where eval.every scores the LM while it trains
    (the mesh is checked against the devices when the stage starts)."""
    import jax

    from cm3jax.config_validation import validate_data_config, validate_model_and_train_config

    validate_model_and_train_config(config)
    validate_data_config(config, jax.process_count())
    if int(config.eval.every):
        from cm3jax.config_validation import require
        from cm3jax.stages import eval as eval_stage

        require(config.data.source == "token_shards", "eval.every",
                f"scores held-out token shards: it needs data.source='token_shards' (got {config.data.source!r})")
        eval_stage.validate(config)


STAGE = Stage(name="lm", command="train", run=run, validate=validate, needs=("tokens", "retrieval"),
              config_fields=("vocab", "model", "train", "optim", "data"), resumable=("train.steps",),
              summary="train the CM3leon language model (DIR/lm; resumes from its latest checkpoint, or from "
                      "--config.train.restore_step=N)")
