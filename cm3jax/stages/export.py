"""`cm3jax export`: the trained model written for use outside cm3jax
(DIR/export/<model>-<step>-<format>-<dtype>)."""
from __future__ import annotations

import ml_collections

from cm3jax.stages.stage import Stage
from cm3jax.workdir import Workdir


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> bool:
    from cm3jax.export.command import export_model

    config = workdir.resolve(config)
    folder = export_model(config, workdir)
    workdir.export.mark_complete(config, {"exported": folder.name})
    print(f"export: written to {folder}", flush=True)
    return True


def _skipped_because(config: ml_collections.ConfigDict) -> str | None:
    """A model the chosen format cannot hold is skipped by the pipeline (`cm3jax export` refuses it)."""
    from cm3jax.export.command import unexportable_because

    return unexportable_because(config)


def validate(config: ml_collections.ConfigDict) -> None:
    from cm3jax.config_validation import require, require_checkpoint_step
    from cm3jax.export.command import DTYPES, FORMATS, MODELS

    e = config.export
    require(e.model in MODELS + ("",), "export.model", f"{e.model!r} not in {MODELS} (or empty: sft where it exists)")
    require(e.format in FORMATS, "export.format", f"{e.format!r} not in {FORMATS}")
    require(e.dtype in DTYPES, "export.dtype", f"{e.dtype!r} not in {DTYPES}")
    require_checkpoint_step(e.step, "export.step")
    require(int(e.max_shard_mb) >= 1, "export.max_shard_mb", f"must be >= 1, got {e.max_shard_mb}")


STAGE = Stage(name="export", command="export", run=run, validate=validate, needs=("lm",),
              config_fields=("export", "sft.steps"), skipped_because=_skipped_because,
              summary="write the trained model for use outside cm3jax (DIR/export/<model>-<step>-<format>-<dtype>; "
                      "hf: transformers' OPT, its tokenizer and safetensors)")
