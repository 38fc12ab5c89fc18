"""The training loop: exact resume, restore onto another mesh, divergence, preemption, CLI and config errors."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3jax.config_validation import ConfigError, validate_config
from cm3jax.parallel.mesh import create_mesh
from cm3jax.parallel.sharding import logical_axis_rules
from cm3jax.stages import STAGES
from cm3jax.train import loop
from cm3jax.train.checkpoint import Checkpointer
from cm3jax.train.lm import build_lm_task, train_language_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_DEVICE = jax.devices()[:1]


def _host_params(result):
    return jax.device_get(result.state.params)


@pytest.mark.slow
def test_resume_is_bit_identical(tiny_config, tmp_path):
    straight = train_language_model(tiny_config, str(tmp_path / "straight"), ONE_DEVICE)
    tiny_config.train.steps = 3
    first = train_language_model(tiny_config, str(tmp_path / "resumed"), ONE_DEVICE)
    assert first.step == 3
    tiny_config.train.steps = 6
    resumed = train_language_model(tiny_config, str(tmp_path / "resumed"), ONE_DEVICE)
    assert resumed.step == 6
    jax.tree.map(np.testing.assert_array_equal, _host_params(straight), _host_params(resumed))
    # The restarted run saw exactly the batches of steps 4..6: same logged losses.
    logs = [[json.loads(line) for line in open(tmp_path / d / "logs" / "metrics.jsonl")]
            for d in ("straight", "resumed")]
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]


@pytest.mark.slow
def test_checkpoint_restores_onto_a_different_mesh(tiny_config, tmp_path):
    tiny_config.train.steps = 3
    tiny_config.mesh.ici.update(data=1, fsdp=8, tensor=1)
    saved = train_language_model(tiny_config, str(tmp_path), jax.devices())
    saved_params = _host_params(saved)

    tiny_config.mesh.ici.update(data=2, fsdp=2, tensor=2)
    mesh = create_mesh(tiny_config, jax.devices())
    task, _ = build_lm_task(tiny_config, mesh)
    abstract, shardings = loop.abstract_state_and_shardings(task.init_state, mesh, logical_axis_rules(tiny_config))
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"), keep=3)
    state, data_state = checkpointer.restore(3, abstract, shardings)
    checkpointer.close()
    assert data_state["process_count"] == 1 and "iterator" in data_state["processes"][0]
    assert state.params["lm_head"].sharding.spec == shardings.params["lm_head"].spec
    assert dict(state.params["lm_head"].sharding.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    jax.tree.map(np.testing.assert_array_equal, saved_params, jax.device_get(state.params))

    # And training continues on the new mesh.
    tiny_config.train.steps = 5
    assert train_language_model(tiny_config, str(tmp_path), jax.devices()).step == 5


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path, monkeypatch):
    import cm3jax.train.lm as lm

    original = lm.make_train_step

    def poisoned_step(*args, **kwargs):
        step = original(*args, **kwargs)

        def train_step(state, batch):
            new_state, metrics = step(state, batch)
            bad = new_state.step >= 5
            metrics["loss"] = jnp.where(bad, jnp.nan, metrics["loss"])
            metrics["finite"] = metrics["finite"] & ~bad
            return new_state, metrics

        return train_step

    monkeypatch.setattr(lm, "make_train_step", poisoned_step)
    tiny_config.train.log_every = 100  # the loop must catch it without a log step
    with pytest.raises(loop.TrainingDivergedError, match=r"at step 5 is not finite.*Last good checkpoint: step 3"):
        train_language_model(tiny_config, str(tmp_path), ONE_DEVICE)
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"), keep=3)
    assert checkpointer.all_steps() == [3]
    checkpointer.close()


def _cli(*args, **popen_kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.Popen([sys.executable, "-m", "cm3jax", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen_kwargs)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_a_rerun_resumes(tmp_path):
    workdir = str(tmp_path)
    common = ["--config=configs/tiny.py", f"--workdir={workdir}", "--config.train.checkpoint_every=100000"]
    proc = _cli("train", *common, "--config.train.steps=100000")
    metrics = tmp_path / "lm" / "logs" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    checkpointer = Checkpointer(str(tmp_path / "lm" / "checkpoints"), keep=3)
    (saved,) = checkpointer.all_steps()
    checkpointer.close()
    assert 3 <= saved < 100000
    assert not (tmp_path / "lm" / "COMPLETE.json").exists()

    rerun = _cli("train", *common, f"--config.train.steps={saved + 2}")
    output, _ = rerun.communicate(timeout=180)
    assert rerun.returncode == 0, output
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps[-2:] == [saved + 1, saved + 2]
    assert (tmp_path / "lm" / "COMPLETE.json").exists()


@pytest.mark.slow
def test_cli_overrides_reach_the_run_and_bad_values_name_the_field(tmp_path):
    ok = _cli("train", "--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.model.num_layers=1",
              "--config.train.steps=2")
    output, _ = ok.communicate(timeout=180)
    assert ok.returncode == 0, output
    resolved = json.load(open(tmp_path / "lm" / "config.json"))
    assert resolved["model"]["num_layers"] == 1 and resolved["train"]["steps"] == 2

    bad = _cli("train", "--config=configs/tiny.py", f"--workdir={tmp_path}/bad", "--config.model.num_heads=5")
    output, _ = bad.communicate(timeout=120)
    assert bad.returncode == 2
    assert "config.model.num_heads" in output and "Traceback" not in output


@pytest.mark.parametrize("overrides,field", [
    ({"model.num_heads": 5}, "model.num_heads"),
    ({"mesh.ici.fsdp": 3}, "mesh.ici"),
    ({"mesh.ici.data": 2, "mesh.ici.fsdp": 2, "mesh.ici.tensor": 2, "train.global_batch_size": 6},
     "train.global_batch_size"),
    ({"train.grad_accum_steps": 3}, "train.grad_accum_steps"),
    ({"mesh.ici.data": 1, "mesh.ici.fsdp": 1, "mesh.ici.tensor": 8}, "mesh.ici.tensor"),
    ({"train.seq_len": 128}, "train.seq_len"),
    ({"model.activation": "tanh"}, "model.activation"),
    ({"model.attention": "flash"}, "model.attention"),
    ({"optim.decay": "step"}, "optim.decay"),
    ({"model.remat_policy": "some"}, "model.remat_policy"),
    ({"data.source": "web"}, "data.source"),
    ({"data.cm3_max_spans": 9}, "data.cm3_max_spans"),  # tiny has 8 mask tokens
    ({"data.cm3_min_spans": 5}, "data.cm3_min_spans"),
    ({"data.num_streams": 3}, "data.num_streams"),
    ({"data.packing": "greedy"}, "data.packing"),
    ({"data.image_first_probability": 1.5}, "data.image_first_probability"),
    ({"sft.image_first_probability": float("nan")}, "sft.image_first_probability"),
    ({"sft.vqa_pairs": 9}, "sft.vqa_pairs"),  # tiny has 8 mask tokens
    ({"data.cm3_whole_text_probability": -0.1}, "data.cm3_whole_text_probability"),
    ({"model.scan_unroll": 3}, "model.scan_unroll"),  # tiny has 2 layers
    ({"raw_data.dataset": "laion"}, "raw_data.dataset"),
    ({"retrieval.num_neighbours": 1}, "data.num_retrieved_probs"),  # K up to 2 needs 2 neighbours
    ({"retrieval.query_dropout": 1.0}, "retrieval.query_dropout"),
    ({"retrieval.embeddings": "/data/clip.npy"}, "retrieval.embeddings"),
    ({"retriever.num_heads": 5}, "retriever.num_heads"),
])
def test_config_that_cannot_run_fails_naming_the_field(tiny_config, overrides, field):
    for key, value in overrides.items():
        section, *rest = key.split(".")
        target = tiny_config[section]
        for name in rest[:-1]:
            target = target[name]
        target[rest[-1]] = value
    with pytest.raises(ConfigError, match=rf"^config\.{field}"):
        validate_config(tiny_config, num_devices=8)  # what the devices must allow
        for stage in STAGES:  # each stage's own sections
            stage.validate(tiny_config)


def test_every_recipe_config_is_valid_for_its_intended_size():
    from cm3jax.config import load_recipe

    for name, devices in (("tiny", 1), ("demo", 1), ("cm3leon:350m", 256), ("cm3leon:760m", 256),
                          ("cm3leon:7b", 512)):
        config = load_recipe(name)
        validate_config(config, num_devices=devices)
        if name.startswith("cm3leon"):  # paper: 8M-token batches of 4096-token sequences
            assert (config.train.global_batch_size, config.train.seq_len) == (2048, 4096)


def test_a_state_field_added_after_a_checkpoint_compares_as_its_default(tiny_config):
    """A checkpoint saved before model.image_grid_embedding existed was trained without it: resuming it with the
    option on is refused naming the field (not read as a damaged checkpoint), and with it off is accepted."""
    from cm3jax.config import config_to_json
    from cm3jax.train.checkpoint import state_differences
    from cm3jax.train.lm import LM_STATE_FIELDS

    saved = json.loads(config_to_json(tiny_config))
    del saved["model"]["image_grid_embedding"]
    assert state_differences(tiny_config, saved, LM_STATE_FIELDS) == ""
    with_grid = tiny_config.copy_and_resolve_references()
    with_grid.model.image_grid_embedding = True
    assert state_differences(with_grid, saved, LM_STATE_FIELDS) == (
        "config.model.image_grid_embedding=True but False in the checkpoint")
