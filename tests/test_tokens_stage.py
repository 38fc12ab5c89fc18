"""The tokens stage (`cm3jax tokenize`): documents that round-trip through the shards, resumption, a changed vocabulary
refused, the image tokenizer's codes, and every kind of bad record counted."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from cm3jax import vocab as vocab_lib
from cm3jax.data.documents import decode_document_record, validate_document
from cm3jax.data.shards import open_token_shards
from cm3jax.data.sources import SkipCounts, open_raw_source, read_examples
from cm3jax.errors import DamagedCheckpointError, MissingInputError
from cm3jax.models.vqgan import VQGAN, pixels_from_uint8, uint8_from_pixels
from cm3jax.stages.tokens import tokenize_dataset
from cm3jax.tokenizers.image import ImageTokenizer
from cm3jax.tokenizers.text import TextTokenizer
from cm3jax.workdir import Workdir

from helpers import copy_run

pytestmark = [pytest.mark.slow]


def test_tokenize_writes_documents_that_round_trip(tiny_config, tiny_vqgan_run, tmp_path):
    trained_workdir = copy_run(tiny_vqgan_run, tmp_path / "run")
    tiny_config.tokenize.update(splits=("validation",), batch_size=16, shard_size=120)
    manifest = tokenize_dataset(tiny_config, Workdir(trained_workdir), jax.devices()[:2])
    assert manifest["splits"]["validation"] == {"raw_examples": 200, "documents_written_now": 200, "skipped": {},
                                                "shards": 2}
    assert manifest["code_grid"] == 4 and json.load(open(trained_workdir / "tokens" / "manifest.json")) == manifest
    again = tokenize_dataset(tiny_config, Workdir(trained_workdir), jax.devices()[:2])  # resumes: both shards kept
    assert again["splits"]["validation"]["documents_written_now"] == 0
    vocab = vocab_lib.UnifiedVocab.from_config(tiny_config.vocab)
    assert vocab_lib.UnifiedVocab.load(str(trained_workdir / "tokens")) == vocab
    changed = ml_collections.ConfigDict(tiny_config.to_dict())
    changed.vocab.image_codebook_size *= 2
    with pytest.raises(vocab_lib.VocabMismatchError, match="vocab.image_codebook_size"):
        tokenize_dataset(changed, Workdir(trained_workdir), jax.devices()[:2])  # would mix two id layouts

    text = TextTokenizer.load(str(trained_workdir / "text_tokenizer" / "text.model"))
    assert text.vocab_size <= vocab.text_size
    records = open_token_shards(str(trained_workdir / "tokens"), "validation")
    raw = open_raw_source(tiny_config.raw_data, "validation", str(trained_workdir / "data"))
    tokenizer = ImageTokenizer.load(tiny_config, Workdir(trained_workdir))
    params, model = tokenizer.params, VQGAN(tokenizer.model_config)
    for i in (0, 57, 199):
        document, meta = decode_document_record(records[i])
        validate_document(document, vocab)  # ids inside their modality's range
        example = next(read_examples(raw, 32, SkipCounts(), [meta["index"]]))
        assert text.decode(vocab.text_pieces(document[0].tokens)) == example.caption
        codes = vocab.image_codes(document[1].tokens).reshape(1, 4, 4)
        np.testing.assert_array_equal(tokenizer.encode(example.image[None]), codes)
        reconstruction = model.apply({"params": params}, pixels_from_uint8(example.image[None]))[0]
        np.testing.assert_allclose(model.apply({"params": params}, codes, method=model.decode), reconstruction,
                                   atol=1e-4)  # decode(shard codes) is the VQ-GAN's reconstruction of the image
        np.testing.assert_array_equal(tokenizer.decode(codes), uint8_from_pixels(reconstruction))


def test_an_exported_image_tokenizer_is_the_trained_one(tiny_config, tiny_vqgan_run, tmp_path):
    trained = ImageTokenizer.load(tiny_config, Workdir(tiny_vqgan_run))
    trained.save(tmp_path / "exported")
    exported = ImageTokenizer.from_exported(tmp_path / "exported")
    assert (exported.model_config, exported.step, exported.digest()) == (trained.model_config, trained.step,
                                                                         trained.digest())
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    codes = trained.encode(images)
    np.testing.assert_array_equal(exported.encode(images), codes)
    np.testing.assert_array_equal(exported.decode(codes), trained.decode(codes))
    with pytest.raises(MissingInputError, match="no exported image tokenizer"):
        ImageTokenizer.from_exported(tmp_path)
    saved = tmp_path / "exported" / "image_tokenizer.json"
    saved.write_text(saved.read_text().replace(trained.digest(), "0" * 64))  # parameters that are not these
    with pytest.raises(DamagedCheckpointError, match="not the ones saved"):
        ImageTokenizer.from_exported(tmp_path / "exported")


def test_tokenize_summary_counts_every_kind_of_bad_record(tiny_config, tiny_vqgan_run, tmp_path):
    from test_sources import write_bad_corpus

    expected = write_bad_corpus(tmp_path / "corpus")
    os.symlink(tiny_vqgan_run / "vqgan", tmp_path / "vqgan")
    tiny_config.raw_data.update(dataset="image_folder", paths=str(tmp_path / "corpus"))
    tiny_config.tokenize.update(splits=("train",), batch_size=4, shard_size=4)
    manifest = tokenize_dataset(tiny_config, Workdir(tmp_path), jax.devices()[:1])
    assert manifest["splits"]["train"] == {"raw_examples": 9, "documents_written_now": 3, "skipped": expected,
                                           "shards": 3}


def test_shards_keep_the_scenes_fields_with_their_images_as_codes(tiny_pipeline_run):
    from cm3jax.data.record_meta import meta_image_ids

    from helpers import tiny_pipeline_config

    config, workdir = tiny_pipeline_config(), Workdir(tiny_pipeline_run)
    vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
    tokenizer = ImageTokenizer.load(config, workdir)
    raw = open_raw_source(config.raw_data, "validation", str(workdir.data))
    records = open_token_shards(str(workdir.tokens), "validation")
    for i in range(4):
        document, meta = decode_document_record(records[i])
        example = next(read_examples(raw, 32, SkipCounts(), [meta["index"]]))
        assert meta["vqa"] == example.meta["vqa"] and meta["objects"] == example.meta["objects"]
        assert meta["edit"]["instruction"] == example.meta["edit"]["instruction"]
        for stored, image in ((meta["edit"]["image"], example.meta["edit"]["image"]),
                              (meta["segmentation"], example.meta["segmentation"])):
            ids = meta_image_ids(stored)
            np.testing.assert_array_equal(vocab.image_codes(ids), tokenizer.encode(image[None]).reshape(-1))


def test_tokens_made_from_other_raw_data_or_other_shards_are_refused_and_only_listed_shards_read(
        tiny_config, tiny_vqgan_run, tmp_path):
    """Cutting one corpus into 3 shards then 2 in one folder, or a changed raw_data with as many shards, would mix
    two datasets' shards: refused, nothing written; readers take the shards manifest.json lists."""
    from cm3jax.errors import BadInputError
    from cm3jax.workdir import ChangedInputsError

    from test_sources import write_bad_corpus

    for corpus in ("corpus", "other_corpus"):
        write_bad_corpus(tmp_path / corpus)
    os.symlink(tiny_vqgan_run / "vqgan", tmp_path / "vqgan")
    tiny_config.raw_data.update(dataset="image_folder", paths=str(tmp_path / "corpus"))
    tiny_config.tokenize.update(splits=("train",), batch_size=4, shard_size=4)
    workdir = Workdir(tmp_path)
    manifest = tokenize_dataset(tiny_config, workdir, jax.devices()[:1])
    assert manifest["splits"]["train"]["shards"] == 3
    files = sorted(os.listdir(workdir.tokens.path))
    # Another shard size that cuts as many shards would still move every shard's examples.
    examples = manifest["inputs"]["raw_data"]["splits"]["train"]["examples"]
    same_count = next(size for size in range(1, examples) if size != 4 and -(-examples // size) == 3)
    for field, value in (("tokenize.shard_size", 5), ("tokenize.shard_size", same_count),
                         ("raw_data.paths", str(tmp_path / "other_corpus"))):
        config = tiny_config.copy_and_resolve_references()
        section, name = field.split(".")
        config[section][name] = value
        with pytest.raises(ChangedInputsError, match="raw_data: "):
            tokenize_dataset(config, workdir, jax.devices()[:1])
        assert sorted(os.listdir(workdir.tokens.path)) == files
    assert len(open_token_shards(str(workdir.tokens), "train")) == 3
    # A foreign set of shards beside the listed ones is not read; without the manifest it is refused.
    other = tmp_path / "copy"
    os.makedirs(other)
    shards = [name for name in files if name.endswith(".array_record")]
    for name in shards:
        os.symlink(workdir.tokens.path / name, other / name.replace("-of-00003", "-of-00002"))
    os.symlink(workdir.tokens.path / shards[0], other / shards[0])
    with pytest.raises(BadInputError, match="2 sets"):
        open_token_shards(str(other), "train")
    (other / "manifest.json").write_text(json.dumps({"splits": {"train": {"shards": 3}}}))
    with pytest.raises(BadInputError, match="lists 3 train shards"):
        open_token_shards(str(other), "train")


def test_a_refused_tokenize_writes_nothing(tiny_config, tmp_path):
    """Without a trained VQ-GAN nothing is made: no text tokenizer trained, no tokens folder, no checkpoint folder."""
    from test_sources import write_bad_corpus

    write_bad_corpus(tmp_path / "corpus")
    tiny_config.raw_data.update(dataset="image_folder", paths=str(tmp_path / "corpus"))
    tiny_config.tokenize.splits = ("train",)
    with pytest.raises(MissingInputError, match="cm3jax vqgan"):
        tokenize_dataset(tiny_config, Workdir(tmp_path / "run"), jax.devices()[:1])
    assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")

