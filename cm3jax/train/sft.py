"""Instruction tuning (SFT, docs/paper.md §6): the LM trained on by CM3leon's task templates (cm3jax/data/sft.py),
starting from a pretrained checkpoint's parameters.

SFT is LM training with three differences: the examples (a task mixture from the same token shards, no retrieved
documents), the start (the pretrained parameters with a fresh optimizer, schedule, data order and step 0), and the
schedule (sft.steps, sft.peak_lr, sft.warmup_steps in place of train.steps and optim.*). A run resumes its own
checkpoints as `train` does; the pretrained checkpoint it started from (its step and its stage's inputs) is recorded
in inputs.json, and a resume from another one is refused.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from cm3jax import vocab as vocab_lib
from cm3jax.errors import MissingInputError
from cm3jax.train.checkpoint import Checkpointer
from cm3jax.train.lm import FineTuning, lm_checkpoint_step, train_language_model
from cm3jax.train.loop import TrainResult
from cm3jax.workdir import StageDir, Workdir


def sft_training_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config SFT trains with: train.steps and optim's peak_lr and warmup from sft.*, no retrieved documents."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.train.steps = int(config.sft.steps)
    c.optim.update(peak_lr=float(config.sft.peak_lr), warmup_steps=int(config.sft.warmup_steps))
    c.data.retrieval = "none"
    return c


def init_dir(config: ml_collections.ConfigDict, workdir: Workdir) -> StageDir:
    """The stage folder SFT starts from: sft.init_from, or the run's LM."""
    return StageDir.at(str(config.sft.init_from)) if str(config.sft.init_from) else workdir.lm


def pretrained_step(config: ml_collections.ConfigDict, source: StageDir) -> int:
    """The checkpoint step SFT starts from (sft.init_step, or the latest), after checking it exists and that its
    model has this config's vocabulary and shapes."""
    return lm_checkpoint_step(config, source, int(config.sft.init_step), "sft.init_from", "sft.init_step",
                              "SFT starts from", "train the LM first (cm3jax train), or point sft.init_from at a "
                                                 "stage folder with checkpoints")


def fine_tuning(config: ml_collections.ConfigDict, workdir: Workdir) -> FineTuning:
    """The SFT examples of the run's token shards and the pretrained parameters to start from."""
    from cm3jax.data.embedded.digits import NAMES as DIGIT_NAMES
    from cm3jax.data.sft import TASKS, RecordToTaskExample, SFTOptions

    source = init_dir(config, workdir)
    step = pretrained_step(config, source)
    vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
    if not workdir.text_tokenizer.exists():
        raise MissingInputError(f"{workdir.text_tokenizer} not found: SFT writes its instructions with the run's text "
                                f"tokenizer (cm3jax tokenize)")
    text_model = workdir.text_tokenizer.read_bytes()
    sft_options = SFTOptions.from_config(config.sft)
    label_names = DIGIT_NAMES if str(config.raw_data.dataset) == "digits" else None

    def initial_params(abstract_params: Any, shardings: Any) -> Any:
        checkpointer = Checkpointer(source.checkpoints, keep=1)
        try:
            return checkpointer.restore_params(step, abstract_params, shardings)
        finally:
            checkpointer.close()

    return FineTuning(
        to_example=lambda options: RecordToTaskExample(vocab, options, sft_options, text_model,
                                                       int(config.vqgan.image_size), label_names),
        task_names=TASKS, initial_params=initial_params,
        # Where the LM lives may change (a copied or moved workdir); what it was trained on and its step do not.
        inputs={"pretrained_step": step, "pretrained_inputs": source.identity()})


def train_sft(config: ml_collections.ConfigDict, workdir: Workdir, on_start=None, task_eval=None) -> TrainResult:
    """Instruction-tunes the pretrained LM into DIR/sft (resuming its own latest checkpoint); `task_eval` as
    `train_language_model` takes it."""
    training = sft_training_config(workdir.resolve(config))
    return train_language_model(training, str(workdir.sft), on_start=on_start, task_eval=task_eval,
                                fine_tuning=fine_tuning(training, workdir))
