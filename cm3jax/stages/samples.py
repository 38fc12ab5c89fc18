"""The pipeline's last stage: images for generate.sample_prompts and captions of held-out images (DIR/samples)."""
from __future__ import annotations

import json

import ml_collections

from cm3jax.stages.stage import Stage
from cm3jax.workdir import Workdir


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> bool:
    from cm3jax.inference.samples import write_samples

    stage_dir = workdir.samples.create()
    summary = write_samples(config, workdir, stage_dir.path)
    stage_dir.mark_complete(config, summary)
    print(f"samples: {json.dumps(summary)}", flush=True)
    return True


def _skipped_because(config: ml_collections.ConfigDict) -> str | None:
    if not config.generate.sample_prompts and not config.generate.sample_captions:
        return "no generate.sample_prompts or generate.sample_captions"
    return None


def validate(config: ml_collections.ConfigDict) -> None:
    from cm3jax.config_validation import validate_generate_config

    validate_generate_config(config)


STAGE = Stage(name="samples", command="samples", run=run, validate=validate, needs=("lm",),
              config_fields=("generate", "sft.steps"),
              skipped_because=_skipped_because,
              summary="draw generate.sample_prompts and caption held-out images with the trained LM (DIR/samples)")
