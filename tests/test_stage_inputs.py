"""The pipeline and the identity of each stage's inputs: a preempted training stage (vqgan, retriever, lm) ends the
pipeline, and the rerun gives what an unbroken run gives; a stage refuses inputs other than those it was made
from; a complete stage given another config is continued (more steps) or refused with the fields named."""
import json
import os
import shutil

import numpy as np
import pytest

from cm3jax import stages
from cm3jax.config_validation import ConfigError
from cm3jax.pipeline import run_pipeline
from cm3jax.train import loop
from cm3jax.vocab import VocabMismatchError
from cm3jax.workdir import ChangedInputsError, Workdir

from helpers import tiny_pipeline_config, train_losses

pytestmark = pytest.mark.slow

STAGE_ORDER = tuple(stage.name for stage in stages.STAGES)


def _copy_stages_before(source, to, stage):
    os.makedirs(to)
    for name in STAGE_ORDER[:STAGE_ORDER.index(stage)]:
        if not os.path.exists(os.path.join(source, name)):  # a stage the config leaves out
            continue
        for folder in (name, "text_tokenizer") if name == "tokens" else (name,):
            shutil.copytree(os.path.join(source, folder), os.path.join(to, folder), symlinks=True)
    return str(to)


class _PreemptedAtStep1:
    """Stands in for the SIGTERM flag: reports a preemption at the end of step 1."""

    def reached(self, step):
        return step == 1

    def restore_handlers(self):
        pass


def _preempt(monkeypatch, task_name):
    real_run, real_flag = loop.run, loop._PreemptionFlag

    def run(task, *args, **kwargs):
        monkeypatch.setattr(loop, "_PreemptionFlag", _PreemptedAtStep1 if task.name == task_name else real_flag)
        return real_run(task, *args, **kwargs)

    monkeypatch.setattr(loop, "run", run)


def _shards(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
            if name.endswith(".array_record")}


@pytest.mark.parametrize("task,stage,next_stage", [("vqgan", "vqgan", "tokens"), ("retriever", "retrieval", "lm"),
                                                   ("lm", "lm", None)])
def test_a_preempted_stage_ends_the_pipeline_and_the_rerun_matches_an_unbroken_run(tiny_pipeline_run, tmp_path,
                                                                                   monkeypatch, task, stage,
                                                                                   next_stage):
    workdir = _copy_stages_before(tiny_pipeline_run, tmp_path / "run", stage)
    with monkeypatch.context() as patch:
        _preempt(patch, task)
        assert not run_pipeline(tiny_pipeline_config(), Workdir(workdir))
    assert not Workdir(workdir).stage(stage).is_complete()
    if next_stage:
        assert not os.path.exists(os.path.join(workdir, next_stage))  # nothing ran on the unfinished stage
    assert run_pipeline(tiny_pipeline_config(), Workdir(workdir))

    assert _shards(os.path.join(workdir, "tokens")) == _shards(os.path.join(tiny_pipeline_run, "tokens"))
    for split in ("train", "validation"):
        np.testing.assert_array_equal(np.load(os.path.join(workdir, "retrieval", f"neighbours-{split}.npy")),
                                      np.load(os.path.join(tiny_pipeline_run, "retrieval", f"neighbours-{split}.npy")))
    assert train_losses(os.path.join(workdir, "lm")) == train_losses(os.path.join(tiny_pipeline_run, "lm"))


def test_tokens_and_the_lm_refuse_inputs_they_were_not_made_from(tiny_pipeline_run, tmp_path):
    workdir = _copy_stages_before(tiny_pipeline_run, tmp_path / "run", "samples")
    config = tiny_pipeline_config()
    config.vqgan.train.steps = 5  # the VQ-GAN trains on after the tokens were made
    with pytest.raises(ChangedInputsError, match="vqgan_step: 4 then, 5 now"):
        run_pipeline(config, Workdir(workdir))  # continues the VQ-GAN, then the tokens stage refuses it
    with open(os.path.join(workdir, "retrieval", "neighbours-train.npy"), "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(np.int64(0).tobytes())  # the neighbours change under a trained LM
    config = tiny_pipeline_config()
    config.train.steps = 6
    with pytest.raises(ChangedInputsError, match="neighbours"):
        stages.by_command("train").run(config, Workdir(workdir))


def test_data_built_by_another_version_of_the_embedded_dataset_is_rebuilt_and_its_tokens_refused(
        tiny_pipeline_run, tmp_path, capsys):
    """A workdir whose shapes data (and tokens) an earlier cm3jax built from another dataset version: the data stage
    runs again, and the tokens stage refuses its shards instead of training on them."""
    workdir = _copy_stages_before(tiny_pipeline_run, tmp_path / "run", "retrieval")
    marker = os.path.join(workdir, "data", "COMPLETE.json")
    record = json.load(open(marker))
    assert record["version"] == "1.1.0"
    with open(marker, "w") as f:
        json.dump({**record, "version": "1.0.0"}, f)
    inputs_file = os.path.join(workdir, "tokens", "inputs.json")
    inputs = json.load(open(inputs_file))
    inputs["raw_data"]["embedded_version"] = "1.0.0"
    with open(inputs_file, "w") as f:
        json.dump(inputs, f)
    shards = _shards(os.path.join(workdir, "tokens"))
    with pytest.raises(ChangedInputsError, match="'embedded_version': '1.1.0'"):
        run_pipeline(tiny_pipeline_config(), Workdir(workdir))
    assert "data: complete, but it holds shapes 1.0.0, this cm3jax builds 1.1.0: running it again" in (
        capsys.readouterr().out)
    assert json.load(open(marker))["version"] == "1.1.0"
    assert _shards(os.path.join(workdir, "tokens")) == shards


def test_retrieval_rebuilds_what_a_retriever_trained_on_or_new_settings_make_outdated(tiny_pipeline_run, tmp_path,
                                                                                       capsys):
    from cm3jax.storage import load_arrays

    workdir = Workdir(_copy_stages_before(tiny_pipeline_run, tmp_path / "run", "lm"))
    retrieval = workdir.retrieval

    def bank():
        return np.concatenate([load_arrays(p)["vectors"] for p in sorted(retrieval.bank.glob("*.npz"))])

    before = bank()
    config = tiny_pipeline_config()
    config.retriever.train.steps += 2  # "only the step count grew": the retriever trains on
    assert stages.by_name("retrieval").run(workdir.resolve(config), workdir)
    assert "bank, index, neighbours, neighbours-" in capsys.readouterr().out
    trained_on = bank()
    assert trained_on.shape == before.shape and not np.allclose(trained_on, before)
    bank_files = {p: os.stat(p).st_mtime_ns for p in retrieval.bank.glob("*.npz")}
    config.retrieval.num_neighbours = 2
    assert stages.by_name("retrieval").run(workdir.resolve(config), workdir)
    assert capsys.readouterr().out.count("were made with another encoder") == 1  # the neighbours alone
    assert {p: os.stat(p).st_mtime_ns for p in retrieval.bank.glob("*.npz")} == bank_files
    assert load_arrays(retrieval.neighbours("train")).shape[1] == 2


def test_a_refused_stage_keeps_the_config_of_its_last_complete_run(tiny_pipeline_run, tmp_path):
    workdir = Workdir(_copy_stages_before(tiny_pipeline_run, tmp_path / "run", "lm"))
    saved = workdir.tokens.config_file.read_bytes()
    config = tiny_pipeline_config()
    config.vocab.num_masks = 6
    with pytest.raises(VocabMismatchError):
        stages.by_name("tokens").run(workdir.resolve(config), workdir)
    assert workdir.tokens.config_file.read_bytes() == saved and workdir.tokens.is_complete()
    with pytest.raises(ConfigError, match=r"tokens is complete .*config.vocab.num_masks=6 \(it ran with 8\)"):
        run_pipeline(workdir.resolve(config), workdir)  # the change is not hidden by the refused run


def test_a_complete_stage_given_another_config_continues_or_is_refused(tiny_pipeline_run, tmp_path, capsys):
    workdir = _copy_stages_before(tiny_pipeline_run, tmp_path / "run", "samples")
    config = tiny_pipeline_config()
    config.model.num_layers = 3
    with pytest.raises(ConfigError, match=r"lm is complete .*config.model.num_layers=3 \(it ran with 2\)"):
        run_pipeline(config, Workdir(workdir))
    config = tiny_pipeline_config()
    config.train.steps = 6
    config.generate.sample_captions = 2
    assert run_pipeline(config, Workdir(workdir))
    out = capsys.readouterr().out
    assert "lm: complete, but config.train.steps=6 (it ran with 4): training on" in out
    assert [s for s, _ in train_losses(os.path.join(workdir, "lm"))] == [1, 2, 3, 4, 5, 6]
    assert json.load(open(os.path.join(workdir, "samples", "COMPLETE.json")))["step"] == 6
