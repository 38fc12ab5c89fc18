"""`cm3jax <command> --config=configs/X.py[:arg] --workdir=DIR [--config.section.key=value ...]`.

The only module that wires stages together; USAGE lists the commands.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cm3jax.config_validation import ConfigError
from cm3jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/demo.py or configs/tiny.py:arg.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: every stage writes under it.")
_PROMPT = flags.DEFINE_string("prompt", None, "generate image: the caption to draw.")
_IMAGE = flags.DEFINE_string("image", None, "generate caption / vqa / infill: path of the input image.")
_QUESTION = flags.DEFINE_string("question", None, "generate vqa: the question.")
_BOX = flags.DEFINE_string("box", None, "generate infill: x0,y0,x1,y1 pixels of the region to regenerate.")
_NUM = flags.DEFINE_integer("num", None, "generate image / infill: samples (default generate.num).")
_CFG = flags.DEFINE_float("cfg", None, "generate image: classifier-free guidance scale (sets generate.guidance=cfg).")
_CDK = flags.DEFINE_bool("cdk", False, "generate image: contrastive decoding TopK instead of CFG.")
_RETRIEVE = flags.DEFINE_integer("retrieve", None, "generate image: retrieved documents put before the prompt.")
_CANDIDATES = flags.DEFINE_integer("candidates", None, "generate image: draw this many, keep --num by the "
                                                       "retriever's score.")
_SEED = flags.DEFINE_integer("seed", None, "generate: sampling seed (default generate.seed).")

USAGE = """usage: cm3jax <command> --config=configs/X.py[:arg] --workdir=DIR [--config.section.key=value ...]

commands:
  data       build the embedded dataset (DIR/data) or check the configured raw source; print a summary
  vqgan      train the VQ-GAN image tokenizer on the raw images (DIR/vqgan; resumes)
  tokenize   text tokenizer (trained when absent) + VQ-GAN codes -> token shards in DIR/tokens (resumable)
  retrieve   train the dual-encoder retriever, index the train documents, write every document's neighbours
             (DIR/retrieval; resumable)
  train      train the CM3leon language model (DIR/lm; resumes from its latest checkpoint, or from
             --config.train.restore_step=N)
  pipeline   run every stage in order, skipping complete ones whose config is unchanged; a preempted stage
             ends it (the same command resumes)
  generate   generate from the trained model (DIR/samples/<task>-<time>):
               generate image   --prompt=TEXT [--num=N --cfg=S | --cdk --retrieve=K --candidates=N --seed=S]
               generate caption --image=PATH
               generate vqa     --image=PATH --question=TEXT
               generate infill  --image=PATH --box=x0,y0,x1,y1 [--num=N]

A user error (a config value, a path, a damaged checkpoint) is one line on stderr and exit code 2; add
--verbosity=1 for its traceback. Examples: `cm3jax pipeline --config=configs/demo.py --workdir=workdir/demo`,
`cm3jax generate image --config=configs/demo.py --workdir=workdir/demo --prompt="a handwritten seven"`.
"""

EXIT_CONFIG_ERROR, EXIT_DIVERGED = 2, 3


def prepare_data(config, workdir: str) -> bool:
    import json

    from cm3jax import stages
    from cm3jax.data.prepare import prepare_raw_data

    stage_dir = stages.prepare_stage(workdir, "data", config)
    summary = prepare_raw_data(config.raw_data, stage_dir)
    stages.mark_complete(stage_dir, {"dataset": config.raw_data.dataset, "splits": summary})
    print(f"data: {config.raw_data.dataset} in {stage_dir}: {json.dumps(summary)}", flush=True)
    return True


def train_vqgan(config, workdir: str) -> bool:
    from cm3jax import stages
    from cm3jax.parallel.mesh import initialize_distributed
    from cm3jax.train.vqgan import train_vqgan as train

    initialize_distributed(config.distributed)
    stage_dir = os.path.join(workdir, "vqgan")
    result = train(config, stage_dir, raw_data_dir=os.path.join(workdir, "data"),
                   on_start=lambda: stages.prepare_stage(workdir, "vqgan", config))
    if not result.preempted:
        stages.mark_complete(stage_dir, {"step": result.step, **result.last_metrics})
        print(f"vqgan: trained to step {result.step}; checkpoints in {stage_dir}/checkpoints, reconstructions in "
              f"{stage_dir}/samples", flush=True)
    return not result.preempted


def tokenize(config, workdir: str) -> bool:
    import json

    from cm3jax import stages
    from cm3jax.parallel.mesh import initialize_distributed
    from cm3jax.tokenizers.tokenize import tokenize_dataset

    initialize_distributed(config.distributed)
    stage_dir = stages.prepare_stage(workdir, "tokens", config)
    manifest = tokenize_dataset(config, workdir)
    stages.mark_complete(stage_dir, manifest)
    print(f"tokens: {json.dumps(manifest['splits'])} in {stage_dir}", flush=True)
    return True


def retrieve(config, workdir: str) -> bool:
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
    return not summary.get("preempted")


def fill_run_paths(config, workdir: str) -> None:
    """The LM's inputs default to this workdir's token shards and neighbour files."""
    if not config.data.token_dir:
        config.data.token_dir = os.path.join(workdir, "tokens")
    if not config.data.neighbours_dir:
        config.data.neighbours_dir = os.path.join(workdir, "retrieval")


def train_lm(config, workdir: str) -> bool:
    from cm3jax import stages
    from cm3jax.parallel.mesh import initialize_distributed
    from cm3jax.train.lm import train_language_model

    initialize_distributed(config.distributed)
    fill_run_paths(config, workdir)
    stage_dir = os.path.join(workdir, "lm")
    result = train_language_model(config, stage_dir, on_start=lambda: stages.prepare_stage(workdir, "lm", config))
    if not result.preempted:
        stages.mark_complete(stage_dir, {"step": result.step, **result.last_metrics})
        print(f"lm: trained to step {result.step}; checkpoints in {stage_dir}/checkpoints, "
              f"logs in {stage_dir}/logs", flush=True)
    return not result.preempted


class GenerateInputError(UserError, ValueError):
    """A generate request that cannot run: reported in one line."""


def _generate_settings(config, task: str) -> dict:
    """The request from the flags (falling back to config.generate), checked before any model is loaded."""
    g = config.generate
    if _NUM.value is not None:
        g.num = _NUM.value
    if _SEED.value is not None:
        g.seed = _SEED.value
    if _RETRIEVE.value is not None:
        g.retrieve = _RETRIEVE.value
    if _CANDIDATES.value is not None:
        g.rerank_candidates = _CANDIDATES.value
    if _CDK.value:
        g.guidance = "cdk"
    elif _CFG.value is not None:
        g.guidance, g.cfg_scale = "cfg", _CFG.value
    settings = {"task": task}
    if task == "image":
        if not (_PROMPT.value or "").strip():
            raise GenerateInputError("generate image needs a non-empty --prompt")
        settings["prompt"] = _PROMPT.value
    else:
        if not _IMAGE.value or not os.path.isfile(_IMAGE.value):
            raise GenerateInputError(f"generate {task} needs --image PATH of an existing image file, got "
                                     f"{_IMAGE.value!r}")
        settings["image"] = os.path.abspath(_IMAGE.value)
    if task == "vqa":
        if not (_QUESTION.value or "").strip():
            raise GenerateInputError("generate vqa needs a non-empty --question")
        settings["question"] = _QUESTION.value
    if task == "infill":
        try:
            box = tuple(int(v) for v in (_BOX.value or "").split(","))
        except ValueError:
            box = ()
        if len(box) != 4:
            raise GenerateInputError(f"generate infill needs --box x0,y0,x1,y1 (pixels), got {_BOX.value!r}")
        settings["box"] = box
    return settings


def generate(config, workdir: str, task: str) -> None:
    import json
    import time

    import PIL.Image

    from cm3jax import stages
    from cm3jax.config_validation import validate_generate_config
    from cm3jax.inference.decode import SamplingOptions
    from cm3jax.inference.generate import Generator, contact_sheet

    settings = _generate_settings(config, task)
    validate_generate_config(config)
    g = config.generate
    options = SamplingOptions.from_config(g)
    generator = Generator.load(config, workdir)
    out_dir = os.path.join(workdir, "samples", f"{task}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out_dir, exist_ok=True)
    if task == "caption":
        settings["caption"] = generator.caption(settings["image"], seed=g.seed)
    elif task == "vqa":
        settings["answer"] = generator.answer(settings["image"], settings["question"], seed=g.seed)
    else:
        if task == "image":
            images, _ = generator.images(settings["prompt"], int(g.num), options, int(g.seed), int(g.retrieve),
                                         int(g.rerank_candidates))
        else:
            images = generator.infill(settings["image"], settings["box"], options, num=int(g.num), seed=int(g.seed))
        for i, image in enumerate(images):
            PIL.Image.fromarray(image).save(os.path.join(out_dir, f"{i:03d}.png"))
        PIL.Image.fromarray(contact_sheet(images, columns=min(len(images), 8))).save(
            os.path.join(out_dir, "sheet.png"))
        settings["images"] = len(images)
    settings.update(lm_step=generator.step, generate=g.to_dict())
    stages.atomic_write_text(os.path.join(out_dir, "settings.json"), json.dumps(settings, indent=2, default=str))
    for key in ("caption", "answer"):
        if key in settings:
            print(f"{key}: {settings[key]}", flush=True)
    print(f"generate {task}: written to {out_dir}", flush=True)


def generate_samples(config, workdir: str) -> bool:
    """The pipeline's last stage: images for generate.sample_prompts and captions of held-out images."""
    import json

    from cm3jax import stages
    from cm3jax.inference.samples import write_samples

    stage_dir = stages.prepare_stage(workdir, "samples", config)
    summary = write_samples(config, workdir, stage_dir)
    stages.mark_complete(stage_dir, summary)
    print(f"samples: {json.dumps(summary)}", flush=True)
    return True


STAGES = (("data", prepare_data), ("vqgan", train_vqgan), ("tokens", tokenize), ("retrieval", retrieve),
          ("lm", train_lm), ("samples", generate_samples))


# What each stage's outputs depend on in the config: a complete stage given other values there is not skipped
# silently. Changes to RESUMABLE fields of a training stage continue it from its last checkpoint.
STAGE_CONFIG_FIELDS = {
    "data": ("raw_data",),
    "vqgan": ("raw_data", "vqgan", "vocab.image_codebook_size"),
    "tokens": ("tokenize", "vocab"),
    "retrieval": ("retrieval", "retriever"),
    "lm": ("vocab", "model", "train", "optim", "data"),
    "samples": ("generate",),
}
RESUMABLE = {"vqgan": ("vqgan.train.steps",), "retrieval": ("retriever.train.steps",), "lm": ("train.steps",)}
RUNTIME_ONLY = ("log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
                "async_checkpointing", "peak_tflops_per_device", "restore_step", "num_workers", "worker_buffer_size",
                "scan_unroll", "remat_policy", "attention", "restore_iterator",
                "token_dir", "neighbours_dir")  # where the inputs are; what they are is checked by their digests


def _complete_stage_changes(config, workdir: str, name: str) -> list[tuple[str, object, object]]:
    """Fields that differ between `config` and the config the complete stage `name` ran with (runtime-only
    settings, which do not change its outputs, and fields newer than the run left out)."""
    import json

    from cm3jax.config import config_differences

    path = os.path.join(workdir, name, "config.json")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    return [d for d in config_differences(config, saved, STAGE_CONFIG_FIELDS[name], only_saved_fields=True)
            if d[0].rsplit(".", 1)[-1] not in RUNTIME_ONLY]


def _continues(name: str, changes: list) -> bool:
    """Only a larger step count of a training stage changed: rerunning it trains on from its last checkpoint."""
    return bool(changes) and all(field in RESUMABLE.get(name, ()) and isinstance(given, int) and
                                 isinstance(saved, int) and given > saved for field, given, saved in changes)


def run_pipeline(config, workdir: str) -> bool:
    """Runs the stages in order; a complete stage is skipped when its config is unchanged, continued when only its
    step count grew, and refused (ConfigError naming the fields) otherwise; once a stage has run, the complete
    stages after it run again, each checking its inputs (a rerun of unchanged work resumes and finds it done). A
    preempted stage ends the pipeline (the same command resumes it), so no later stage runs on its unfinished
    outputs."""
    from cm3jax import stages

    fill_run_paths(config, workdir)
    earlier_stage_ran = False
    for name, stage in STAGES:
        if name == "retrieval" and config.data.retrieval == "none":
            print("retrieval: skipped (data.retrieval='none')", flush=True)
            continue
        if name == "samples" and not config.generate.sample_prompts and not config.generate.sample_captions:
            continue
        if stages.is_complete(os.path.join(workdir, name)):
            changes = _complete_stage_changes(config, workdir, name)
            listed = "; ".join(f"config.{f}={g!r} (it ran with {s!r})" for f, g, s in changes)
            if not changes and not earlier_stage_ran:
                print(f"{name}: complete, skipped", flush=True)
                continue
            if not changes:
                print(f"{name}: complete, run again to check it against the stage before, which ran", flush=True)
            elif not _continues(name, changes):
                raise ConfigError(f"{name} is complete but its config differs from the one it ran with: {listed}. "
                                  f"Run with the values it ran with, or use a new --workdir (or move "
                                  f"{os.path.join(workdir, name)} and the stages after it away) to redo it")
            else:
                print(f"{name}: complete, but {listed}: training on from its last checkpoint", flush=True)
        earlier_stage_ran = True
        if not stage(config, workdir):
            print(f"pipeline: stopped, {name} was preempted (its checkpoint is saved); rerun the same command to "
                  f"resume", flush=True)
            return False
    return True


GENERATE_TASKS = ("image", "caption", "vqa", "infill")
COMMANDS = {"data": prepare_data, "vqgan": train_vqgan, "tokenize": tokenize, "retrieve": retrieve,
            "train": train_lm, "pipeline": run_pipeline}


# Library warnings that ask nothing of a cm3jax user: TFDS suggesting OpenCV for images cm3jax decodes itself, and
# TFDS noting that an embedded dataset is not built yet (the stage then says what to run).
LIBRARY_NOTICES = ("OpenCV is not installed", "Variant folder")


def _drop_library_advice(record) -> bool:
    return not str(record.msg).startswith(LIBRARY_NOTICES)


def _verbose(argv: list[str]) -> bool:
    """--verbosity=N / -v=N with N >= 1 asks for tracebacks of user errors too (read from argv, since a flag that
    fails to parse leaves the flag values unset)."""
    for arg in argv:
        for prefix in ("--verbosity=", "-v="):
            if arg.startswith(prefix):
                try:
                    return int(arg[len(prefix):]) >= 1
                except ValueError:
                    return False
    return False


def _fail(message: str, argv: list[str], error: BaseException | None = None) -> None:
    """One line on stderr and exit code 2; with --verbosity=1 the error is raised again, traceback and all."""
    if error is not None and _verbose(argv):
        raise error
    sys.stderr.write(f"cm3jax: {message}\n")
    sys.exit(EXIT_CONFIG_ERROR)


def _config_file_problem(argv: list[str]) -> str | None:
    for arg in argv:
        if arg.startswith("--config="):
            path = arg[len("--config="):].split(":", 1)[0]
            if not os.path.isfile(path):
                return f"config file {path} not found (e.g. --config=configs/demo.py)"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with cm3jax's usage for --help and one-line errors for bad flags and config overrides."""
    if any(arg in ("-h", "--help", "--helpshort", "-?") for arg in argv[1:]):
        sys.stdout.write(USAGE)
        sys.exit(0)
    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as e:  # an unknown flag, or a value of the wrong type
        _fail(f"{e}", argv, e)
    except (AttributeError, KeyError) as e:  # an override names a field the config does not have
        name = str(e.args[0] if e.args else e).strip("'\"")
        overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.") and name in a]
        _fail(f"no config field {(overrides or [name])[0].removeprefix('--')}: check its spelling against "
              f"cm3jax/config.py", argv, e)
    problem = _config_file_problem(argv)
    if problem:
        _fail(problem, argv)
    return remaining


def main(argv: list[str]) -> None:
    from cm3jax.stages import check_workdir
    from cm3jax.train.loop import TrainingDivergedError

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # library INFO logs (checkpoint I/O) only with -v 0 or higher
        logging.get_absl_logger().addFilter(_drop_library_advice)

    is_generate = len(argv) == 3 and argv[1] == "generate" and argv[2] in GENERATE_TASKS
    if not is_generate and (len(argv) != 2 or argv[1] not in COMMANDS):
        sys.stderr.write(USAGE)
        sys.exit(EXIT_CONFIG_ERROR)
    if _CONFIG.value is None or not _WORKDIR.value:
        sys.stderr.write("cm3jax: --config and --workdir are required\n" + USAGE)
        sys.exit(EXIT_CONFIG_ERROR)
    from cm3jax.host_memory import apply_runtime_config

    verbose = flags.FLAGS.verbosity >= 1
    apply_runtime_config(_CONFIG.value.runtime)
    try:
        check_workdir(_WORKDIR.value)
        if is_generate:
            try:
                generate(_CONFIG.value, _WORKDIR.value, argv[2])
            except (FileNotFoundError, ValueError) as e:  # bad input or a missing stage: one line
                if verbose or isinstance(e, UserError):
                    raise
                sys.stderr.write(f"cm3jax: {e}\n")
                sys.exit(EXIT_CONFIG_ERROR)
        else:
            COMMANDS[argv[1]](_CONFIG.value, _WORKDIR.value)
    except UserError as e:
        if verbose:
            raise
        kind = "invalid config: " if isinstance(e, ConfigError) else ""
        sys.stderr.write(f"cm3jax: {kind}{e}\n")
        sys.exit(EXIT_CONFIG_ERROR)
    except TrainingDivergedError as e:
        sys.stderr.write(f"cm3jax: training diverged: {e}\n")
        sys.exit(EXIT_DIVERGED)


def run() -> None:
    app.run(main, flags_parser=parse_flags)
