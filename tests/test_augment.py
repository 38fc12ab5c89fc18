"""Retrieval augmentation in the pipeline: retrieved documents first, each ended by <eos>, whole or not at all, the
query kept, K drawn as configured, loss weights as configured."""
import numpy as np
import pytest

from cm3jax import vocab as vocab_lib
from cm3jax.data import cm3
from cm3jax.data.augment import NeighbourRetrieval, NoRetrieval, assemble_sample
from cm3jax.data.documents import (
    decode_document_record,
    encode_document_record,
    image_segment,
    serialize_document,
    text_segment,
)
from cm3jax.data.pipeline import DocumentToExample, PipelineOptions

VOCAB = vocab_lib.UnifiedVocab(text_size=96, image_codebook_size=64, num_masks=8)
NO_SPANS = cm3.CM3Options(poisson_lambda=1.0, min_spans=0, max_spans=0)


def pair(rng, text_len=5, image_len=9):
    return [text_segment(VOCAB.text_ids(rng.integers(0, 96, text_len))),
            image_segment(VOCAB.image_ids(rng.integers(0, 64, image_len)))]


def test_assemble_fits_the_query_first_and_adds_whole_retrieved_documents():
    rng = np.random.default_rng(0)
    query, first, second = pair(rng, 30), pair(rng), pair(rng)
    # query: 2 <eos> + 39 tokens + 1 <break> = 42; each retrieved pair: 14 tokens + <break> + its <eos> = 16.
    sample = assemble_sample([first, second], query, max_tokens=42 + 16)
    assert sample.segments == first + query and sample.document_starts == {2}
    assert sample.retrieved_segments == 2 and sample.retrieved_dropped == 1
    assert len(serialize_document(sample.segments)) == 58
    tight = assemble_sample([first], query, max_tokens=40)  # the query's text is cut; nothing retrieved fits
    assert tight.segments[-1] is query[-1] and tight.retrieved_dropped == 1 and tight.report.text_tokens_cut == 2


def make_example(retrieval, seq_len=200, weight=1.0, image_first=0.0):
    options = PipelineOptions(seq_len=seq_len, global_batch_size=1, num_streams=1, cm3=NO_SPANS,
                              image_first_probability=image_first, retrieved_loss_weight=weight)
    return DocumentToExample(VOCAB, options, retrieval)


def test_augmented_sample_is_retrieved_then_query_with_weights_as_configured():
    rng = np.random.default_rng(1)
    bank = [encode_document_record(pair(rng)) for _ in range(20)]
    neighbours = np.array([[(i + 3) % 20, (i + 7) % 20, -1] for i in range(20)])
    make = make_example(NeighbourRetrieval(neighbours, bank, [0.0, 0.0, 1.0]), weight=0.5)
    example = make((0, 4, bank[4]))
    tokens = np.concatenate([example["inputs"][:1], example["targets"]])
    assert np.all(tokens < VOCAB.size) and np.all(tokens >= 0)
    parts = [decode_document_record(bank[i])[0] for i in (7, 11, 4)]  # neighbours 7 and 11, then the query 4
    expected = serialize_document(parts[0] + parts[1] + parts[2])
    eos_at = [16, 32]  # the <break>s that end documents 7 and 11 (16 tokens each with their <eos>) become <eos>
    expected[eos_at] = vocab_lib.EOS
    np.testing.assert_array_equal(tokens, expected)
    weights = example["loss_weights"]  # weight of predicting tokens[1:]
    np.testing.assert_array_equal(weights[:32], 0.5)  # retrieved tokens and the <eos> that ends each of them
    np.testing.assert_array_equal(weights[32:], 1.0)  # the query
    plain = make_example(NoRetrieval())((0, 4, bank[4]))
    np.testing.assert_array_equal(plain["targets"], example["targets"][32:])


def test_number_retrieved_follows_the_configured_distribution():
    rng = np.random.default_rng(2)
    bank = [encode_document_record(pair(rng)) for _ in range(50)]
    neighbours = np.stack([np.roll(np.arange(50), -i)[1:4] for i in range(50)])
    make = make_example(NeighbourRetrieval(neighbours, bank, [0.2, 0.3, 0.5]))
    counts = np.zeros(3)
    for g in range(900):
        tokens = make((g, g % 50, bank[g % 50]))["targets"]
        counts[np.sum(tokens == vocab_lib.EOS) - 1] += 1
    np.testing.assert_allclose(counts / 900, [0.2, 0.3, 0.5], atol=0.05)  # > 3 binomial sigmas


def test_neighbour_retrieval_rejects_bad_settings():
    with pytest.raises(ValueError, match="probabilities"):
        NeighbourRetrieval(np.zeros((2, 2), int), [], [0.5, 0.6])
    with pytest.raises(ValueError, match="only 2 neighbours"):
        NeighbourRetrieval(np.zeros((2, 2), int), [], [0.25, 0.25, 0.25, 0.25])


def test_retrieved_documents_are_dropped_whole_when_the_budget_is_short():
    rng = np.random.default_rng(3)
    bank = [encode_document_record(pair(rng)) for _ in range(5)]
    neighbours = np.array([[1, 2]] * 5)
    example = make_example(NeighbourRetrieval(neighbours, bank, [0, 0, 1]), seq_len=40)((0, 0, bank[0]))
    assert int(example["retrieved_dropped"]) == 1  # 16 + 16 + 17 tokens: the query and one neighbour fit in 41
    assert len(example["targets"]) == 32


def test_masked_spans_keep_the_weight_of_their_document():
    rng = np.random.default_rng(4)
    segments = pair(rng) + pair(rng)  # a retrieved pair, then the query pair
    spans = [cm3.Span(1, 2, 5), cm3.Span(2, 0, 2)]
    tokens, weights, _ = cm3.cm3_mask_document(segments, spans, VOCAB, frozenset({2}), [0.5, 0.5, 1.0, 1.0])
    first, second = (int(np.flatnonzero(tokens == VOCAB.mask_id(i))[-1]) for i in range(2))  # the moved copies
    np.testing.assert_array_equal(tokens[first + 1:first + 4], segments[1].tokens[2:5])
    np.testing.assert_array_equal(weights[first + 1:first + 5], 0.5)  # the retrieved span and its <eoss>
    np.testing.assert_array_equal(weights[second + 1:second + 4], 1.0)  # the query's span and its <eoss>
    assert np.all(weights[VOCAB.is_mask(tokens)] == 0)
    assert list(tokens).count(vocab_lib.EOS) == 3 and list(tokens).count(vocab_lib.BREAK) == 2


@pytest.mark.slow  # trains the LM
def test_lm_trains_with_neighbours_and_checks_their_file(tiny_config, tmp_path):
    import jax

    from cm3jax.data.pipeline import open_retrieval
    from cm3jax.data.shards import write_token_shards
    from cm3jax.data.synthetic import SyntheticDocumentSource
    from cm3jax.train.lm import train_language_model

    vocab = vocab_lib.UnifiedVocab.from_config(tiny_config.vocab)
    synthetic = SyntheticDocumentSource(vocab, num_records=40, text_len=4, image_tokens=6, text_pieces=40)
    tokens, retrieval = tmp_path / "tokens", tmp_path / "retrieval"
    write_token_shards((synthetic[i] for i in range(40)), str(tokens), "train", num_shards=2)
    write_token_shards((synthetic[i] for i in range(8)), str(tokens), "validation", num_shards=1)
    vocab.save(str(tokens))
    retrieval.mkdir()
    np.save(retrieval / "neighbours-train.npy", np.stack([(np.arange(40) + 1) % 40, (np.arange(40) + 2) % 40], 1))
    tiny_config.data.update(source="token_shards", token_dir=str(tokens), retrieval="neighbours",
                            neighbours_dir=str(retrieval))
    with pytest.raises(FileNotFoundError, match="neighbours-validation.npy"):
        open_retrieval(tiny_config.data, vocab, "validation", evaluation=True)
    np.save(retrieval / "neighbours-validation.npy", np.zeros((7, 2), int))
    with pytest.raises(ValueError, match="one row per record of the validation split"):
        open_retrieval(tiny_config.data, vocab, "validation", evaluation=True)
    np.save(retrieval / "neighbours-validation.npy", np.arange(16).reshape(8, 2))
    assert open_retrieval(tiny_config.data, vocab, "validation", evaluation=True).probs.tolist() == [0, 0, 1]
    tiny_config.train.update(steps=2, eval_every=2)
    result = train_language_model(tiny_config, str(tmp_path / "lm"), jax.devices()[:1])
    assert result.step == 2 and np.isfinite(result.last_metrics["loss"])
