"""The grain pipeline: packing, per-process streams, iterator restore, counters, token shards."""
import dataclasses
import json

import jax
import numpy as np
import pytest
from absl import flags

from cm3jax import vocab as vocab_lib
from cm3jax.config_validation import ConfigError
from cm3jax.data import cm3
from cm3jax.data.augment import NoRetrieval
from cm3jax.data.documents import encode_document_record, image_segment, text_segment
from cm3jax.data.pipeline import (
    DocumentBatches,
    DocumentToExample,
    PipelineOptions,
    local_streams,
    open_document_source,
    stream_indices,
)
from cm3jax.data.shards import open_token_shards, write_token_shards
from cm3jax.data.synthetic import SyntheticDocumentSource
from cm3jax.train.checkpoint import select_process_state
from cm3jax.train.lm import train_language_model

VOCAB = vocab_lib.UnifiedVocab(text_size=96, image_codebook_size=64, num_masks=8)
OPTIONS = PipelineOptions(seq_len=48, global_batch_size=8, num_streams=2, seed=3,
                          cm3=cm3.CM3Options(poisson_lambda=1.0, min_spans=0, max_spans=4))


def varied_source(n=64, seed=0):
    """Caption-image records of varied lengths, so packing has real choices to make."""
    rng = np.random.default_rng(seed)
    return [encode_document_record([
        text_segment(VOCAB.text_ids(rng.integers(0, 96, rng.integers(1, 12)))),
        image_segment(VOCAB.image_ids(rng.integers(0, 64, rng.choice([4, 9, 16])))),
    ]) for _ in range(n)]


def rows_to_segments(batch):
    """Each packed document of a batch as a tuple of its (input, target, weight) triples."""
    documents = []
    for r in range(batch["inputs"].shape[0]):
        seg = batch["segment_ids"][r]
        ids = [i for i in np.unique(seg) if i > 0]
        assert ids == list(range(1, len(ids) + 1))  # segments numbered 1..n from the left
        for i in ids:
            where = np.flatnonzero(seg == i)
            assert np.array_equal(where, np.arange(where[0], where[0] + len(where)))  # contiguous
            np.testing.assert_array_equal(batch["positions"][r, where], np.arange(len(where)))
            documents.append(tuple(zip(batch["inputs"][r, where].tolist(), batch["targets"][r, where].tolist(),
                                       batch["loss_weights"][r, where].tolist())))
        padding = seg == 0
        assert np.all(batch["loss_weights"][r, padding] == 0) and np.all(batch["inputs"][r, padding] == 0)
    return documents


def test_first_fit_packing_loses_no_token():
    source = varied_source()
    options = dataclasses.replace(OPTIONS, shuffle=False, num_streams=1)
    batches = DocumentBatches(source, VOCAB, options, rows=(0, 8))
    packed = [doc for _ in range(6) for doc in rows_to_segments(next(batches))]
    make = DocumentToExample(VOCAB, options, NoRetrieval())
    expected = []
    for g in range(len(packed)):
        e = make((g, g % len(source), source[g % len(source)]))
        expected.append(tuple(zip(e["inputs"].tolist(), e["targets"].tolist(), e["loss_weights"].tolist())))
    # First-fit emits every document it consumed, in bins: the packed documents are exactly the first ones.
    assert sorted(packed) == sorted(expected)
    assert len(packed) > 6 * 8  # several documents per row


def test_batches_follow_the_contract():
    batch = next(DocumentBatches(varied_source(), VOCAB, OPTIONS, rows=(0, 8)))
    assert set(batch) == {"inputs", "targets", "loss_weights", "image_cells", "segment_ids", "positions", "modality"}
    for key, value in batch.items():
        assert value.shape == (8, 48)
        assert value.dtype == (np.float32 if key == "loss_weights" else np.int32)
    np.testing.assert_array_equal(batch["modality"], VOCAB.modality(batch["targets"]))
    assert np.all(batch["loss_weights"][VOCAB.is_mask(batch["targets"])] == 0)
    is_image = VOCAB.modality(batch["inputs"]) == vocab_lib.MODALITY_IMAGE
    assert is_image.any() and batch["image_cells"][is_image].max() > 0 and np.all(batch["image_cells"][~is_image] == 0)


def test_pad_mode_keeps_one_document_per_row():
    options = dataclasses.replace(OPTIONS, packing="pad", shuffle=False, num_streams=1)
    batch = next(DocumentBatches(varied_source(), VOCAB, options, rows=(0, 8)))
    make = DocumentToExample(VOCAB, options, NoRetrieval())
    for r in range(8):
        expected = make((r, r, varied_source()[r]))
        n = len(expected["inputs"])
        np.testing.assert_array_equal(batch["inputs"][r, :n], expected["inputs"])
        np.testing.assert_array_equal(batch["segment_ids"][r], np.arange(48) < n)
        np.testing.assert_array_equal(batch["positions"][r, :n], np.arange(n))
        assert np.all(batch["loss_weights"][r, n:] == 0)


def test_processes_read_disjoint_streams_that_cover_the_data():
    assert list(local_streams((0, 4), OPTIONS)) == [0] and list(local_streams((4, 8), OPTIONS)) == [1]
    with pytest.raises(ValueError, match="num_streams"):
        local_streams((0, 3), OPTIONS)
    n = 64
    first_epoch = [[stream_indices(n, s, OPTIONS)[i] for i in range(n // 2)] for s in range(2)]
    sources = [{source for _, source in stream} for stream in first_epoch]
    assert sources[0].isdisjoint(sources[1]) and sources[0] | sources[1] == set(range(n))
    assert sorted(g for stream in first_epoch for g, _ in stream) == list(range(n))
    # The next epoch is shuffled afresh.
    second = [stream_indices(n, 0, OPTIONS)[i][1] for i in range(n // 2, n)]
    assert second != [source for _, source in first_epoch[0]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_restored_iterator_gives_the_same_next_batches(num_workers):
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    options = dataclasses.replace(OPTIONS, num_workers=num_workers)
    source = SyntheticDocumentSource(VOCAB, num_records=100, text_len=6, image_tokens=9, text_pieces=40)
    batches = DocumentBatches(source, VOCAB, options, rows=(0, 8))
    for _ in range(3):
        next(batches)
    state = json.loads(json.dumps(batches.get_state()))  # as the checkpoint's JSON `data` item stores it
    expected = [next(batches) for _ in range(3)]
    restored = DocumentBatches(source, VOCAB, options, rows=(0, 8))
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_truncation_is_counted():
    long_caption = encode_document_record([text_segment(VOCAB.text_ids(np.arange(90))),
                                           image_segment(VOCAB.image_ids(np.arange(16)))])
    options = dataclasses.replace(OPTIONS, cm3=cm3.CM3Options(0.0, 0, 0), num_streams=1)
    batches = DocumentBatches([long_caption] * 4, VOCAB, options, rows=(0, 8))
    batch = next(batches)
    # 90 text + 16 image + 3 specials = 109 tokens must fit 49: 60 text tokens cut from each document.
    assert batches.counters["text_tokens_cut"] == 60 * 8
    assert np.sum(batch["modality"] == vocab_lib.MODALITY_IMAGE) == 16 * 8  # images whole
    assert batches.get_state()["counters"]["text_tokens_cut"] == 60 * 8


def test_a_changed_process_count_is_a_clear_error():
    with pytest.raises(ConfigError, match="saved by 2 processes"):
        select_process_state({"process_count": 2, "processes": [{}, {}]})
    assert select_process_state({"process_count": 1, "processes": [{"a": 1}]}) == {"a": 1}


@pytest.mark.slow
def test_lm_trains_on_token_shards(tiny_config, tmp_path):
    vocab = vocab_lib.UnifiedVocab.from_config(tiny_config.vocab)
    synthetic = SyntheticDocumentSource(vocab, num_records=40, text_len=6, image_tokens=8, text_pieces=40)
    tokens = str(tmp_path / "tokens")
    paths = write_token_shards((synthetic[i] for i in range(40)), tokens, "train", num_shards=3)
    write_token_shards((synthetic[i] for i in range(8)), tokens, "validation", num_shards=1)
    assert len(paths) == 3 and len(open_token_shards(tokens, "train")) == 40
    tiny_config.data.update(source="token_shards", token_dir=tokens)
    with pytest.raises(FileNotFoundError, match="no vocab.json"):
        open_document_source(tiny_config.data, vocab, "train")
    vocab.save(tokens)
    tiny_config.train.update(steps=2, eval_every=2)
    result = train_language_model(tiny_config, str(tmp_path / "lm"), jax.devices()[:1])
    assert result.step == 2 and np.isfinite(result.last_metrics["loss"])
    assert vocab_lib.UnifiedVocab.load(str(tmp_path / "lm")) == vocab  # saved with the run
    with pytest.raises(FileNotFoundError, match="cm3jax tokenize"):
        open_document_source(tiny_config.data, vocab, "test")
    with pytest.raises(vocab_lib.VocabMismatchError, match=r"vocab.text_size=96 but \d+ there"):
        open_document_source(tiny_config.data, VOCAB, "train")
    tiny_config.vocab.num_masks += 1  # a resumed run with another layout stops before it loads anything
    with pytest.raises(vocab_lib.VocabMismatchError, match="vocab.num_masks"):
        train_language_model(tiny_config, str(tmp_path / "lm"), jax.devices()[:1])
