"""Generation from a trained (tiny) run on shapes scenes: the CLI's outputs and one-line errors, every task's prompt
and constraints, retrieval-augmented prompting and re-ranking, and the pipeline's samples stage."""
import copy
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from cm3jax import vocab as vocab_lib
from cm3jax.errors import BadInputError
from cm3jax.inference.decode import SamplingOptions
from configs import tiny

from helpers import config_flags, copy_run, tiny_pipeline_config

pytestmark = [pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_pipeline_run):
    """(config, workdir): a copy of the session's tiny pipeline run (shapes scenes, to a 4-step LM), which `generate`
    writes into."""
    return tiny_pipeline_config(), str(copy_run(tiny_pipeline_run, tmp_path_factory.mktemp("run") / "run"))


@pytest.fixture(scope="module")
def generator(run):
    from cm3jax.inference.generate import Generator

    return Generator.load(*run)


def _cli(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run([sys.executable, "-m", "cm3jax", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_generate_image_cli_writes_images_a_contact_sheet_and_settings(run):
    config, workdir = run
    overrides = ["--config=configs/tiny.py", f"--workdir={workdir}", *config_flags(config, tiny.get_config())]
    done = _cli("generate", "image", *overrides, "--prompt=a small blue square", "--num=3", "--cfg=2.5")
    assert done.returncode == 0, done.stdout + done.stderr
    out_dir = done.stdout.strip().splitlines()[-1].split("written to ")[-1]
    assert sorted(os.listdir(out_dir)) == ["000.png", "001.png", "002.png", "settings.json", "sheet.png"]
    assert np.asarray(PIL.Image.open(os.path.join(out_dir, "sheet.png"))).shape == (32, 96, 3)
    settings = json.load(open(os.path.join(out_dir, "settings.json")))
    assert settings["prompt"] == "a small blue square" and settings["generate"]["guidance"] == "cfg"
    assert settings["generate"]["cfg_scale"] == 2.5 and settings["step"] == 4 and settings["model"] == "lm"


@pytest.mark.parametrize("args,message", [
    (["image", "--prompt=  "], "non-empty --prompt"),
    (["caption", "--image=/no/such.png"], "existing image file"),
    (["infill", "--image=README.md", "--box=1,2,3"], "--box x0,y0,x1,y1"),
])
def test_bad_generate_requests_get_one_line_errors(run, args, message):
    _, workdir = run
    done = _cli("generate", *args, "--config=configs/tiny.py", f"--workdir={workdir}")
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_a_workdir_without_a_model_gets_a_one_line_error(tmp_path):
    done = _cli("generate", "image", "--prompt=a red circle", "--config=configs/tiny.py", f"--workdir={tmp_path}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "no trained model" in done.stderr and "run `cm3jax train`" in done.stderr


def test_text_tasks_return_text_and_never_image_codes(generator, run):
    config, workdir = run
    image = os.path.join(workdir, "probe.png")
    PIL.Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(image)
    for style in ("infill", "continue"):
        prompt = generator.prompter.caption(generator.encode_image(image), style, 12)
        out, lengths = generator.run(prompt, 2, SamplingOptions(temperature=1.0, guidance="none"), seed=0)
        for row, n in zip(out, lengths):
            assert not np.any(generator.vocab.modality(row[:n]) == vocab_lib.MODALITY_IMAGE)
    assert isinstance(generator.caption(image), str)
    assert isinstance(generator.answer(image, "what colour is the circle?"), str)
    with pytest.raises(ValueError, match="cannot read the image"):
        generator.caption(os.path.join(workdir, "vqgan"))


def test_a_prompt_longer_than_the_models_positions_is_a_clear_error(generator):

    prompt = generator.prompter.text_to_image("a large red circle in the center " * 40)  # far over 160 positions
    with pytest.raises(BadInputError, match="model.max_seq_len"):
        generator.run(prompt, 1, SamplingOptions(temperature=1.0, guidance="cfg"), seed=0)


def test_infill_regenerates_only_the_box(generator):
    image = np.full((32, 32, 3), 200, np.uint8)
    codes = generator.encode_image(image)
    box = (1, 0, 3, 2)  # code rows 1-2, columns 0-1 of the 4x4 grid
    prompt = generator.prompter.infill(codes, box)
    out, _ = generator.run(prompt, 3, SamplingOptions(temperature=1.0, guidance="none"), seed=1)
    v = generator.vocab
    for row in out:
        # <mask:0> is in the prompt; then 2 codes <eoss> <mask:1> 2 codes <eoss>.
        assert list(row[[2, 3, 6]]) == [vocab_lib.EOSS, v.mask_id(1), vocab_lib.EOSS]
        filled = generator.prompter.fill_box(codes, box, row, v)
        outside = np.ones_like(codes, bool)
        outside[1:3, 0:2] = False
        np.testing.assert_array_equal(filled[outside], codes[outside])
    assert generator.infill(image, (0, 8, 16, 24), SamplingOptions(guidance="none"), num=2).shape == (2, 32, 32, 3)
    with_grid = copy.copy(generator)
    with_grid.decoder_config = dataclasses.replace(generator.decoder_config, image_grid_cells=16)
    with pytest.raises(BadInputError, match="model.image_grid_embedding"):
        with_grid.infill(image, (0, 8, 16, 24), SamplingOptions(guidance="none"))


def test_retrieval_augmented_prompt_and_reranking_keep_the_best_candidates(generator):
    options = SamplingOptions(temperature=1.0, guidance="none")
    caption = "a yellow square in the center"
    _, candidates = generator.images(caption, 4, options, seed=3)
    _, kept = generator.images(caption, 2, options, seed=3, candidates=4)
    scores = generator.caption_image_scores(caption, candidates)
    np.testing.assert_array_equal(kept, candidates[np.argsort(-scores, kind="stable")[:2]])
    context_prompt = generator.prompter.text_to_image(caption, np.array([vocab_lib.EOS, 50, vocab_lib.EOS]))
    assert list(context_prompt.streams[0][:3]) == [vocab_lib.EOS, 50, vocab_lib.EOS]
    assert list(context_prompt.streams[1]) == [vocab_lib.EOS, generator.vocab.mask_id(0), vocab_lib.BREAK]
    images, codes = generator.images(caption, 2, options, seed=0, retrieve=2)
    assert images.shape == (2, 32, 32, 3) and codes.shape == (2, 4, 4)


def test_samples_stage_writes_images_and_captions(run, generator, tmp_path):
    from cm3jax.inference.samples import write_samples

    config, workdir = run
    config = config.copy_and_resolve_references()
    config.generate.update(sample_prompts=("a red circle", "two green triangles"), num=2, sample_captions=3,
                           rerank_candidates=4)
    summary = write_samples(config, workdir, str(tmp_path))
    sheet = np.asarray(PIL.Image.open(summary["images"]))
    assert sheet.shape == (64, 64, 3)
    # The first row is the config's sampling with its re-ranking: the best 2 of 4 draws for the first prompt.
    best, _ = generator.images("a red circle", 2, SamplingOptions.from_config(config.generate),
                               seed=config.generate.seed, candidates=4)
    np.testing.assert_array_equal(sheet[:32], np.concatenate(list(best), axis=1))
    captions = json.load(open(summary["captions"]))
    assert len(captions) == 3 and all(set(c) == {"reference", "generated"} for c in captions)
