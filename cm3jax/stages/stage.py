"""What a pipeline stage declares: its folder, its command, what it needs, what in the config it depends on, and
when it runs."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections

from cm3jax.workdir import StageDir, Workdir


def always(config: ml_collections.ConfigDict) -> str | None:
    return None


def never_outdated(config: ml_collections.ConfigDict, workdir: Workdir) -> str | None:
    return None


def nothing_to_check(config: ml_collections.ConfigDict) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # its folder under the workdir
    command: str  # `cm3jax <command>` runs it alone
    summary: str  # one line of the usage text
    run: Callable[[ml_collections.ConfigDict, Workdir], bool]  # False: preempted (its checkpoint is saved)
    needs: tuple[str, ...] = ()  # stages whose outputs it reads
    # What its outputs depend on in the config: a complete stage given other values there is not skipped silently.
    config_fields: tuple[str, ...] = ()
    # Fields of a training stage whose growth continues it from its last checkpoint (e.g. its step count).
    resumable: tuple[str, ...] = ()
    # None when the stage runs with this config, else why it is skipped.
    skipped_because: Callable[[ml_collections.ConfigDict], str | None] = always
    # Raises ConfigError naming the field when the stage's own sections cannot run (before anything runs).
    validate: Callable[[ml_collections.ConfigDict], None] = nothing_to_check
    # None while a complete stage's outputs are what this code would make with this config, else why not (the
    # pipeline then runs it again).
    outdated: Callable[[ml_collections.ConfigDict, Workdir], str | None] = never_outdated


def run_training_stage(config: ml_collections.ConfigDict, workdir: Workdir, model: str, stage_dir: StageDir,
                       train: Callable[..., object]) -> bool:
    """What the LM and SFT stages share: `train(on_start=, task_eval=)` with the evaluator of `model` where
    eval.every scores it while it trains, then the stage marked complete unless preempted (False then)."""
    task_eval = None
    if int(config.eval.every):
        from cm3jax.evaluation.evaluate import evaluator_for_training

        task_eval = evaluator_for_training(workdir.resolve(config), workdir, model=model)
    result = train(on_start=lambda: stage_dir.prepare(config), task_eval=task_eval)
    if not result.preempted:
        stage_dir.mark_complete(config, {"step": result.step, **result.last_metrics})
        print(f"{model}: trained to step {result.step}; checkpoints in {stage_dir.checkpoints}, logs in "
              f"{stage_dir.logs}", flush=True)
    return not result.preempted
