"""Documents and the CM3 objective, checked over many random documents."""
import math

import numpy as np
import pytest

from cm3jax import vocab as vocab_lib
from cm3jax.data import cm3
from cm3jax.data.documents import (
    decode_document_record,
    encode_document_record,
    fit_to_budget,
    image_segment,
    rotate_caption_image,
    serialize_document,
    text_segment,
)

VOCAB = vocab_lib.UnifiedVocab(text_size=100, image_codebook_size=50, num_masks=16)


def random_document(rng, max_segments=4, max_len=40):
    document = []
    for _ in range(rng.integers(1, max_segments + 1)):
        n = int(rng.integers(1, max_len + 1))
        if rng.random() < 0.5:
            document.append(text_segment(VOCAB.text_ids(rng.integers(0, VOCAB.text_size, n))))
        else:
            document.append(image_segment(VOCAB.image_ids(rng.integers(0, VOCAB.image_codebook_size, n))))
    return document


def undo_cm3(tokens, num_spans):
    """Puts every span back in place of its <mask:i>; the inverse of the CM3 reordering."""
    tokens = list(tokens)
    if num_spans == 0:
        return tokens
    first_appended = tokens.index(VOCAB.mask_id(0), tokens.index(VOCAB.mask_id(0)) + 1)
    body, tail = tokens[:first_appended], tokens[first_appended:]
    spans, i = {}, 0
    while tail[i] != vocab_lib.EOS:
        mask = tail[i]
        end = tail.index(vocab_lib.EOSS, i)
        spans[mask] = tail[i + 1:end]
        i = end + 1
    assert i == len(tail) - 1  # nothing after the final <eos>
    restored = []
    for t in body:
        restored += spans.pop(t) if t in spans else [t]
    assert not spans  # every appended span had its mask in the body
    return restored + [vocab_lib.EOS]


def test_cm3_keeps_every_token_once_and_spans_stay_in_one_segment():
    rng = np.random.default_rng(0)
    options = cm3.CM3Options(poisson_lambda=1.5, min_spans=0, max_spans=16)
    masked_documents = 0
    for _ in range(500):
        document = random_document(rng)
        spans = cm3.sample_spans([len(s.tokens) for s in document], cm3.draw_span_count(rng, options), rng)
        tokens, weights, _ = cm3.cm3_mask_document(document, spans, VOCAB)
        masked_documents += bool(spans)
        # Every original token appears exactly once: in place, or in its appended span.
        assert undo_cm3(tokens, len(spans)) == serialize_document(document).tolist()
        assert len(tokens) == len(serialize_document(document)) + cm3.TOKENS_ADDED_PER_SPAN * len(spans)
        for span in spans:
            assert 0 <= span.start < span.end <= len(document[span.segment].tokens)
            assert vocab_lib.BREAK not in document[span.segment].tokens[span.start:span.end].tolist()
        for a, b in zip(spans, spans[1:]):  # sorted, non-overlapping
            assert (a.segment, a.end) <= (b.segment, b.start)
        # Zero weight exactly on predicting a mask token.
        np.testing.assert_array_equal(weights == 0, VOCAB.is_mask(tokens))
        assert np.sum(VOCAB.is_mask(tokens)) == 2 * len(spans)
    assert masked_documents > 250


def test_image_cells_follow_every_code_through_the_reordering():
    """Each image code keeps its raster index in its image, in place, after a span cut out of it and in the span
    moved to the end (codes 0..n-1 in order make a code's cell its value)."""
    rng = np.random.default_rng(1)
    options = cm3.CM3Options(poisson_lambda=3.0, min_spans=1, max_spans=16)
    cut_images = 0
    for _ in range(300):
        document = [text_segment(VOCAB.text_ids(rng.integers(0, VOCAB.text_size, int(rng.integers(1, 10)))))
                    if rng.random() < 0.4 else image_segment(VOCAB.image_ids(np.arange(int(rng.integers(1, 50)))))
                    for _ in range(int(rng.integers(1, 5)))]
        spans = cm3.sample_spans([len(s.tokens) for s in document], cm3.draw_span_count(rng, options), rng)
        masked = cm3.cm3_mask_document(document, spans, VOCAB)
        is_image = VOCAB.modality(masked.tokens) == vocab_lib.MODALITY_IMAGE
        np.testing.assert_array_equal(masked.image_cells[is_image], VOCAB.image_codes(masked.tokens[is_image]))
        assert np.all(masked.image_cells[~is_image] == 0)
        cut_images += any(document[s.segment].modality == vocab_lib.MODALITY_IMAGE and s.start > 0 for s in spans)
    assert cut_images > 50


def test_span_count_follows_clamped_poisson():
    rng = np.random.default_rng(1)
    lam, lo, hi, n = 1.0, 1, 16, 4000
    counts = np.zeros(hi + 1)
    for _ in range(n):
        k = cm3.draw_span_count(rng, cm3.CM3Options(lam, lo, hi))
        counts[len(cm3.sample_spans([300, 300], k, rng))] += 1
    pmf = np.array([math.exp(-lam) * lam ** k / math.factorial(k) for k in range(hi + 1)])
    expected = np.zeros(hi + 1)
    expected[lo] = pmf[:lo + 1].sum()  # clamped up to min_spans
    expected[lo + 1:] = pmf[lo + 1:]
    # Standard error of a frequency at n=4000 is <= 0.008; allow 4 of them.
    np.testing.assert_allclose(counts / n, expected, atol=0.03)


def test_whole_caption_of_the_query_document_is_a_span_at_the_configured_rate():
    rng = np.random.default_rng(2)
    retrieved = [text_segment(VOCAB.text_ids([1, 2, 3])), image_segment(VOCAB.image_ids(np.arange(8)))]
    query = [image_segment(VOCAB.image_ids(np.arange(8))), text_segment(VOCAB.text_ids([4, 5, 6, 7]))]
    document = retrieved + query
    options = cm3.CM3Options(whole_text_probability=0.3)
    n, hits = 3000, 0
    for _ in range(n):
        required = cm3.whole_text_span(document, len(retrieved), options, rng)
        spans = cm3.sample_spans([len(s.tokens) for s in document], 3, rng, (required,) if required else ())
        if required is not None:
            hits += 1
            assert required == cm3.Span(3, 0, 4) and required in spans
            tokens = cm3.cm3_mask_document(document, spans, VOCAB)[0].tolist()
            mask = VOCAB.mask_id(spans.index(required))
            # In place: the query's <break> then <mask:i>; appended: <mask:i> caption <eoss>.
            assert tokens[tokens.index(mask) - 1] == vocab_lib.BREAK
            appended = tokens.index(mask, tokens.index(mask) + 1)
            assert tokens[appended:appended + 6] == [mask, *VOCAB.text_ids([4, 5, 6, 7]), vocab_lib.EOSS]
        for a, b in zip(spans, spans[1:]):
            assert (a.segment, a.end) <= (b.segment, b.start)
    # Standard error at n=3000 is 0.008; allow 4 of them.
    assert abs(hits / n - 0.3) < 0.035
    assert cm3.whole_text_span(query[:1], 0, cm3.CM3Options(whole_text_probability=1.0), rng) is None  # no text
    assert cm3.whole_text_span(document, 0, cm3.CM3Options(), rng) is None  # off by default


def test_cm3_without_spans_is_the_plain_document():
    document = [text_segment(VOCAB.text_ids([1, 2])), image_segment(VOCAB.image_ids([3, 4, 5]))]
    tokens, weights, _ = cm3.cm3_mask_document(document, [], VOCAB)
    assert tokens.tolist() == [vocab_lib.EOS, *VOCAB.text_ids([1, 2]), vocab_lib.BREAK, *VOCAB.image_ids([3, 4, 5]),
                               vocab_lib.EOS]
    assert weights.tolist() == [1.0] * len(tokens)


def test_record_round_trip_and_rotation():
    document = [text_segment(VOCAB.text_ids([5, 6, 7])), image_segment(VOCAB.image_ids([1, 2]))]
    decoded, meta = decode_document_record(encode_document_record(document, {"label": 3}))
    assert meta == {"label": 3}
    assert [(s.modality, s.tokens.tolist()) for s in decoded] == [(s.modality, s.tokens.tolist()) for s in document]
    rng = np.random.default_rng(0)
    image_first = [rotate_caption_image(document, rng, 0.3)[0].modality == vocab_lib.MODALITY_IMAGE
                   for _ in range(2000)]
    assert abs(np.mean(image_first) - 0.3) < 0.04
    three = document + [image_segment(VOCAB.image_ids([9]))]
    assert rotate_caption_image(three, rng, 1.0) is three  # not a caption-image pair: order kept


def test_fit_to_budget_cuts_text_never_an_image():
    text = text_segment(VOCAB.text_ids(np.arange(30)))
    image = image_segment(VOCAB.image_ids(np.arange(20)))
    fitted, report = fit_to_budget([text, image], max_tokens=30)  # 2 <eos> + 1 <break> + 20 image + 7 text
    assert [len(s.tokens) for s in fitted] == [7, 20]
    assert fitted[0].tokens.tolist() == text.tokens[:7].tolist()  # the caption's start is kept
    assert report.text_tokens_cut == 23 and report.segments_dropped == 0
    fitted, report = fit_to_budget([text, image, image], max_tokens=30)  # two images cannot both fit
    assert [len(s.tokens) for s in fitted] == [7, 20]  # the last image is dropped whole, then text is cut
    assert report.text_tokens_cut == 23 and report.segments_dropped == 1
    fitted, report = fit_to_budget([image, text], max_tokens=10)  # the image alone is too long
    assert fitted == [] and report.segments_dropped == 2


def test_segment_rejects_unknown_modality():
    with pytest.raises(ValueError, match="modality"):
        text_segment([1]).__class__(vocab_lib.MODALITY_SPECIAL, np.array([1]))
