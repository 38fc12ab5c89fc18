"""What a user sees for mistakes: one line on stderr and exit code 2 (never a traceback) for bad flags, config
overrides, config files, workdirs, vocabularies, model shapes and damaged checkpoints; a refused run writes nothing;
train.restore_step resumes from an older checkpoint; a resumed run's metrics log has each step once."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cm3jax import vocab as vocab_lib
from cm3jax.data.documents import encode_document_record, image_segment, text_segment
from cm3jax.data.shards import write_token_shards
from cm3jax.stages import STAGES

pytestmark = [pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cm3jax(*args, workdir=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    paths = ["--config=configs/tiny.py", f"--workdir={workdir}"] if workdir is not None else []
    command = [sys.executable, "-m", "cm3jax", *args[:1], *paths, *args[1:]]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cm3jax: "), result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("flags,fragments", [
    (["--config.train.nosuchfield=1"], ["no config field config.train.nosuchfield"]),
    (["--config.nosection.x=1"], ["no config field config.nosection.x"]),
    (["--config.train.steps=abc"], ["--config.train.steps=abc"]),
    (["--config.model.num_heads=5"], ["invalid config: config.model.num_heads"]),
])
def test_bad_overrides_are_one_line(tmp_path, flags, fragments):
    assert_one_line_error(cm3jax("train", *flags, workdir=tmp_path / "run"), *fragments)
    assert not (tmp_path / "run" / "lm").exists()


@pytest.mark.parametrize("flag,field", [("--config.eval.num_examples=0", "config.eval.num_examples"),
                                        ("--config.eval.tasks=('loss', 'fid')", "config.eval.tasks"),
                                        ("--config.eval.guidance=('edit',)", "config.eval.guidance")])
def test_bad_eval_settings_are_one_line(tmp_path, flag, field):
    assert_one_line_error(cm3jax("eval", flag, workdir=tmp_path / "run"), field)
    assert not (tmp_path / "run" / "eval").exists()


@pytest.mark.parametrize("flags,fragments", [
    (["--config.export.format=onnx"], ["config.export.format"]),
    (["--config.model.activation=swiglu"], ["model.activation='swiglu'", "export.format=params"]),
    (["--config.model.image_grid_embedding=True"], ["model.image_grid_embedding=True", "export.format=params"]),
    (["--config.vqgan.encoder=patch"], ["vqgan.encoder='patch'", "export.format=params"]),
    (["--config.vqgan.decoder=patch"], ["vqgan.decoder='patch'", "export.format=params"]),
    ([], ["no checkpoint under", "cm3jax train"]),
])
def test_an_export_that_cannot_be_written_is_one_line(tmp_path, flags, fragments):
    assert_one_line_error(cm3jax("export", *flags, workdir=tmp_path / "run"), *fragments)
    assert not (tmp_path / "run" / "export").exists()


def test_bad_config_files_and_workdirs_are_one_line(tmp_path):
    result = cm3jax("train", "--config=configs/no_such_recipe.py", f"--workdir={tmp_path}")
    assert_one_line_error(result, "configs/no_such_recipe.py not found")
    result = cm3jax("train", "--config=configs/cm3leon.py:35m", f"--workdir={tmp_path}")
    assert_one_line_error(result, "invalid config: configs/cm3leon.py needs a size")
    (tmp_path / "a_file").write_text("x")
    assert_one_line_error(cm3jax("train", workdir=tmp_path / "a_file"), "is a file")
    assert_one_line_error(cm3jax("train", workdir=tmp_path / "a_file" / "run"), "cannot be created")
    verbose = cm3jax("train", "--verbosity=1", workdir=tmp_path / "a_file")
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr  # developers keep the traceback


def test_usage_lists_every_command_and_generate_task():
    for args in ([], ["--help"]):
        result = cm3jax(*args)
        text = result.stdout + result.stderr
        assert result.returncode == (0 if args else 2)
        for command in [f"  {stage.command} " for stage in STAGES] + [
                "  pipeline ", "generate image", "generate caption", "generate vqa", "generate infill", "restore_step"]:
            assert command in text, (command, text)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LM run to step 6, checkpoints at 3 and 6."""
    workdir = tmp_path_factory.mktemp("trained")
    result = cm3jax("train", workdir=workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir


def _copy(source, to):
    subprocess.run(["cp", "-r", str(source), str(to)], check=True)
    return to


def test_resuming_with_another_model_shape_is_refused_and_changes_nothing(trained, tmp_path):
    run = _copy(trained, tmp_path / "run")
    before = {p: (run / "lm" / p).read_bytes() for p in ("config.json", "vocab.json")}
    line = assert_one_line_error(cm3jax("train", "--config.model.num_layers=3", "--config.train.steps=9",
                                        workdir=run), "config.model.num_layers=3", "checkpoints/6")
    assert "2 in the checkpoint" in line
    assert_one_line_error(cm3jax("train", "--config.vocab.num_masks=6", workdir=run), "vocab.num_masks=6")
    assert {p: (run / "lm" / p).read_bytes() for p in before} == before
    assert sorted(os.listdir(run / "lm" / "checkpoints")) == ["3", "6"]


@pytest.mark.parametrize("damage", ["truncated_array", "empty_metadata", "empty_data_metadata", "empty_manifest"])
def test_a_damaged_checkpoint_is_named_and_an_older_one_resumes(trained, tmp_path, damage):
    run = _copy(trained, tmp_path / "run")
    step_dir = run / "lm" / "checkpoints" / "6"
    if damage == "truncated_array":
        arrays = sorted((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: -p.stat().st_size)
        with open(arrays[0], "r+b") as f:
            f.truncate(50)
    else:
        name = {"empty_metadata": "state/_METADATA", "empty_data_metadata": "data/metadata",
                "empty_manifest": "state/manifest.ocdbt"}[damage]
        (step_dir / name).write_bytes(b"")
    result = cm3jax("train", "--config.train.steps=8", workdir=run)
    # One line only, also for a truncated array, where orbax's other in-flight reads fail after the first.
    assert_one_line_error(result, f"{step_dir} is damaged", "--config.train.restore_step=3")
    if damage != "truncated_array":
        return  # one resume from the older checkpoint is enough
    resumed = cm3jax("train", "--config.train.steps=8", "--config.train.restore_step=3", workdir=run)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from step 3" in resumed.stdout
    assert sorted(os.listdir(run / "lm" / "checkpoints")) == ["3", "6", "8"]
    (aside,) = os.listdir(run / "lm" / "checkpoints_set_aside")
    assert aside.startswith("6-")  # the damaged checkpoint is kept, out of the way
    rows = [json.loads(line) for line in open(run / "lm" / "logs" / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 9))
    assert_one_line_error(cm3jax("train", "--config.train.restore_step=5", workdir=run), "no checkpoint at step 5")


def test_a_resumed_runs_log_reads_like_an_unbroken_run(trained, tmp_path):
    """As after a kill -9 between logging step 6 and saving it: steps 4-6 are trained and logged again."""
    run = _copy(trained, tmp_path / "run")
    subprocess.run(["rm", "-r", str(run / "lm" / "checkpoints" / "6")], check=True)
    result = cm3jax("train", workdir=run)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in open(run / "lm" / "logs" / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert "step 6/6" in result.stdout and "left)" in result.stdout  # step/total and the time left


def _token_shards(folder, vocab):
    rng = np.random.default_rng(0)
    vocab.save(str(folder))
    for split, count in (("train", 64), ("validation", 16)):
        records = [encode_document_record([text_segment(vocab.text_ids(rng.integers(0, 40, 6))),
                                           image_segment(vocab.image_ids(rng.integers(0, 64, 8)))], {})
                   for _ in range(count)]
        write_token_shards(records, str(folder), split, 1)


def test_a_run_refused_for_its_vocabulary_leaves_nothing_that_refuses_the_corrected_run(tmp_path):
    from configs import tiny

    _token_shards(tmp_path / "tokens", vocab_lib.UnifiedVocab.from_config(tiny.get_config().vocab))
    source = ["--config.data.source=token_shards", "--config.train.steps=2"]
    wrong = cm3jax("train", *source, "--config.vocab.num_masks=6", workdir=tmp_path)
    assert_one_line_error(wrong, "vocab.num_masks=6", str(tmp_path / "tokens"))
    assert not (tmp_path / "lm").exists() or not os.listdir(tmp_path / "lm")
    corrected = cm3jax("train", *source, workdir=tmp_path)
    assert corrected.returncode == 0, corrected.stdout[-3000:] + corrected.stderr[-3000:]


@pytest.mark.parametrize("command,fragment", [
    (["vqgan"], "run `cm3jax data` first"),
    (["tokenize"], "run `cm3jax data` first"),
    (["retrieve"], "cm3jax tokenize"),
    (["train", "--config.data.source=token_shards"], "cm3jax tokenize"),
    (["generate", "image", "--prompt=a seven"], "run `cm3jax train`"),
    (["eval"], "run `cm3jax train`"),
])
def test_a_stage_whose_inputs_are_missing_says_which_command_makes_them(tmp_path, command, fragment):
    workdir = tmp_path / "run"
    assert_one_line_error(cm3jax(*command, workdir=workdir), fragment)
    assert not (workdir / "tokens" / "vocab.json").exists()  # nothing a corrected run would be refused for
