"""`cm3jax vqgan`: train the VQ-GAN image tokenizer on the raw images (DIR/vqgan; resumes)."""
from __future__ import annotations

import ml_collections

from cm3jax.stages.stage import Stage
from cm3jax.workdir import Workdir


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> bool:
    from cm3jax.train.vqgan import train_vqgan

    config = workdir.resolve(config)
    stage_dir = workdir.vqgan
    result = train_vqgan(config, str(stage_dir), raw_data_dir=str(workdir.data),
                         on_start=lambda: stage_dir.prepare(config))
    if not result.preempted:
        stage_dir.mark_complete(config, {"step": result.step, **result.last_metrics})
        print(f"vqgan: trained to step {result.step}; checkpoints in {stage_dir.checkpoints}, reconstructions in "
              f"{stage_dir.samples}", flush=True)
    return not result.preempted


def validate(config: ml_collections.ConfigDict) -> None:
    from cm3jax.config_validation import validate_raw_data_config, validate_vqgan_config

    validate_raw_data_config(config)
    validate_vqgan_config(config)


STAGE = Stage(name="vqgan", command="vqgan", run=run, validate=validate, needs=("data",),
              config_fields=("raw_data", "vqgan", "vocab.image_codebook_size"), resumable=("vqgan.train.steps",),
              summary="train the VQ-GAN image tokenizer on the raw images (DIR/vqgan; resumes)")
