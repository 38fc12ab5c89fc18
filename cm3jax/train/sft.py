"""Instruction tuning (SFT, docs/paper.md §6): the LM trained on by CM3leon's task templates (cm3jax/data/sft.py),
starting from a pretrained checkpoint's parameters.

SFT is LM training with three differences: the examples (a task mixture from the same token shards, no retrieved
documents), the start (the pretrained parameters with a fresh optimizer, schedule, data order and step 0), and the
schedule (sft.steps, sft.peak_lr, sft.warmup_steps in place of train.steps and optim.*). A run resumes its own
checkpoints as `train` does; the pretrained checkpoint it started from (its step and its stage's inputs) is recorded
in inputs.json, and a resume from another one is refused.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from cm3jax import vocab as vocab_lib
from cm3jax.errors import MissingInputError
from cm3jax.train.init_from import StartingPoint, starting_point
from cm3jax.train.lm import FineTuning, train_language_model
from cm3jax.train.loop import TrainResult
from cm3jax.workdir import Workdir


def sft_training_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config SFT trains with: train.steps, optim's peak_lr and warmup and the image-first share from sft.*, no
    retrieved documents."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.train.steps = int(config.sft.steps)
    c.optim.update(peak_lr=float(config.sft.peak_lr), warmup_steps=int(config.sft.warmup_steps))
    c.data.image_first_probability = float(config.sft.image_first_probability)
    c.data.retrieval = "none"
    return c


def init_source(config: ml_collections.ConfigDict, workdir: Workdir) -> StartingPoint:
    """What SFT starts from, checked: sft.init_from (a stage folder, a params or an hf export) at sft.init_step,
    or the run's LM."""
    return starting_point(config, str(config.sft.init_from) or str(workdir.lm), int(config.sft.init_step),
                          "sft.init_from", "sft.init_step", "SFT starts from",
                          "train the LM first (cm3jax train), or point sft.init_from at a stage folder with "
                          "checkpoints or at an export")


def fine_tuning(config: ml_collections.ConfigDict, workdir: Workdir) -> FineTuning:
    """The SFT examples of the run's token shards and the pretrained parameters to start from."""
    from cm3jax.data.embedded.digits import NAMES as DIGIT_NAMES
    from cm3jax.data.sft import TASKS, RecordToTaskExample, SFTOptions

    source = init_source(config, workdir)
    vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
    if not workdir.text_tokenizer.exists():
        raise MissingInputError(f"{workdir.text_tokenizer} not found: SFT writes its instructions with the run's text "
                                f"tokenizer (cm3jax tokenize)")
    text_model = workdir.text_tokenizer.read_bytes()
    sft_options = SFTOptions.from_config(config.sft)
    label_names = DIGIT_NAMES if str(config.raw_data.dataset) == "digits" else None

    return FineTuning(
        # Held-out examples keep their whole condition (no condition dropout), so each task's held-out loss is
        # the loss of the task as asked.
        to_example=lambda options, held_out=False: RecordToTaskExample(
            vocab, options, dataclasses.replace(sft_options, condition_dropout=0.0) if held_out else sft_options,
            text_model, int(config.vqgan.image_size), label_names),
        task_names=TASKS, initial_params=source.restore,
        # Where the LM lives may change (a copied or moved workdir); what it was trained on and its step do not.
        inputs={"pretrained_step": source.step, "pretrained_inputs": source.identity})


def train_sft(config: ml_collections.ConfigDict, workdir: Workdir, on_start=None, task_eval=None) -> TrainResult:
    """Instruction-tunes the pretrained LM into DIR/sft (resuming its own latest checkpoint); `task_eval` as
    `train_language_model` takes it."""
    training = sft_training_config(workdir.resolve(config))
    return train_language_model(training, str(workdir.sft), on_start=on_start, task_eval=task_eval,
                                fine_tuning=fine_tuning(training, workdir))
