"""The command line as a user runs it: from another directory with a relative --workdir (and relative config paths)
every stage, the pipeline, `generate`, `eval` and `export` work and write only under the workdir; an unexpected
exception ends in one line naming the file that holds its traceback, exit code 1; config files, settings and
generate inputs that cannot run are refused before anything runs."""
import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from cm3jax import cli
from cm3jax.config_validation import ConfigError
from cm3jax.inference.command import GenerateInputError, generate_request
from cm3jax.stages import by_name
from cm3jax.workdir import Workdir
from configs import tiny

from helpers import config_flags, tiny_pipeline_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cm3jax(cwd, *args, code=None):
    """`python -m cm3jax ARGS` (or `python -c CODE ARGS`) run in `cwd`."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [sys.executable, *(["-c", code] if code else ["-m", "cm3jax"]), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _relative_run_config():
    """The tests' tiny pipeline with every stage on: SFT (from a relative sft.init_from), eval, samples, export."""
    config = tiny_pipeline_config()
    config.sft.update(steps=2, init_from="run/lm")
    config.generate.update(num=1, sample_prompts=("a red circle",), sample_captions=1)
    return config


@pytest.mark.parametrize("recipe,file_text,message", [
    ("configs/cm3leon.py:35m", None, "invalid config: configs/cm3leon.py needs a size"),
    ("configs/tiny.py:nonsense", None, "configs/tiny.py takes no argument"),
    ("{tmp}/broken.py", "def get_config(:\n", "broken.py, line 1: "),
    ("{tmp}/empty.py", "x = 1\n", "empty.py defines no get_config()"),
    ("{tmp}/raises.py", "def get_config():\n    return {}['model']\n", "raises.py failed: KeyError: 'model'"),
    ("{tmp}/recipe.yaml", "model: {}\n", "recipe.yaml is not a Python file"),
])
def test_config_files_that_cannot_give_a_config_are_named_in_one_line(tmp_path, recipe, file_text, message):
    spec = recipe.format(tmp=tmp_path)
    if file_text is not None:
        (tmp_path / os.path.basename(spec)).write_text(file_text)
    problem = cli._config_file_problem(["cm3jax", "train", f"--config={os.path.join(REPO, spec)}"])
    assert problem is not None and message in problem[0] and "\n" not in problem[0]
    assert cli._config_file_problem(["cm3jax", "train", f"--config={REPO}/configs/shapes.py:smoke"]) is None
    dataclass_recipe = tmp_path / "with_dataclass.py"  # needs its module registered while it runs, as an import
    dataclass_recipe.write_text("import dataclasses\n\n@dataclasses.dataclass\nclass Size:\n    layers: int = 2\n\n"
                                "def get_config():\n    return {'layers': Size().layers}\n")
    assert cli._config_file_problem(["cm3jax", "train", f"--config={dataclass_recipe}"]) is None


@pytest.mark.parametrize("stage,field,value", [
    ("tokens", "tokenize.shard_size", 0), ("tokens", "tokenize.batch_size", -1),
    ("vqgan", "vqgan.train.global_batch_size", 0), ("vqgan", "vqgan.decoder", "transposed"),
    ("retrieval", "retriever.train.steps", 0),
    ("lm", "train.global_batch_size", 0), ("samples", "generate.cfg_scale", float("nan")),
    ("samples", "generate.cfg_scale", float("inf")), ("samples", "generate.temperature", float("nan")),
])
def test_settings_that_cannot_run_are_refused_by_the_stage_that_reads_them(stage, field, value):
    config = tiny_pipeline_config()
    section, _, name = field.rpartition(".")
    node = config
    for key in section.split("."):
        node = node[key]
    node[name] = value
    with pytest.raises(ConfigError, match=f"config.{field}: "):
        by_name(stage).validate(config)


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "truncated"])
def test_a_segmentation_map_that_is_no_image_is_refused_before_the_model_loads(tmp_path, content):
    path = tmp_path / "map.png"
    if content == "truncated":
        PIL.Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(path)
        content = path.read_bytes()[:-30]
    path.write_bytes(content)
    flags = {"prompt": "a red circle", "image": str(path)}
    with pytest.raises(GenerateInputError, match="cannot be read as an image"):
        generate_request(tiny.get_config(), "structure", flags)


def test_generate_requests_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    monkeypatch.setattr("time.strftime", lambda fmt: "20261206-213000")
    workdir = Workdir(tmp_path)
    folders = [workdir.new_generate_folder("image") for _ in range(3)]
    assert [f.name for f in folders] == ["image-20261206-213000", "image-20261206-213000-2", "image-20261206-213000-3"]
    assert all(f.is_dir() and not list(f.iterdir()) for f in folders)


@pytest.fixture(scope="module")
def relative_run(tmp_path_factory, tiny_pipeline_run):
    """(current directory, config flags) after `cm3jax pipeline --workdir=run` run from a directory that is neither
    the repository nor the parent of any absolute path given. It compiles what the session's tiny pipeline
    (built first) compiled, so those programs come from the session's compilation cache."""
    cwd = tmp_path_factory.mktemp("user_directory")
    flags = [f"--config={REPO}/configs/tiny.py", "--workdir=run",
             *config_flags(_relative_run_config(), tiny.get_config())]
    done = _cm3jax(cwd, "pipeline", *flags)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return cwd, flags


@pytest.mark.slow
def test_the_pipeline_runs_every_stage_in_a_relative_workdir(relative_run):
    cwd, _ = relative_run
    run = cwd / "run"
    assert os.listdir(cwd) == ["run"]  # nothing written beside the workdir
    for stage in ("data", "vqgan", "tokens", "retrieval", "lm", "sft", "eval", "samples", "export"):
        assert (run / stage / "COMPLETE.json").exists(), stage
    assert (run / "export" / "sft-2-hf-float32" / "model.safetensors").exists()
    saved = json.loads((run / "sft" / "config.json").read_text())
    assert saved["sft"]["init_from"] == str(run / "lm")  # config paths are absolute from the start
    assert saved["data"]["token_dir"] == str(run / "tokens")
    assert not (run / "errors").exists()


@pytest.mark.slow
def test_generate_eval_and_export_on_their_own_in_a_relative_workdir(relative_run):
    cwd, flags = relative_run
    done = _cm3jax(cwd, "generate", "image", *flags, "--prompt=a blue square", "--num=1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out_dir = done.stdout.strip().splitlines()[-1].split("written to ")[-1]
    assert os.path.isabs(out_dir) and "000.png" in os.listdir(out_dir)

    metrics = cwd / "run" / "eval" / "lm-4" / "metrics.json"
    metrics.unlink()
    done = _cm3jax(cwd, "eval", *flags, "--config.eval.model=lm")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads(metrics.read_text())["step"] == 4

    done = _cm3jax(cwd, "export", *flags, "--config.export.format=params")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (cwd / "run" / "export" / "sft-2-params-float32" / "export.json").exists()
    assert os.listdir(cwd) == ["run"]


@pytest.mark.slow
def test_an_unexpected_exception_is_one_line_and_a_traceback_file(tmp_path):
    crash = ("import sys\nimport cm3jax.cli as cli\n"
             "def fail(*args):\n    raise RuntimeError('something broke\\nsecond line of the message')\n"
             "cli.dispatch = fail\nsys.argv[0] = 'cm3jax'\ncli.run()\n")
    args = ["data", f"--config={REPO}/configs/tiny.py", "--workdir=run"]
    done = _cm3jax(tmp_path, *args, code=crash)
    assert done.returncode == 1, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[0].startswith("cm3jax: data failed: RuntimeError: something broke (traceback in ")
    report = lines[0].split("traceback in ")[1].split(";")[0]
    assert os.path.dirname(report) == str(tmp_path / "run" / "errors")
    text = open(report).read()
    assert "Traceback" in text and "second line of the message" in text and "--workdir=run" in text

    verbose = _cm3jax(tmp_path, *args, "--verbosity=1", code=crash)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr and "second line" in verbose.stderr
