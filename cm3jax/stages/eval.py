"""`cm3jax eval`: score the trained models on held-out documents, every task the data allows
(DIR/eval/<model>-<step>)."""
from __future__ import annotations

import json

import ml_collections

from cm3jax.stages.stage import Stage
from cm3jax.workdir import Workdir

MODELS = ("lm", "sft")


def models_scored(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """eval.model, or when empty every model the pipeline trains: the LM, and the SFT model when sft.steps > 0."""
    if str(config.eval.model):
        return (str(config.eval.model),)
    return ("lm", "sft") if int(config.sft.steps) > 0 else ("lm",)


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> bool:
    from cm3jax.evaluation.evaluate import evaluate

    config = workdir.resolve(config)
    scored = []
    for model in models_scored(config):
        metrics = evaluate(config, workdir, model=model)
        scored.append(f"{metrics['model']}-{metrics['step']}")
        print(f"eval {model}: {json.dumps(metrics, sort_keys=True)}", flush=True)
    workdir.stage("eval").mark_complete(config, {"scored": scored})
    return True


def _skipped_because(config: ml_collections.ConfigDict) -> str | None:
    return None if config.eval.tasks else "no eval.tasks"


def validate(config: ml_collections.ConfigDict) -> None:
    from cm3jax.config_validation import require, require_checkpoint_step, validate_generate_config
    from cm3jax.evaluation.evaluate import TASKS
    from cm3jax.inference.decode import GUIDANCE_STREAMS

    e = config.eval
    require(e.model in MODELS + ("",), "eval.model", f"{e.model!r} not in {MODELS} (or empty: every trained one)")
    unknown = [t for t in e.tasks if t not in TASKS]
    require(not unknown, "eval.tasks", f"{unknown} not in {TASKS}")
    image_guidance = tuple(g for g in GUIDANCE_STREAMS if g != "edit")
    bad = [g for g in e.guidance if g not in image_guidance]
    require(not bad and len(e.guidance) > 0, "eval.guidance",
            f"needs one or more of {image_guidance} (got {tuple(e.guidance)})")
    for field in ("num_examples", "batch_size", "loss_batches"):
        require(int(e[field]) >= 1, f"eval.{field}", f"must be >= 1, got {e[field]}")
    for field in ("num_retrieved", "sheet_images", "rerank_candidates", "every"):
        require(int(e[field]) >= 0, f"eval.{field}", f"must be >= 0, got {e[field]}")
    require_checkpoint_step(e.step, "eval.step")
    if str(e.inception_weights):
        from etils import epath

        from cm3jax.evaluation.inception import HOW_TO_PROVIDE

        require(epath.Path(str(e.inception_weights)).exists(), "eval.inception_weights",
                f"{e.inception_weights!r}: no such file; provide {HOW_TO_PROVIDE}")
    validate_generate_config(config)


STAGE = Stage(name="eval", command="eval", run=run, validate=validate, needs=("lm",),
              skipped_because=_skipped_because,
              summary="score the trained LM and SFT model on held-out documents: loss, text -> image, captions, VQA, "
                      "editing, structure, grounding (DIR/eval/<model>-<step>: metrics.json, predictions.jsonl, "
                      "image sheets)")
