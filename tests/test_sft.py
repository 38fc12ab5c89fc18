"""`cm3jax sft` (train/sft.py) on the tiny shapes run: it starts from the LM's parameters alone at step 0, logs each
task's loss and count, resumes bit-exactly, refuses another model shape, and the SFT model is scored, exported and
generates every instruction task."""
import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cm3jax import stages
from cm3jax import vocab as vocab_lib
from cm3jax.config_validation import ConfigError
from cm3jax.data.sft import TASKS
from cm3jax.inference.command import GenerateInputError, generate_request, run_generate
from cm3jax.models.transformer import CM3LeonDecoder, DecoderConfig
from cm3jax.parallel.mesh import create_mesh
from cm3jax.parallel.sharding import logical_axis_rules
from cm3jax.train.lm import lm_state_init
from cm3jax.train.loop import abstract_state_and_shardings, restore_latest_state
from cm3jax.workdir import Workdir

from helpers import REPO, copy_run, read_metrics_rows, tiny_pipeline_config

pytestmark = pytest.mark.slow


def sft_config(steps=4):
    c = tiny_pipeline_config()
    c.sft.update(steps=steps, warmup_steps=1)
    c.train.update(checkpoint_every=2, eval_every=2)
    return c


@pytest.fixture(scope="module")
def sft_run(tiny_pipeline_run, tmp_path_factory):
    workdir = Workdir(copy_run(tiny_pipeline_run, tmp_path_factory.mktemp("sft") / "run"))
    assert stages.by_command("sft").run(sft_config(), workdir)
    return workdir


def _state(config, stage_dir, step=None):
    mesh = create_mesh(config, jax.devices()[:1])
    state, _ = restore_latest_state(lm_state_init(config)[0], config, mesh, str(stage_dir), "test", step)
    return jax.device_get(state)


def test_sft_starts_from_the_lms_parameters_alone_at_step_0(sft_run):
    from cm3jax.train.sft import fine_tuning, sft_training_config

    config = sft_training_config(sft_run.resolve(sft_config()))
    lm = _state(config, sft_run.lm)
    mesh = create_mesh(config, jax.devices()[:1])
    abstract, shardings = abstract_state_and_shardings(lm_state_init(config)[0], mesh, logical_axis_rules(config))
    start = jax.device_get(fine_tuning(config, sft_run).initial_params(abstract.params, shardings.params))
    jax.tree.map(np.testing.assert_array_equal, start, lm.params)
    sft = _state(config, sft_run.sft, 2)
    assert int(sft.step) == 2  # its own steps, not the LM's 4 + 2
    counts = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(sft.opt_state)
              if "count" in jax.tree_util.keystr(path)]
    assert counts and all(int(c) == 2 for c in counts)  # a fresh optimizer
    rows = read_metrics_rows(sft_run.sft)
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["learning_rate"] <= config.sft.peak_lr * (1 + 1e-6) for r in train)  # SFT's schedule, not the LM's
    assert sum(train[-1][f"data_task_{task}"] for task in TASKS) >= 4 * config.train.global_batch_size
    held_out = [r for r in rows if r["split"] == "eval"]
    assert {f"{task}_loss" for task in TASKS} <= set(held_out[-1])
    inputs = json.loads((sft_run.sft / "inputs.json").read_text())
    assert inputs["pretrained_step"] == 4 and inputs["pretrained_inputs"] == sft_run.lm.identity()


def test_sft_resumes_bit_exactly(sft_run, tmp_path):
    workdir = Workdir(copy_run(str(sft_run), tmp_path / "run"))
    for name in ("checkpoints", "logs"):
        import shutil

        shutil.rmtree(workdir.sft / name)
    (workdir.sft / "COMPLETE.json").unlink()
    stage = stages.by_command("sft")
    assert stage.run(sft_config(steps=2), workdir)
    assert stage.run(sft_config(steps=4), workdir)  # resumes from its step 2
    config = sft_config()
    jax.tree.map(np.testing.assert_array_equal, _state(config, workdir.sft, 4).params,
                 _state(config, sft_run.sft, 4).params)


def test_sft_refuses_a_pretrained_model_of_another_shape(sft_run, tmp_path):
    workdir = Workdir(copy_run(str(sft_run), tmp_path / "run"))
    config = sft_config(steps=6)
    config.model.d_model = 64
    with pytest.raises(ConfigError, match=r"sft.init_from.*config.model.d_model=64 but 32 in the checkpoint"):
        stages.by_command("sft").run(config, workdir)


def test_an_sft_checkpoint_exports_and_transformers_computes_its_logits(sft_run, tmp_path):
    import torch
    import transformers

    from cm3jax.train.sft import sft_training_config

    workdir = Workdir(copy_run(str(sft_run), tmp_path / "run"))
    assert stages.by_command("export").run(sft_config(), workdir)  # export.model empty: the SFT model
    folder = workdir.export_folder("sft", 4, "hf", "float32")
    config = sft_training_config(workdir.resolve(sft_config()))
    params = _state(config, workdir.sft).params
    vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
    tokens = np.random.RandomState(0).randint(0, vocab.size, (1, 10))
    model = CM3LeonDecoder(DecoderConfig.for_run(config, vocab, "cpu"))
    expected = np.asarray(model.apply({"params": params}, tokens))
    with torch.no_grad():
        logits = transformers.OPTForCausalLM.from_pretrained(folder)(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_the_sft_model_is_scored_on_every_instruction_task(sft_run):
    from cm3jax.evaluation.evaluate import evaluate

    config = sft_run.resolve(sft_config())
    config.eval.tasks = ("caption", "vqa", "edit", "structure", "grounded")
    metrics = evaluate(config, sft_run, model="sft")
    assert metrics["model"] == "sft" and metrics["step"] == 4
    assert metrics["grounded"]["examples"] == 4 and {"objects", "all"} <= set(metrics["grounded"])
    assert metrics["edit"]["examples"] >= 1 and metrics["structure"]["examples"] >= 1
    folder = sft_run.stage("eval") / "sft-4"
    predictions = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert sum(p["task"] == "grounded" for p in predictions) == 4
    assert (folder / "grounded.png").exists()


def test_eval_every_scores_the_sft_model_while_it_trains_as_the_eval_stage_does(sft_run, tmp_path):
    workdir = Workdir(copy_run(str(sft_run), tmp_path / "run"))
    config = sft_config(steps=6)  # tunes on from step 4
    config.eval.update(every=2, tasks=("caption", "vqa", "grounded"))
    assert stages.by_command("sft").run(config, workdir)
    rows = [r for r in read_metrics_rows(workdir.sft) if r["split"] == "tasks"]
    assert [r["step"] for r in rows] == [6]
    folder = workdir.stage("eval") / "sft-6"
    during_training = json.loads((folder / "metrics.json").read_text())
    assert during_training["model"] == "sft" and during_training["step"] == 6
    assert rows[0]["grounded/objects"] == during_training["grounded"]["objects"]
    assert rows[0]["vqa/exact"] == during_training["vqa"]["exact"]
    (folder / "metrics.json").unlink()
    config.eval.model = "sft"
    assert stages.by_command("eval").run(config, workdir)  # the saved step-6 checkpoint, scored afterwards
    assert json.loads((folder / "metrics.json").read_text()) == during_training


def _request(config, task, **flags):
    return generate_request(config, task, flags)


def test_generate_edit_structure_and_grounded_with_the_sft_model(sft_run, tmp_path):
    from cm3jax.data.embedded.shapes import Shape, render
    from cm3jax.storage import save_png

    config = sft_run.resolve(sft_config())
    config.generate.num = 2
    image, segmentation = render((Shape("circle", "red", "large", "center"),), 32)
    save_png(tmp_path / "scene.png", image)
    save_png(tmp_path / "segmentation.png", segmentation[..., 0])
    requests = [
        _request(config, "edit", image=str(tmp_path / "scene.png"), instruction="make the red circle blue"),
        _request(config, "structure", image=str(tmp_path / "segmentation.png"), prompt="a large red circle"),
        _request(config, "grounded", prompt="a large red circle in the center",
                 boxes="red circle:11,11,21,21"),
    ]
    for request in requests:
        run_generate(config, sft_run, request)
        [out] = glob.glob(str(sft_run.root / "samples" / f"{request['task']}-*"))
        settings = json.loads(open(os.path.join(out, "settings.json")).read())
        assert settings["model"] == "sft" and settings["step"] == 4 and settings["images"] == 2
        assert open(os.path.join(out, "sheet.png"), "rb").read(4) == b"\x89PNG"
    with pytest.raises(GenerateInputError, match="--instruction"):
        _request(config, "edit", image=str(tmp_path / "scene.png"))
    with pytest.raises(GenerateInputError, match="--boxes"):
        _request(config, "grounded", prompt="a red circle", boxes="red circle:1,2,3")
    from cm3jax.errors import BadInputError

    with pytest.raises(BadInputError, match="box of 'red circle'"):
        run_generate(config, sft_run, _request(config, "grounded", prompt="a red circle", boxes="red circle:0,0,99,9"))
    assert len(glob.glob(str(sft_run.root / "samples" / "grounded-*"))) == 1  # the refused request wrote nothing


def test_a_bad_generate_request_is_one_line_and_exit_code_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cm3jax", "generate", "grounded", "--config=configs/tiny.py", f"--workdir={tmp_path}",
         "--prompt=a red circle", "--boxes=red circle"], cwd=REPO, capture_output=True, text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--boxes" in result.stderr
