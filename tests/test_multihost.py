"""Two processes on localhost (gloo collectives) against one process with as many devices: LM training (train,
checkpoint, restore; both read two data streams, so they see the same global batches), the tokenize job,
evaluation and instruction tuning."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from cm3jax.parallel.mesh import create_mesh
from cm3jax.parallel.sharding import logical_axis_rules
from cm3jax.train import loop
from cm3jax.train.checkpoint import Checkpointer
from cm3jax.train.lm import build_lm_task
from cm3jax.workdir import Workdir

from helpers import config_flags, copy_run, launch_command, read_metrics_rows, tiny_pipeline_config

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

# Float32 sums are reduced in another order across 2 processes than on 4 local devices; 5 AdamW steps agree to 1e-4.
PARAM_ATOL = 1e-4


def _launch(workdir, steps, num_processes, devices_per_process):
    return launch_command(["train", f"--config.train.steps={steps}", "--config.data.num_streams=2"], workdir,
                          num_processes, devices_per_process)


def _final_params(config, workdir, step, num_processes, stage="lm"):
    mesh = create_mesh(config, jax.devices()[:1])
    task, _ = build_lm_task(config, mesh)
    abstract, shardings = loop.abstract_state_and_shardings(task.init_state, mesh, logical_axis_rules(config))
    checkpointer = Checkpointer(os.path.join(workdir, stage, "checkpoints"), keep=3)
    state, data_state = checkpointer.restore(step, abstract, shardings)
    checkpointer.close()
    assert data_state["process_count"] == num_processes  # every process's iterator state is in the checkpoint
    assert len(data_state["processes"]) == num_processes
    return jax.device_get(state.params)


def _losses(workdir):
    with open(os.path.join(workdir, "lm", "logs", "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if r["split"] == "train"}


def test_two_processes_match_one_process(tmp_path, tiny_config):
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    first = _launch(multi, steps=3, num_processes=2, devices_per_process=2)
    assert "'data': 2, 'fsdp': 2" in first[0]  # one mesh across both processes: dcn data x ici fsdp
    _launch(multi, steps=5, num_processes=2, devices_per_process=2)  # restores step 3, trains 4..5
    _launch(single, steps=5, num_processes=1, devices_per_process=4)

    multi_losses, single_losses = _losses(multi), _losses(single)
    assert sorted(multi_losses) == [1, 2, 3, 4, 5]
    for step in range(1, 6):
        np.testing.assert_allclose(multi_losses[step], single_losses[step], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=PARAM_ATOL),
                 _final_params(tiny_config, multi, 5, 2), _final_params(tiny_config, single, 5, 1))


def test_two_processes_tokenize_like_one(tmp_path, tiny_config):
    """Each process encodes its own shards; together they write what one process writes, and the manifest sums
    both processes' counts. The text tokenizer is trained by process 0 while process 1 waits for it. The data
    stage before it, on 2 processes too, builds the dataset once (process 0) while process 1 waits."""
    from cm3jax.data.shards import open_token_shards
    from cm3jax.train.vqgan import train_vqgan

    multi, single = tmp_path / "multi", tmp_path / "single"
    outputs = launch_command(["data"], str(multi), num_processes=2, devices_per_process=1)
    assert "data: digits in" in outputs[0] and "data: digits in" not in outputs[1]
    assert (multi / "data" / "COMPLETE.json").exists()
    tiny_config.vqgan.train.steps = 1
    train_vqgan(tiny_config, str(multi / "vqgan"), str(multi / "data"), jax.devices()[:1])
    shutil.copytree(multi, single)
    flags = ["tokenize", "--config.tokenize.splits=('validation',)", "--config.tokenize.shard_size=50",
             "--config.tokenize.batch_size=8"]
    launch_command(flags, str(multi), num_processes=2, devices_per_process=1)
    shutil.copytree(multi / "text_tokenizer", single / "text_tokenizer")
    launch_command(flags, str(single), num_processes=1, devices_per_process=2)

    manifests = [json.load(open(d / "tokens" / "manifest.json")) for d in (multi, single)]
    assert manifests[0] == manifests[1]
    assert manifests[0]["splits"]["validation"] == {"raw_examples": 200, "documents_written_now": 200,
                                                    "skipped": {}, "shards": 4}
    multi_records, single_records = (open_token_shards(str(d / "tokens"), "validation") for d in (multi, single))
    assert len(multi_records) == len(single_records) == 200
    assert all(multi_records[i] == single_records[i] for i in range(200))


def test_when_process_0_cannot_prepare_the_data_every_process_stops_with_one_line(tmp_path):
    missing = tmp_path / "no_such_folder"
    outputs = launch_command(["data", "--config.raw_data.dataset=image_folder",
                              f"--config.raw_data.paths={missing}/{{split}}"], str(tmp_path / "run"),
                             num_processes=2, devices_per_process=1, expect_success=False)
    assert f"cm3jax: {missing}/train/captions.jsonl not found" in outputs[0]
    assert "cm3jax: data: process 0 could not prepare the data" in outputs[1]
    assert "Traceback" not in outputs[0] + outputs[1]


def test_two_processes_evaluate_like_one(tmp_path, tiny_pipeline_run):
    """Each process decodes its rows of every batch of prompts; the metrics and predictions process 0 writes are the
    ones a single process writes (the held-out loss reads two data streams in both, so the same batches)."""
    from configs import tiny

    runs = {n: copy_run(tiny_pipeline_run, tmp_path / f"processes_{n}") for n in (1, 2)}
    flags = ["eval", *config_flags(tiny_pipeline_config(), tiny.get_config()), "--config.data.num_streams=2",
             "--config.eval.tasks=('loss', 'text_to_image', 'caption')"]
    results = {}
    for num_processes, run in runs.items():
        shutil.rmtree(run / "eval")
        launch_command(flags, str(run), num_processes=num_processes, devices_per_process=2 // num_processes,
                       delayed_process=1 if num_processes > 1 else None)
        folder = run / "eval" / "lm-4"
        results[num_processes] = (json.loads((folder / "metrics.json").read_text()),
                                  (folder / "predictions.jsonl").read_text())
    (metrics_2, predictions_2), (metrics_1, predictions_1) = results[2], results[1]
    assert predictions_2 == predictions_1 and predictions_1.count("\n") == 8  # 4 images, 4 captions
    loss_2, loss_1 = metrics_2.pop("loss"), metrics_1.pop("loss")
    assert loss_2["loss_tokens"] == loss_1["loss_tokens"]
    for key in ("loss", "text_loss", "image_loss"):
        assert loss_2[key] == pytest.approx(loss_1[key], rel=1e-5)
    assert metrics_2 == metrics_1


def test_two_processes_fine_tune_like_one(tmp_path, tiny_pipeline_run):
    """SFT from the same LM on 2 processes x 1 device and on 1 process x 2 devices: the same task examples (two data
    streams in both), losses and parameters."""
    from configs import tiny

    runs = {n: copy_run(tiny_pipeline_run, tmp_path / f"processes_{n}") for n in (1, 2)}
    flags = ["sft", *config_flags(tiny_pipeline_config(), tiny.get_config()), "--config.data.num_streams=2",
             "--config.sft.steps=3"]
    for num_processes, run in runs.items():
        launch_command(flags, str(run), num_processes=num_processes, devices_per_process=2 // num_processes,
                       delayed_process=1 if num_processes > 1 else None)
    rows = {n: {r["step"]: r for r in read_metrics_rows(run / "sft") if r["split"] == "train"}
            for n, run in runs.items()}
    assert sorted(rows[2]) == [1, 2, 3]
    for step in (1, 2, 3):
        assert rows[2][step]["loss"] == pytest.approx(rows[1][step]["loss"], rel=1e-5)
        counts = {k: v for k, v in rows[2][step].items() if k.startswith("data_task_")}
        assert counts and counts == {k: rows[1][step][k] for k in counts}
    config = Workdir(runs[1]).resolve(tiny_pipeline_config())  # reads the run's token shards
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=PARAM_ATOL),
                 _final_params(config, str(runs[2]), 3, 2, "sft"), _final_params(config, str(runs[1]), 3, 1, "sft"))


@pytest.mark.parametrize("export_format", ["hf", "params"])
def test_two_processes_export_like_one(tmp_path, tiny_pipeline_run, export_format):
    """Every process reads the checkpoint, process 0 writes: the same files as one process writes. Process 1
    writes its files late, so a folder finished before every process is done with it fails here every time."""
    from cm3jax.export.params_bundle import load_pretrained
    from configs import tiny

    runs = {n: copy_run(tiny_pipeline_run, tmp_path / f"processes_{n}") for n in (1, 2)}
    flags = ["export", *config_flags(tiny_pipeline_config(), tiny.get_config()),
             f"--config.export.format={export_format}"]
    folders = {}
    for num_processes, run in runs.items():
        shutil.rmtree(run / "export")
        launch_command(flags, str(run), num_processes=num_processes, devices_per_process=2 // num_processes,
                       delayed_process=1 if num_processes > 1 else None)
        folders[num_processes] = run / "export" / f"lm-4-{export_format}-float32"
    if export_format == "hf":
        for name in ("model.safetensors", "tokenizer.json", "config.json", "vqgan/model.safetensors"):
            assert (folders[2] / name).read_bytes() == (folders[1] / name).read_bytes(), name
    else:
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(load_pretrained(folders[2]).params),
                     jax.device_get(load_pretrained(folders[1]).params))
