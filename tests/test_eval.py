"""`cm3jax eval` (cm3jax/evaluation/evaluate.py): on the tiny shapes run it writes every file, every prediction row
carries the score its scorer gives, and the same command gives the same metrics.json."""
import json

import numpy as np
import pytest

from cm3jax.data.embedded.shapes import Shape
from cm3jax.evaluation import scorers
from cm3jax.workdir import Workdir

from helpers import copy_run, random_state_dict, tiny_pipeline_config

pytestmark = pytest.mark.slow


def _read(folder):
    metrics = json.loads((folder / "metrics.json").read_text())
    predictions = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    return metrics, predictions


def test_the_pipelines_eval_scores_every_task_and_writes_every_file(tiny_pipeline_run):
    folder = Workdir(tiny_pipeline_run).stage("eval") / "lm-4"
    metrics, predictions = _read(folder)
    assert metrics["examples"] == 4 and metrics["step"] == 4
    assert set(metrics) >= {"loss", "text_to_image/cfg", "caption", "vqa"}
    assert {"loss", "text_loss", "image_loss"} <= set(metrics["loss"])
    assert {"exact", "count", "cells", "kind", "color", "size", "fd_retriever"} <= set(metrics["text_to_image/cfg"])
    assert {"exact", "cider_d"} <= set(metrics["caption"])
    assert {"exact", "count", "cells", "kind", "color", "size"} == set(metrics["reconstruction"])
    assert metrics["vqa"]["questions"] == 4 * 5
    assert (folder / "text_to_image-cfg.png").read_bytes()[:4] == b"\x89PNG"
    tasks = [p["task"] for p in predictions]
    assert tasks.count("text_to_image") == 4 and tasks.count("caption") == 4 and tasks.count("vqa") == 20
    assert tasks.count("reconstruction") == 4
    for row in predictions:  # each row's score is what the scorer gives its generation and reference
        if row["task"] == "caption":
            reference = scorers.parse_caption(row["reference"][0])
            assert row["scores"] == scorers.scene_scores(scorers.parse_caption(row["generated"]), reference)
        elif row["task"] == "vqa":
            assert row["scores"]["exact"] == scorers.vqa_accuracy(row["generated"], [row["reference"]])
        else:  # an image: the objects read from it against the caption's scene
            parsed = tuple(Shape(*fields) for fields in row["generated"])
            assert row["scores"] == scorers.scene_scores(parsed, scorers.parse_caption(row["reference"]))
    means = [p["scores"]["exact"] for p in predictions if p["task"] == "vqa"]
    assert metrics["vqa"]["exact"] == pytest.approx(sum(means) / len(means))


def test_the_same_eval_gives_the_same_metrics(tiny_pipeline_run, tmp_path):
    from cm3jax import stages

    workdir = Workdir(copy_run(tiny_pipeline_run, tmp_path / "run"))
    folder = workdir.stage("eval") / "lm-4"
    before = (folder / "metrics.json").read_text()
    (folder / "metrics.json").unlink()
    config = tiny_pipeline_config()
    assert stages.by_command("eval").run(config, workdir)
    assert (folder / "metrics.json").read_text() == before
    np.savez(tmp_path / "inception.npz", **random_state_dict())  # FID's network with random weights
    config.eval.update(step=2, tasks=("text_to_image", "edit", "structure"), rerank_candidates=3, num_retrieved=1,
                       inception_weights=str(tmp_path / "inception.npz"))
    assert stages.by_command("eval").run(config, workdir)  # another checkpoint and K: their own folder
    metrics, predictions = _read(workdir.stage("eval") / "lm-2-retrieved1")
    assert metrics["step"] == 2 and metrics["num_retrieved"] == 1
    assert {"text_to_image/cfg", "text_to_image/cfg/best_of_3"} <= set(metrics) and "loss" not in metrics
    assert metrics["text_to_image/cfg"]["fid"] >= 0
    assert 0 <= metrics["text_to_image/cfg"]["retrieved_documents"] <= 1  # as many as fit the model's positions
    assert [p.get("guidance") for p in predictions[:8]] == ["cfg"] * 4 + ["cfg/best_of_3"] * 4
    assert metrics["edit"]["examples"] == 4 and metrics["structure"]["examples"] == 4
    for row in predictions[8:]:  # an edit is scored against the edited scene, a structure prompt against its caption
        assert row["task"] in ("edit", "structure")
        parsed = tuple(Shape(*fields) for fields in row["generated"])
        assert row["scores"] == scorers.scene_scores(parsed, scorers.parse_caption(row["reference"]))
    assert (workdir.stage("eval") / "lm-2-retrieved1" / "edit.png").exists()


def test_eval_every_scores_the_lm_while_it_trains_as_the_eval_stage_does(tiny_pipeline_run, tmp_path):
    from cm3jax import stages

    from helpers import read_metrics_rows

    workdir = Workdir(copy_run(tiny_pipeline_run, tmp_path / "run"))
    config = tiny_pipeline_config()
    config.train.steps = 6  # trains on from step 4
    config.eval.update(every=2, tasks=("loss", "text_to_image", "caption"))
    assert stages.by_command("train").run(config, workdir)
    rows = [r for r in read_metrics_rows(workdir.lm) if r["split"] == "tasks"]
    assert [r["step"] for r in rows] == [6]
    folder = workdir.stage("eval") / "lm-6"
    during_training, _ = _read(folder)
    assert rows[0]["text_to_image/cfg/cells"] == during_training["text_to_image/cfg"]["cells"]
    assert rows[0]["loss/image_loss"] == pytest.approx(during_training["loss"]["image_loss"], rel=1e-6)
    (folder / "metrics.json").unlink()
    assert stages.by_command("eval").run(config, workdir)  # the saved step-6 checkpoint, scored afterwards
    after_training, _ = _read(folder)
    loss_during, loss_after = during_training.pop("loss"), after_training.pop("loss")
    assert loss_during == pytest.approx(loss_after, rel=1e-6)
    assert during_training == after_training


def test_an_eval_keeps_an_earlier_one_of_the_checkpoint_and_a_refused_eval_writes_nothing(tiny_pipeline_run,
                                                                                          tmp_path, capsys):
    from cm3jax import stages
    from cm3jax.errors import MissingInputError

    workdir = Workdir(copy_run(tiny_pipeline_run, tmp_path / "run"))
    evals = workdir.stage("eval").path
    before = (evals / "lm-4" / "metrics.json").read_text()
    config = tiny_pipeline_config()
    config.eval.tasks = ("loss",)  # other settings: other results under the same name
    for _ in range(2):  # the second time it gives what is already there: nothing more is kept
        assert stages.by_command("eval").run(config, workdir)
    assert set(json.loads((evals / "lm-4" / "metrics.json").read_text())) >= {"loss"}
    (kept,) = evals.glob("lm-4.replaced-*")
    assert (kept / "metrics.json").read_text() == before and "is kept in" in capsys.readouterr().out
    listing = sorted(p.name for p in evals.iterdir())
    config.eval.split = "test"  # no token shards of it
    with pytest.raises(MissingInputError):
        stages.by_command("eval").run(config, workdir)
    assert sorted(p.name for p in evals.iterdir()) == listing
