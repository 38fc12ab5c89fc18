"""`cm3jax <command> --config=configs/X.py[:arg] --workdir=DIR [--config.section.key=value ...]`.

Parses the flags and dispatches: a stage's command to its `run` (cm3jax/stages/), `pipeline` to every stage in
order, `generate <task>` to one request. User errors end here as one line and exit code 2; any other exception as
one line naming it and the file holding its traceback (DIR/errors/), exit code 1.
"""
from __future__ import annotations

import os
import sys
import textwrap
import warnings

from absl import app, flags, logging
from ml_collections import config_flags

from cm3jax.config_validation import ConfigError
from cm3jax.errors import UserError
from cm3jax.inference.command import GENERATE_TASKS
from cm3jax.stages import STAGES, by_command

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/demo.py or configs/tiny.py:arg.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: every stage writes under it.")
_PROMPT = flags.DEFINE_string("prompt", None, "generate image / structure / grounded: the caption to draw.")
_IMAGE = flags.DEFINE_string("image", None, "generate caption / vqa / infill / edit: path of the input image; "
                                            "structure: of the segmentation map.")
_INSTRUCTION = flags.DEFINE_string("instruction", None, "generate edit: what to change.")
_BOXES = flags.DEFINE_string("boxes", None, "generate grounded: NAME:x0,y0,x1,y1;... pixels of each object's box.")
_MODEL = flags.DEFINE_string("model", None, "generate: lm or sft (default: sft where the run has one).")
_QUESTION = flags.DEFINE_string("question", None, "generate vqa: the question.")
_BOX = flags.DEFINE_string("box", None, "generate infill: x0,y0,x1,y1 pixels of the region to regenerate.")
_NUM = flags.DEFINE_integer("num", None, "generate image / infill: samples (default generate.num).")
_CFG = flags.DEFINE_float("cfg", None, "generate image: classifier-free guidance scale (sets generate.guidance=cfg).")
_CDK = flags.DEFINE_bool("cdk", False, "generate image: contrastive decoding TopK instead of CFG.")
_RETRIEVE = flags.DEFINE_integer("retrieve", None, "generate image: retrieved documents put before the prompt.")
_CANDIDATES = flags.DEFINE_integer("candidates", None, "generate image: draw this many, keep --num by the "
                                                       "retriever's score.")
_SEED = flags.DEFINE_integer("seed", None, "generate: sampling seed (default generate.seed).")


def usage() -> str:
    stage_lines = "".join(textwrap.fill(stage.summary, 116, initial_indent=f"  {stage.command:<10} ",
                                        subsequent_indent=" " * 13) + "\n" for stage in STAGES)
    return f"""usage: cm3jax <command> --config=configs/X.py[:arg] --workdir=DIR [--config.section.key=value ...]

commands:
{stage_lines}  pipeline   run every stage in order ({", ".join(s.name for s in STAGES)}), skipping complete ones whose
             config is unchanged; a preempted stage ends it (the same command resumes)
  generate   generate from the trained model (DIR/samples/<task>-<time>):
               generate image   --prompt=TEXT [--num=N --cfg=S | --cdk --retrieve=K --candidates=N --seed=S]
               generate caption --image=PATH
               generate vqa     --image=PATH --question=TEXT
               generate infill  --image=PATH --box=x0,y0,x1,y1 [--num=N]
               generate edit    --image=PATH --instruction=TEXT [--num=N]
               generate structure --image=SEGMAP --prompt=TEXT [--num=N]
               generate grounded --prompt=TEXT --boxes="red circle:0,0,20,20;blue square:28,28,44,44"
             every task takes --model=lm|sft (default: sft where the run has one)

A user error (a config value, a path, a damaged checkpoint) is one line on stderr and exit code 2; any other failure
is one line naming the exception and the file holding its traceback (DIR/errors/), exit code 1; add --verbosity=1
to see either traceback here. A relative DIR (and every relative path in the config) is taken from the current
directory. Examples: `cm3jax pipeline --config=configs/demo.py --workdir=workdir/demo`,
`cm3jax generate image --config=configs/demo.py --workdir=workdir/demo --prompt="a handwritten seven"`.
"""


EXIT_FAILED, EXIT_CONFIG_ERROR, EXIT_DIVERGED = 1, 2, 3


def _generate_flags() -> dict:
    return {"prompt": _PROMPT.value, "image": _IMAGE.value, "question": _QUESTION.value, "box": _BOX.value,
            "instruction": _INSTRUCTION.value, "boxes": _BOXES.value, "model": _MODEL.value,
            "num": _NUM.value, "cfg": _CFG.value, "cdk": _CDK.value, "retrieve": _RETRIEVE.value,
            "candidates": _CANDIDATES.value, "seed": _SEED.value}


def dispatch(config, workdir, argv: list[str]) -> bool:
    """Runs the command argv[1:] names; False when a stage was preempted."""
    from cm3jax.inference.command import generate_request, run_generate
    from cm3jax.parallel.mesh import initialize_distributed
    from cm3jax.pipeline import run_pipeline

    initialize_distributed(config.distributed)
    config = workdir.resolve(config)
    if argv[1] == "generate":
        run_generate(config, workdir, generate_request(config, argv[2], _generate_flags()))
        return True
    if argv[1] == "pipeline":
        return run_pipeline(config, workdir)
    stage = by_command(argv[1])
    stage.validate(config)
    return stage.run(config, workdir)


# Library warnings that ask nothing of a cm3jax user: TFDS suggesting OpenCV for images cm3jax decodes itself, TFDS
# noting that an embedded dataset is not built yet (the stage then says what to run), and TFDS naming the builder
# config of an embedded dataset at every open.
LIBRARY_NOTICES = ("OpenCV is not installed", "Variant folder", "Using custom data configuration")


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
    # A failed orbax restore leaves its other reads un-awaited; their warning at exit would follow the one line.
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    sys.exit(EXIT_CONFIG_ERROR)


def _config_file_problem(argv: list[str]) -> tuple[str, Exception | None] | None:
    """(why --config cannot give a config, the error behind it) for a missing file, a syntax error or an error
    raised by its get_config, checked before absl loads the recipe (which would report these as tracebacks; the
    recipe runs twice, and is expected to be cheap and side-effect free)."""
    for arg in argv:
        if arg.startswith("--config="):
            path, _, recipe_arg = arg[len("--config="):].partition(":")
            if not os.path.isfile(path):
                return f"config file {path} not found (e.g. --config=configs/demo.py)", None
            return _recipe_problem(path, recipe_arg or None)
    return None


def _recipe_problem(path: str, arg: str | None) -> tuple[str, Exception] | None:
    import importlib.util

    from cm3jax.failure_report import one_line_summary

    name = "cm3jax_recipe_check"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        return f"config file {path} is not a Python file (e.g. --config=configs/demo.py)", ValueError(path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import would: dataclasses and pickling look the module up there
    try:
        spec.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            return f"config file {path} defines no get_config()", AttributeError("get_config")
        module.get_config(*([] if arg is None else [arg]))
    except SyntaxError as e:
        return f"config file {path}, line {e.lineno}: {e.msg}", e
    except ConfigError as e:
        return f"invalid config: {e}", e
    except Exception as e:  # whatever a recipe raises is the recipe's to fix
        return f"config file {path} failed: {one_line_summary(e)}", e
    finally:
        del sys.modules[name]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with cm3jax's usage for --help and one-line errors for bad flags and config overrides."""
    if any(arg in ("-h", "--help", "--helpshort", "-?") for arg in argv[1:]):
        sys.stdout.write(usage())
        sys.exit(0)
    problem = _config_file_problem(argv)
    if problem:
        message, error = problem
        _fail(message, argv, error)
    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as e:  # an unknown flag, or a value of the wrong type
        _fail(f"{e}", argv, e)
    except (AttributeError, KeyError) as e:  # an override names a field the config does not have
        name = str(e.args[0] if e.args else e).strip("'\"")
        overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.") and name in a]
        _fail(f"no config field {(overrides or [name])[0].removeprefix('--')}: check its spelling against "
              f"cm3jax/config.py", argv, e)
    return remaining


def _is_command(argv: list[str]) -> bool:
    if len(argv) == 3 and argv[1] == "generate":
        return argv[2] in GENERATE_TASKS
    return len(argv) == 2 and (argv[1] == "pipeline" or by_command(argv[1]) is not None)


def main(argv: list[str]) -> None:
    from cm3jax.train.loop import TrainingDivergedError
    from cm3jax.workdir import Workdir

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # library INFO logs (checkpoint I/O) only with -v 0 or higher
        logging.get_absl_logger().addFilter(_drop_library_advice)
    if not _is_command(argv):
        sys.stderr.write(usage())
        sys.exit(EXIT_CONFIG_ERROR)
    if _CONFIG.value is None or not _WORKDIR.value:
        sys.stderr.write("cm3jax: --config and --workdir are required\n" + usage())
        sys.exit(EXIT_CONFIG_ERROR)
    from cm3jax.host_memory import apply_runtime_config

    apply_runtime_config(_CONFIG.value.runtime)
    workdir = Workdir(_WORKDIR.value)
    try:
        workdir.check()
        dispatch(_CONFIG.value, workdir, argv)
    except UserError as e:
        if flags.FLAGS.verbosity >= 1:
            raise
        kind = "invalid config: " if isinstance(e, ConfigError) else ""
        sys.stderr.write(f"cm3jax: {kind}{e}\n")
        sys.exit(EXIT_CONFIG_ERROR)
    except TrainingDivergedError as e:
        sys.stderr.write(f"cm3jax: training diverged: {e}\n")
        sys.exit(EXIT_DIVERGED)
    except Exception as e:
        if flags.FLAGS.verbosity >= 1:
            raise
        from cm3jax.failure_report import one_line_summary, write_traceback

        report = write_traceback(e, workdir.errors, argv[1:])
        sys.stderr.write(f"cm3jax: {argv[1]} failed: {one_line_summary(e)} (traceback in {report}; "
                         f"--verbosity=1 prints it here)\n")
        sys.exit(EXIT_FAILED)


def run() -> None:
    app.run(main, flags_parser=parse_flags)
