"""The retrieval strategy: no self, no near-duplicates, diversity, multimodal first, query modality and dropout."""
import numpy as np
import pytest

from cm3jax import vocab as vocab_lib
from cm3jax.data.documents import image_segment, text_segment
from cm3jax.retrieval.index import ExactIndex
from cm3jax.retrieval.neighbours import (
    Query,
    StrategyOptions,
    document_query,
    find_neighbours,
    query_modality,
    select_neighbours,
)

VOCAB = vocab_lib.UnifiedVocab(text_size=64, image_codebook_size=64, num_masks=4)
OPTIONS = StrategyOptions(num_neighbours=3, candidates=16)


def unit(v):
    v = np.asarray(v, np.float64)
    return (v / np.linalg.norm(v)).astype(np.float32)


def test_selection_skips_self_near_copies_and_redundant_candidates_and_puts_multimodal_first():
    e = np.eye(8, dtype=np.float32)
    bank = np.stack([e[0], e[1], e[2], e[3], unit(e[3] + 0.05 * e[4]), e[5], e[6]])
    multimodal = np.array([True, True, False, True, True, True, False])
    ids = np.array([1, 0, 2, 3, 4, 5, 6, -1])  # the query is a part of document 0, so 0 scores below 0.9
    scores = np.array([0.95, 0.85, 0.8, 0.7, 0.69, 0.6, 0.5, -np.inf], np.float32)
    chosen = select_neighbours(ids, scores, bank, multimodal, self_id=0, options=OPTIONS)
    # 0 is the document itself, 1 scores > 0.9 with the query, 4 is within 0.9 of the chosen 3; multimodal 3 and
    # 5 come before the better-scoring single-modality 2.
    assert list(chosen) == [3, 5, 2]
    few = select_neighbours(ids[:3], scores[:3], bank, multimodal, self_id=0, options=OPTIONS)  # 1, 0 and 2
    assert list(few) == [2, -1, -1]


def test_selection_properties_on_random_banks():
    rng = np.random.default_rng(0)
    for _ in range(30):
        bank = rng.normal(size=(300, 6)).astype(np.float32)
        bank[rng.integers(0, 300, 40)] = bank[rng.integers(0, 300, 40)]  # exact duplicates
        bank /= np.linalg.norm(bank, axis=1, keepdims=True)
        multimodal = rng.random(300) < 0.5
        self_id = int(rng.integers(300))
        query = unit(bank[self_id] + 0.6 * rng.normal(size=6))  # a part of the document: close, not identical
        scores, ids = ExactIndex(bank).search(query[None], 40)
        chosen = select_neighbours(ids[0], scores[0], bank, multimodal, self_id, OPTIONS)
        chosen = chosen[chosen >= 0]
        assert self_id not in chosen
        assert np.all(bank[chosen] @ query <= OPTIONS.duplicate_threshold + 1e-6)
        pairwise = bank[chosen] @ bank[chosen].T
        assert np.all(pairwise[~np.eye(len(chosen), dtype=bool)] <= OPTIONS.duplicate_threshold + 1e-6)
        kinds = multimodal[chosen]
        assert list(kinds) == sorted(kinds, reverse=True)  # no multimodal neighbour after a single-modality one


def test_query_is_one_modality_and_drops_a_fifth_of_its_tokens():
    rng = np.random.default_rng(1)
    text = VOCAB.text_ids(rng.integers(0, 64, 5000))
    image = VOCAB.image_ids(rng.integers(0, 64, 5000))
    document = [text_segment(text), image_segment(image)]
    drawn = [query_modality(document, rng) for _ in range(400)]
    assert 150 < drawn.count(vocab_lib.MODALITY_TEXT) < 250 and set(drawn) == {1, 2}
    assert query_modality([text_segment(text)], rng) == vocab_lib.MODALITY_TEXT
    for modality in (vocab_lib.MODALITY_TEXT, vocab_lib.MODALITY_IMAGE):
        query = document_query(7, document, modality, 0.2, rng)
        assert query.modality == modality and query.record_id == 7
        assert np.all(VOCAB.modality(query.tokens) == modality) and len(query.tokens) == 5000
        assert 0.78 < query.keep.mean() < 0.82  # binomial(5000, 0.8): 0.8 +- 0.017 at 3 sigma
    assert document_query(7, document, vocab_lib.MODALITY_TEXT, 1.0, rng).keep.sum() == 1
    with pytest.raises(ValueError, match="without text or image"):
        query_modality([], rng)


def bag_of_tokens(queries):
    """A stand-in retriever: normalised histograms of the kept tokens (text and image ids fall in different bins)."""
    vectors = np.stack([np.bincount(q.tokens[q.keep], minlength=VOCAB.size) for q in queries]).astype(
        np.float32) + 1e-3
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_find_neighbours_is_seeded_per_document():
    rng = np.random.default_rng(2)
    documents = [(i, [text_segment(VOCAB.text_ids(rng.integers(0, 64, 12))),
                      image_segment(VOCAB.image_ids(rng.integers(0, 64, 16)))]) for i in range(60)]
    whole = [np.concatenate([s.tokens for s in d]) for _, d in documents]
    bank = bag_of_tokens([Query(i, 0, t, np.ones(len(t), bool)) for i, t in enumerate(whole)])
    index, multimodal = ExactIndex(bank), np.ones(60, bool)
    together = find_neighbours(documents, bag_of_tokens, index, bank, multimodal, OPTIONS)
    in_parts = np.concatenate([find_neighbours(documents[:25], bag_of_tokens, index, bank, multimodal, OPTIONS),
                               find_neighbours(documents[25:], bag_of_tokens, index, bank, multimodal, OPTIONS)])
    np.testing.assert_array_equal(together, in_parts)
    assert together.shape == (60, 3) and not np.any(together == np.arange(60)[:, None])
    assert np.all(together >= 0)
