"""The params export and import: `cm3jax.load_pretrained` gives the generator of the run it came from, and
`sft.init_from` / `train.init_from` start from a params or an hf export with parameters bit-identical to the
checkpoint's (export -> import round trip); another model's export is refused by field."""
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

import cm3jax
from cm3jax import stages
from cm3jax.config_validation import ConfigError
from cm3jax.errors import MissingInputError
from cm3jax.inference.decode import SamplingOptions
from cm3jax.inference.generate import Generator
from cm3jax.parallel.mesh import create_mesh
from cm3jax.parallel.sharding import logical_axis_rules
from cm3jax.train.checkpoint import Checkpointer
from cm3jax.train.lm import init_from_params, lm_state_init
from cm3jax.train.loop import abstract_state_and_shardings
from cm3jax.workdir import Workdir

from helpers import copy_run, tiny_pipeline_config

pytestmark = [pytest.mark.slow]

GREEDY_CFG = SamplingOptions(temperature=0.0, top_k=0, top_p=1.0, guidance="cfg", cfg_scale=3.0)


@pytest.fixture(scope="module")
def run(tiny_pipeline_run, tmp_path_factory):
    """A copy of the tiny run with its LM exported in both formats."""
    workdir = Workdir(copy_run(tiny_pipeline_run, tmp_path_factory.mktemp("export_params") / "run"))
    folders = {}
    for export_format in ("params", "hf"):
        config = tiny_pipeline_config()
        config.export.format = export_format
        assert stages.by_command("export").run(config, workdir)
        folders[export_format] = workdir.export_folder("lm", 4, export_format, "float32")
    return workdir, folders


def _layout(config):
    mesh = create_mesh(config, jax.devices())
    abstract, shardings = abstract_state_and_shardings(lm_state_init(config)[0], mesh, logical_axis_rules(config))
    return abstract.params, shardings.params


def _checkpoint_params(workdir, config):
    checkpointer = Checkpointer(workdir.lm.checkpoints, keep=1)
    try:
        return jax.device_get(checkpointer.restore_params(4, *_layout(config)))
    finally:
        checkpointer.close()


def test_load_pretrained_gives_the_runs_generator(run, monkeypatch):
    workdir, folders = run
    record = json.loads((folders["params"] / "export.json").read_text())
    assert (record["format"], record["model"], record["step"]) == ("params", "lm", 4)
    monkeypatch.chdir(workdir.root)
    loaded = cm3jax.load_pretrained("export/lm-4-params-float32")  # a relative folder, as a user types it
    original = Generator.load(workdir.resolve(tiny_pipeline_config()), workdir, model="lm")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.params), jax.device_get(original.params))
    images, codes = loaded.images("a red circle", 1, GREEDY_CFG)
    expected_images, expected_codes = original.images("a red circle", 1, GREEDY_CFG)
    np.testing.assert_array_equal(codes, expected_codes)
    np.testing.assert_array_equal(images, expected_images)
    with pytest.raises(MissingInputError, match="memory bank"):
        loaded.images("a red circle", 1, GREEDY_CFG, retrieve=1)


def test_load_pretrained_refuses_a_folder_that_is_no_params_export(run):
    _, folders = run
    with pytest.raises(MissingInputError, match="export.format=params"):
        cm3jax.load_pretrained(folders["hf"])


@pytest.mark.parametrize("export_format", ["params", "hf"])
def test_sft_starts_from_an_export_with_the_checkpoints_exact_parameters(run, export_format):
    from cm3jax.train.sft import fine_tuning, sft_training_config

    workdir, folders = run
    config = tiny_pipeline_config()
    config.sft.update(steps=2, init_from=str(folders[export_format]))
    config = sft_training_config(workdir.resolve(config))
    tuning = fine_tuning(config, workdir)
    assert tuning.inputs["pretrained_step"] == 4
    restored = jax.device_get(tuning.initial_params(*_layout(config)))
    jax.tree.map(np.testing.assert_array_equal, restored, _checkpoint_params(workdir, config))


def test_train_starts_from_an_hf_export_that_went_through_pytorch(run, tmp_path):
    """Loaded by transformers, saved again by it, imported by cm3jax: the same parameters."""
    import transformers

    workdir, folders = run
    again = tmp_path / "saved_by_transformers"
    transformers.OPTForCausalLM.from_pretrained(folders["hf"]).save_pretrained(again)
    config = workdir.resolve(tiny_pipeline_config())
    config.train.init_from = str(again)
    initial_params, inputs = init_from_params(config)
    assert inputs["init_from_step"] == 0  # a folder written elsewhere records no cm3jax step
    restored = jax.device_get(initial_params(*_layout(config)))
    jax.tree.map(np.testing.assert_array_equal, restored, _checkpoint_params(workdir, config))


def test_an_export_of_another_model_shape_is_refused_by_field(run, tmp_path):
    workdir, folders = run
    other = shutil.copytree(folders["hf"], tmp_path / "other")
    opt_config = json.loads((other / "config.json").read_text())
    opt_config["ffn_dim"] *= 2
    (other / "config.json").write_text(json.dumps(opt_config))
    config = workdir.resolve(tiny_pipeline_config())
    config.train.init_from = str(other)
    with pytest.raises(ConfigError, match=r"config.train.init_from: .* \(ffn_dim="):
        init_from_params(config)
    config.train.init_from = str(folders["params"])
    config.model.d_model *= 2
    with pytest.raises(ConfigError, match="config.model.d_model="):
        init_from_params(config)


def _files(folder):
    folder = pathlib.Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_exporting_again_never_loses_the_earlier_export(run, monkeypatch):
    """Each dtype has its own folder; a crash while the new export takes the old one's name leaves both whole."""
    workdir, folders = run
    config = tiny_pipeline_config()
    config.export.update(format="params", dtype="bfloat16")
    assert stages.by_command("export").run(config, workdir)
    assert json.loads((folders["params"] / "export.json").read_text())["dtype"] == "float32"  # still there
    earlier = _files(folders["params"])
    from cm3jax import storage

    move = storage.move

    def crash_before_the_new_export_is_named(source, destination):
        if str(source).endswith(".partial"):
            raise OSError("crashed")
        move(source, destination)

    monkeypatch.setattr(storage, "move", crash_before_the_new_export_is_named)
    config.export.dtype = "float32"
    with pytest.raises(OSError, match="crashed"):
        stages.by_command("export").run(config, workdir)
    (aside,) = workdir.export.path.glob(f"{folders['params'].name}.replaced-*")
    assert _files(aside) == earlier
    assert (workdir.export.path / f"{folders['params'].name}.partial" / "export.json").exists()
    monkeypatch.undo()
    assert stages.by_command("export").run(config, workdir)
    assert json.loads((folders["params"] / "export.json").read_text())["dtype"] == "float32"
    assert not (workdir.export.path / f"{folders['params'].name}.partial").exists()
