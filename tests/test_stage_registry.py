"""The stage registry and the Workdir: what the dispatcher, the pipeline and the usage text are built from."""
import json
import os

import pytest

from cm3jax.config import base_config
from cm3jax.pipeline import continues
from cm3jax.stages import STAGES, by_command, by_name
from cm3jax.workdir import ChangedInputsError, StageDir, Workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_stages_have_unique_names_and_commands_and_need_only_earlier_stages():
    names = [stage.name for stage in STAGES]
    assert len(set(names)) == len(names) and len({stage.command for stage in STAGES}) == len(STAGES)
    for i, stage in enumerate(STAGES):
        assert set(stage.needs) <= set(names[:i]), stage.name
        assert by_name(stage.name) is stage and by_command(stage.command) is stage
    assert by_command("pipeline") is None and by_command("generate") is None


def test_every_declared_config_field_exists():
    config = base_config()
    for stage in STAGES:
        for field in stage.config_fields + stage.resumable:
            node = config
            for key in field.split("."):
                assert key in node, (stage.name, field)
                node = node[key]


def test_skipping_follows_the_config():
    config = base_config()
    config.data.retrieval = "none"
    config.generate.update(sample_prompts=(), sample_captions=0)
    skipped = {stage.name: stage.skipped_because(config) for stage in STAGES}
    assert skipped["retrieval"] == "data.retrieval='none'" and "sample_prompts" in skipped["samples"]
    assert all(reason is None for name, reason in skipped.items() if name not in ("retrieval", "samples"))
    config.data.retrieval = "neighbours"
    assert by_name("retrieval").skipped_because(config) is None


def test_only_a_larger_step_count_of_a_training_stage_continues_it():
    lm = by_name("lm")
    assert continues(lm, [("train.steps", 6, 4)])
    assert not continues(lm, [("train.steps", 3, 4)])
    assert not continues(lm, [("train.steps", 6, 4), ("model.num_layers", 3, 2)])
    assert not continues(by_name("tokens"), [("tokenize.batch_size", 8, 4)])
    assert not continues(lm, [])


def test_workdir_knows_every_path_and_the_input_defaults(tmp_path):
    workdir = Workdir(tmp_path)
    assert str(workdir.lm.checkpoints) == str(tmp_path / "lm" / "checkpoints")
    assert str(workdir.stage("vqgan").samples) == str(tmp_path / "vqgan" / "samples")
    assert str(workdir.text_tokenizer) == str(tmp_path / "text_tokenizer" / "text.model")
    config = base_config()
    resolved = workdir.resolve(config)
    assert (resolved.data.token_dir, resolved.data.neighbours_dir) == (str(workdir.tokens), str(workdir.retrieval))
    assert config.data.token_dir == ""  # the given config is left as it was
    config.data.token_dir = "/elsewhere/tokens"
    assert workdir.resolve(config).data.token_dir == "/elsewhere/tokens"


def test_workdirs_stage_folders_and_config_paths_are_absolute_from_where_they_enter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    workdir = Workdir("runs/demo")
    assert str(workdir) == str(tmp_path / "runs" / "demo") and str(workdir.lm) == str(tmp_path / "runs/demo/lm")
    assert str(Workdir("~/run").retrieval.index) == str(tmp_path / "home" / "run" / "retrieval" / "index")
    assert str(Workdir("gs://bucket/run").lm.checkpoints) == "gs://bucket/run/lm/checkpoints"
    assert str(StageDir.at("elsewhere/lm").checkpoints) == str(tmp_path / "elsewhere" / "lm" / "checkpoints")
    config = base_config()
    config.sft.init_from = "runs/old/lm"
    config.raw_data.paths = "~/images/{split}/*.array_record"
    config.retrieval.embeddings = "gs://bucket/clip/{split}-{part}.npy"
    resolved = workdir.resolve(config)
    assert resolved.sft.init_from == str(tmp_path / "runs" / "old" / "lm")
    assert resolved.raw_data.paths == str(tmp_path / "home" / "images" / "{split}" / "*.array_record")
    assert resolved.retrieval.embeddings == "gs://bucket/clip/{split}-{part}.npy"
    assert resolved.train.init_from == "" and resolved.data.token_dir == str(workdir.tokens)
    assert config.sft.init_from == "runs/old/lm"  # the given config is left as it was


def test_stage_dir_records_config_completion_and_inputs(tmp_path):
    stage = StageDir(Workdir(tmp_path).stage("tokens").path)
    assert stage.saved_config() is None and not stage.is_complete() and stage.identity() is None
    config = base_config()
    stage.prepare(config)
    assert stage.saved_config()["model"]["d_model"] == config.model.d_model
    stage.record_inputs({"vqgan_step": 4})
    identity = stage.identity()
    stage.check_inputs({"vqgan_step": 4})
    with pytest.raises(ChangedInputsError, match="vqgan_step: 4 then, 5 now"):
        stage.check_inputs({"vqgan_step": 5})
    stage.mark_complete(config, {"documents": 3})
    assert stage.is_complete() and json.loads((stage.path / "COMPLETE.json").read_text())["documents"] == 3
    assert stage.identity() == identity and not list(stage.path.glob("*.tmp-*"))  # atomic writes leave no temp files


@pytest.mark.parametrize("recipe", ["configs/tiny.py", "configs/demo.py", "configs/shapes.py",
                                    "configs/cm3leon.py:350m", "configs/cm3leon.py:7b",
                                    "configs/demo.py:smoke", "configs/shapes.py:smoke"])
def test_every_recipe_passes_the_checks_of_the_stages_it_runs(recipe):
    from cm3jax.config import load_recipe

    config = load_recipe(recipe)
    for stage in STAGES:
        if not stage.skipped_because(config):
            stage.validate(config)
