"""The stage registry: the pipeline's stages in the order they run, one module each under cm3jax/stages/.

A stage module declares `STAGE` (cm3jax/stages/stage.py: its folder, its command, what it needs, the config fields
its outputs depend on, when it is skipped) and `run(config, workdir) -> bool`. Adding a stage is a new module and
one entry below; `cm3jax <command>`, `cm3jax pipeline` and the usage text follow from this list.
"""
from __future__ import annotations

from cm3jax.stages import data, export, lm, retrieval, samples, sft, tokens, vqgan
from cm3jax.stages import eval as eval_stage  # (not the builtin)
from cm3jax.stages.stage import Stage

STAGES: tuple[Stage, ...] = (data.STAGE, vqgan.STAGE, tokens.STAGE, retrieval.STAGE, lm.STAGE, sft.STAGE,
                             eval_stage.STAGE, samples.STAGE, export.STAGE)


def by_name(name: str) -> Stage:
    return next(stage for stage in STAGES if stage.name == name)


def by_command(command: str) -> Stage | None:
    return next((stage for stage in STAGES if stage.command == command), None)
