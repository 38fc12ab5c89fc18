"""`cm3jax sft`: instruction-tune the pretrained LM on CM3leon's task templates (DIR/sft, the layout of DIR/lm)."""
from __future__ import annotations

import ml_collections

from cm3jax.stages.stage import Stage
from cm3jax.workdir import Workdir


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> bool:
    from cm3jax.train.sft import train_sft

    stage_dir = workdir.sft
    task_eval = None
    if int(config.eval.every):
        from cm3jax.evaluation.evaluate import evaluator_for_training

        task_eval = evaluator_for_training(workdir.resolve(config), workdir, model="sft")
    result = train_sft(config, workdir, on_start=lambda: stage_dir.prepare(config), task_eval=task_eval)
    if not result.preempted:
        stage_dir.mark_complete({"step": result.step, **result.last_metrics})
        print(f"sft: trained to step {result.step}; checkpoints in {stage_dir.checkpoints}, logs in {stage_dir.logs}",
              flush=True)
    return not result.preempted


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
