"""`cm3jax sft`: instruction-tune the pretrained LM on CM3leon's task templates (DIR/sft, the layout of DIR/lm)."""
from __future__ import annotations

import ml_collections

from cm3jax.stages.stage import Stage, run_training_stage
from cm3jax.workdir import Workdir


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> bool:
    from cm3jax.train.sft import train_sft

    return run_training_stage(config, workdir, "sft", workdir.sft, lambda **hooks: train_sft(config, workdir, **hooks))


def _skipped_because(config: ml_collections.ConfigDict) -> str | None:
    return None if int(config.sft.steps) > 0 else "sft.steps is 0"


def validate(config: ml_collections.ConfigDict) -> None:
    """The sft section, and the model, training and data sections as SFT trains with them."""
    from cm3jax.config_validation import validate_sft_config
    from cm3jax.stages import lm
    from cm3jax.train.sft import sft_training_config

    validate_sft_config(config)
    lm.validate(sft_training_config(config))


STAGE = Stage(name="sft", command="sft", run=run, validate=validate, needs=("tokens", "lm"),
              config_fields=("vocab", "model", "train", "optim", "data", "sft"), resumable=("sft.steps",),
              skipped_because=_skipped_because,
              summary="instruction-tune the pretrained LM on the SFT task mixture (DIR/sft; starts from DIR/lm or "
                      "--config.sft.init_from, resumes from its latest checkpoint)")
