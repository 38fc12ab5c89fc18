"""`cm3jax <command> --config=configs/X.py[:arg] --workdir=DIR [--config.section.key=value ...]`.

The only module that wires stages together. Commands available now: `data` (build the embedded datasets or check the
configured raw source), `vqgan` (the image tokenizer), `tokenize` (token shards), `retrieve` (retriever, index and
neighbours), `train` (the CM3leon LM) and `pipeline` (every available stage in order, skipping those already
complete).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/demo.py or configs/tiny.py:arg.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: every stage writes under it.")

USAGE = """usage: cm3jax <command> --config=configs/X.py[:arg] --workdir=DIR [--config.section.key=value ...]

commands:
  data       build the embedded dataset (DIR/data) or check the configured raw source; print a summary
  vqgan      train the VQ-GAN image tokenizer on the raw images (DIR/vqgan; resumes)
  tokenize   text tokenizer (trained when absent) + VQ-GAN codes -> token shards in DIR/tokens (resumable)
  retrieve   train the dual-encoder retriever, index the train documents, write every document's neighbours
             (DIR/retrieval; resumable)
  train      train the CM3leon language model (DIR/lm; resumes from its latest checkpoint)
  pipeline   run every stage in order, skipping those already complete
"""

EXIT_CONFIG_ERROR, EXIT_DIVERGED = 2, 3


def prepare_data(config, workdir: str) -> None:
    import json

    from cm3jax import stages
    from cm3jax.data.prepare import prepare_raw_data

    stage_dir = stages.prepare_stage(workdir, "data", config)
    summary = prepare_raw_data(config.raw_data, stage_dir)
    stages.mark_complete(stage_dir, {"dataset": config.raw_data.dataset, "splits": summary})
    print(f"data: {config.raw_data.dataset} in {stage_dir}: {json.dumps(summary)}", flush=True)


def train_vqgan(config, workdir: str) -> None:
    from cm3jax import stages
    from cm3jax.parallel.mesh import initialize_distributed
    from cm3jax.train.vqgan import train_vqgan as train

    initialize_distributed(config.distributed)
    stage_dir = stages.prepare_stage(workdir, "vqgan", config)
    result = train(config, stage_dir, raw_data_dir=os.path.join(workdir, "data"))
    if not result.preempted:
        stages.mark_complete(stage_dir, {"step": result.step, **result.last_metrics})
        print(f"vqgan: trained to step {result.step}; checkpoints in {stage_dir}/checkpoints, reconstructions in "
              f"{stage_dir}/samples", flush=True)


def tokenize(config, workdir: str) -> None:
    import json

    from cm3jax import stages
    from cm3jax.parallel.mesh import initialize_distributed
    from cm3jax.tokenizers.tokenize import tokenize_dataset

    initialize_distributed(config.distributed)
    stage_dir = stages.prepare_stage(workdir, "tokens", config)
    manifest = tokenize_dataset(config, workdir)
    stages.mark_complete(stage_dir, manifest)
    print(f"tokens: {json.dumps(manifest['splits'])} in {stage_dir}", flush=True)


def retrieve(config, workdir: str) -> None:
    import json

    from cm3jax import stages
    from cm3jax.parallel.mesh import initialize_distributed
    from cm3jax.retrieval.stage import run_retrieval_stage

    initialize_distributed(config.distributed)
    stage_dir = stages.prepare_stage(workdir, "retrieval", config)
    summary = run_retrieval_stage(config, workdir)
    if not summary.get("preempted"):
        stages.mark_complete(stage_dir, summary)
        print(f"retrieval: {json.dumps(summary)}; neighbours in {stage_dir}", flush=True)


def train_lm(config, workdir: str) -> None:
    from cm3jax import stages
    from cm3jax.parallel.mesh import initialize_distributed
    from cm3jax.train.lm import train_language_model

    initialize_distributed(config.distributed)
    if not config.data.token_dir:
        config.data.token_dir = os.path.join(workdir, "tokens")
    if not config.data.neighbours_dir:
        config.data.neighbours_dir = os.path.join(workdir, "retrieval")
    stage_dir = stages.prepare_stage(workdir, "lm", config)
    result = train_language_model(config, stage_dir)
    if not result.preempted:
        stages.mark_complete(stage_dir, {"step": result.step, **result.last_metrics})
        print(f"lm: trained to step {result.step}; checkpoints in {stage_dir}/checkpoints, "
              f"logs in {stage_dir}/logs", flush=True)


STAGES = (("data", prepare_data), ("vqgan", train_vqgan), ("tokens", tokenize), ("retrieval", retrieve),
          ("lm", train_lm))


def run_pipeline(config, workdir: str) -> None:
    from cm3jax import stages

    for name, stage in STAGES:
        if name == "retrieval" and config.data.retrieval == "none":
            print("retrieval: skipped (data.retrieval='none')", flush=True)
            continue
        if stages.is_complete(os.path.join(workdir, name)):
            print(f"{name}: complete, skipped", flush=True)
            continue
        stage(config, workdir)


COMMANDS = {"data": prepare_data, "vqgan": train_vqgan, "tokenize": tokenize, "retrieve": retrieve,
            "train": train_lm, "pipeline": run_pipeline}


def main(argv: list[str]) -> None:
    from cm3jax.config_validation import ConfigError
    from cm3jax.train.loop import TrainingDivergedError

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # library INFO logs (checkpoint I/O) only with -v 0 or higher

    if len(argv) != 2 or argv[1] not in COMMANDS:
        sys.stderr.write(USAGE)
        sys.exit(EXIT_CONFIG_ERROR)
    if _CONFIG.value is None or not _WORKDIR.value:
        sys.stderr.write("cm3jax: --config and --workdir are required\n" + USAGE)
        sys.exit(EXIT_CONFIG_ERROR)
    try:
        COMMANDS[argv[1]](_CONFIG.value, _WORKDIR.value)
    except ConfigError as e:
        sys.stderr.write(f"cm3jax: invalid config: {e}\n")
        sys.exit(EXIT_CONFIG_ERROR)
    except TrainingDivergedError as e:
        sys.stderr.write(f"cm3jax: training diverged: {e}\n")
        sys.exit(EXIT_DIVERGED)


def run() -> None:
    app.run(main)
