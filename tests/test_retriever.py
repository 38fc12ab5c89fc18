"""The dual-encoder retriever and the `cm3jax retrieve` stage on a synthetic labelled bank: each document's caption
holds a piece naming its label among random pieces, and its image is the label's code grid with a quarter of the
codes replaced, so matching a caption to an image of its label has to be learned from both towers."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3jax import vocab as vocab_lib
from cm3jax.data.documents import decode_document_record, encode_document_record, image_segment, text_segment
from cm3jax.data.shards import write_token_shards
from cm3jax.models.retriever import DualEncoder, RetrieverConfig, tower_input
from cm3jax.retrieval.memory import MemoryBank, prepend_retrieved
from cm3jax.stages.retrieval import build_retrieval
from cm3jax.train.retriever import contrastive_sums
from cm3jax.workdir import Workdir

from helpers import launch_command

pytestmark = [pytest.mark.slow]

LABELS, TRAIN, VALIDATION = 10, 320, 80
LABEL_PIECE = 300  # caption piece 300 + label names the label; the other pieces are noise


def labelled_documents(vocab, image_tokens, count, seed):
    rng = np.random.default_rng(seed)
    prototypes = np.random.default_rng(99).integers(0, vocab.image_codebook_size, (LABELS, image_tokens))
    records = []
    for _ in range(count):
        label = int(rng.integers(LABELS))
        pieces = rng.integers(0, 100, 5)
        pieces[rng.integers(5)] = LABEL_PIECE + label
        codes = prototypes[label].copy()
        noisy = rng.random(image_tokens) < 0.25
        codes[noisy] = rng.integers(0, vocab.image_codebook_size, noisy.sum())
        document = [text_segment(vocab.text_ids(pieces)), image_segment(vocab.image_ids(codes))]
        records.append(encode_document_record(document, {"label": label}))
    return records


def label_of(document, vocab):
    pieces = vocab.text_pieces(document[0].tokens)
    return int(pieces[pieces >= LABEL_PIECE][0] - LABEL_PIECE)


@pytest.fixture(scope="module")
def config():
    from configs import tiny

    c = tiny.get_config()
    c.data.source = "token_shards"
    c.retriever.train.update(global_batch_size=32, steps=150, eval_every=75, log_every=75, checkpoint_every=75)
    c.retriever.optim.update(peak_lr=3e-3, warmup_steps=10)
    c.retrieval.update(chunk_size=100, duplicate_threshold=0.995)
    return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, config):
    """A workdir with token shards, after `cm3jax retrieve`; the stage's summary is in workdir/summary."""
    root = str(tmp_path_factory.mktemp("retrieve"))
    vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
    image_tokens = RetrieverConfig.from_config(config).image_tower.max_seq_len
    token_dir = os.path.join(root, "tokens")
    vocab.save(token_dir)
    write_token_shards(labelled_documents(vocab, image_tokens, TRAIN, 0), token_dir, "train", 2)
    write_token_shards(labelled_documents(vocab, image_tokens, VALIDATION, 1), token_dir, "validation", 1)
    workdir_summary = build_retrieval(config, Workdir(root))
    return root, workdir_summary


def test_trained_retriever_matches_captions_to_images_of_their_label(workdir):
    _, summary = workdir
    # 10 labels: a random image has the caption's label ~10% of the time.
    assert summary["same_label_chance"] < 0.13
    assert summary["caption_to_image_same_label"] > 0.6
    assert summary["first_neighbour_same_label"] > 0.5
    assert summary["retriever_step"] == 150 and summary["bank_documents"] == TRAIN


def test_neighbour_files_cover_every_document_and_never_hold_the_document_itself(workdir):
    root, _ = workdir
    train = np.load(os.path.join(root, "retrieval", "neighbours-train.npy"))
    validation = np.load(os.path.join(root, "retrieval", "neighbours-validation.npy"))
    assert train.shape == (TRAIN, 3) and validation.shape == (VALIDATION, 3)
    assert np.all((train >= -1) & (train < TRAIN)) and np.all((validation >= -1) & (validation < TRAIN))
    assert not np.any(train == np.arange(TRAIN)[:, None])
    assert np.mean(train[:, 0] >= 0) > 0.9


def test_an_interrupted_stage_recomputes_only_missing_chunks(workdir, config):
    root, _ = workdir
    folder = os.path.join(root, "retrieval", "neighbours")
    before = np.load(os.path.join(root, "retrieval", "neighbours-train.npy"))
    kept = {p: os.path.getmtime(os.path.join(folder, p)) for p in os.listdir(folder) if p != "train-00001.npy"}
    os.remove(os.path.join(folder, "train-00001.npy"))
    os.remove(os.path.join(root, "retrieval", "neighbours-train.npy"))
    build_retrieval(config, Workdir(root))
    np.testing.assert_array_equal(np.load(os.path.join(root, "retrieval", "neighbours-train.npy")), before)
    assert {p: os.path.getmtime(os.path.join(folder, p)) for p in kept} == kept


def _retrieval_outputs(root):
    folder = os.path.join(root, "retrieval")
    chunks = sorted(os.listdir(os.path.join(folder, "bank")))
    bank = [np.load(os.path.join(folder, "bank", p))["vectors"] for p in chunks]
    return {"bank": np.concatenate(bank),
            **{split: np.load(os.path.join(folder, f"neighbours-{split}.npy")) for split in ("train", "validation")}}


def _copy_trained_retriever(root, to):
    shutil.copytree(os.path.join(root, "tokens"), os.path.join(to, "tokens"))
    shutil.copytree(os.path.join(root, "retrieval", "retriever"), os.path.join(to, "retrieval", "retriever"))
    return str(to)


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["exact", "scann"])
def test_neighbours_do_not_depend_on_chunks_processes_or_resumption(workdir, config, tmp_path, kind):
    """The trained retriever, four ways: one chunk; chunks of 24 documents (which split the encoder's batches of 16);
    the same after losing a bank chunk, some neighbour chunks and the index; 2 processes."""
    root, _ = workdir
    one_chunk = config.copy_and_resolve_references()
    one_chunk.retrieval.update(chunk_size=10_000, index_kind=kind)
    build_retrieval(one_chunk, Workdir(_copy_trained_retriever(root, tmp_path / "one")))
    reference = _retrieval_outputs(str(tmp_path / "one"))

    chunked = config.copy_and_resolve_references()
    chunked.retrieval.update(chunk_size=24, index_kind=kind)
    many = _copy_trained_retriever(root, tmp_path / "many")
    build_retrieval(chunked, Workdir(many))
    folder = os.path.join(many, "retrieval")
    for lost in ("bank/train-00003.npz", "neighbours/train-00000.npy", "neighbours/train-00005.npy",
                 "neighbours/validation-00002.npy", "neighbours-train.npy", "neighbours-validation.npy"):
        os.remove(os.path.join(folder, lost))
    shutil.rmtree(os.path.join(folder, "index"))
    build_retrieval(chunked, Workdir(many))

    two = _copy_trained_retriever(root, tmp_path / "two")
    t = config.retriever.train
    launch_command(["retrieve", "--config.data.source=token_shards", "--config.data.restore_iterator=False",
                    f"--config.retriever.train.global_batch_size={t.global_batch_size}",
                    f"--config.retriever.train.steps={t.steps}", "--config.retrieval.chunk_size=24",
                    f"--config.retrieval.duplicate_threshold={config.retrieval.duplicate_threshold}",
                    f"--config.retrieval.index_kind={kind}"], two, num_processes=2, devices_per_process=1)

    assert reference["train"].shape == (TRAIN, 3) and np.mean(reference["train"][:, 0] >= 0) > 0.9
    for other in (_retrieval_outputs(many), _retrieval_outputs(two)):
        for key in reference:
            np.testing.assert_array_equal(other[key], reference[key], err_msg=key)


def test_memory_bank_retrieves_documents_for_a_prompt_ready_to_prepend(workdir, config):
    root, _ = workdir
    bank = MemoryBank.load(config, root)
    vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
    hits = 0
    for label in range(LABELS):
        prompt = [text_segment(vocab.text_ids(np.array([LABEL_PIECE + label, 5, 17])))]
        retrieved = bank.retrieve(prompt, k=2)
        assert 1 <= len(retrieved) <= 2
        hits += label_of(retrieved[0], vocab) == label
    assert hits >= 7
    prompt_tokens = np.array([vocab_lib.EOS, *vocab.text_ids(np.array([3, 4])), vocab_lib.BREAK])
    tokens = prepend_retrieved(retrieved, prompt_tokens)
    eos = np.flatnonzero(tokens == vocab_lib.EOS)
    assert eos[0] == 0 and len(eos) == len(retrieved) + 1 and np.array_equal(tokens[eos[-1]:], prompt_tokens)
    with pytest.raises(ValueError, match="start with <eos>"):
        prepend_retrieved(retrieved, prompt_tokens[1:])
    with pytest.raises(ValueError, match="dimension"):
        bank.retrieve(np.ones(3, np.float32))


def test_embeddings_computed_elsewhere_replace_the_retriever(workdir, config, tmp_path):
    root, _ = workdir
    shutil.copytree(os.path.join(root, "tokens"), tmp_path / "tokens")
    rng = np.random.default_rng(3)
    from cm3jax.data.shards import open_token_shards

    for split in ("train", "validation"):
        records = open_token_shards(str(tmp_path / "tokens"), split)
        labels = np.array([decode_document_record(records[i])[1]["label"] for i in range(len(records))])
        for part in ("text", "image"):
            vectors = np.eye(LABELS, 16)[labels] + 0.3 * rng.normal(size=(len(labels), 16))
            np.save(tmp_path / f"{split}-{part}.npy", vectors.astype(np.float32))
    external = config.copy_and_resolve_references()
    external.retrieval.embeddings = str(tmp_path / "{split}-{part}.npy")
    external.retrieval.duplicate_threshold = 0.99
    summary = build_retrieval(external, Workdir(tmp_path))
    assert summary["first_neighbour_same_label"] > 0.8 and "retriever_step" not in summary
    np.save(tmp_path / "validation-image.npy", np.ones((VALIDATION + 1, 16), np.float32))
    os.remove(tmp_path / "retrieval" / "neighbours-validation.npy")
    shutil.rmtree(tmp_path / "retrieval" / "neighbours")
    with pytest.raises(ValueError, match="81 rows but the split has 80 documents"):
        build_retrieval(external, Workdir(tmp_path))


def test_towers_read_only_the_masked_tokens_and_return_unit_vectors(config):
    model_config = RetrieverConfig.from_config(config)
    model = DualEncoder(model_config)
    length = model_config.text_tower.max_seq_len
    tokens, mask = (np.stack(x) for x in zip(tower_input(np.array([5, 9, 11]), None, length),
                                             tower_input(np.array([5, 9, 11, 7]), np.array([1, 1, 1, 0]), length)))
    image = np.zeros((2, model_config.image_tower.max_seq_len), np.int32)
    params = model.init(jax.random.key(0), tokens, mask, image, image >= 0)["params"]
    text, _, scale = model.apply({"params": params}, tokens, mask, image, image >= 0)
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(text[0], text[1], atol=1e-6)  # the dropped 4th token changes nothing
    np.testing.assert_allclose(scale, 1 / 0.07, rtol=1e-5)


def test_contrastive_loss_matches_a_reference_and_ignores_invalid_pairs():
    rng = np.random.default_rng(0)
    text, image = (rng.normal(size=(6, 4)).astype(np.float32) for _ in range(2))
    valid = np.array([1, 1, 1, 1, 0, 0], np.float32)
    sums = jax.device_get(contrastive_sums(jnp.asarray(text), jnp.asarray(image), 2.0, jnp.asarray(valid)))
    logits = 2.0 * text[:4] @ image[:4].T

    def cross_entropy(rows):
        return np.log(np.exp(rows).sum(axis=1)) - np.diagonal(rows)

    expected = 0.5 * (cross_entropy(logits) + cross_entropy(logits.T)).sum()
    np.testing.assert_allclose(sums["loss"], expected, rtol=1e-5)
    assert sums["pairs"] == 4
    assert sums["text_to_image_hits"] == np.sum(np.argmax(logits, axis=1) == np.arange(4))
