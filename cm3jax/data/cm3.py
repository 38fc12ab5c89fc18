"""The causally masked (CM3) objective, docs/paper.md §2, with CM3leon's rule that a span never crosses `<break>`.

Per document: n ~ Poisson(lambda) clamped to [min_spans, max_spans]. Candidate spans are drawn n^2 times and kept
greedily while they do not overlap, until n are kept (metaseq's procedure). A candidate picks a segment with probability
proportional to its length, then two uniform boundaries in [0, len] of that segment, sorted, as [start, end); so a span
lies inside one text or one image segment. Kept spans are numbered in document order; span i is replaced in place by
`<mask:i>` and appended after the document as `<mask:i> span tokens <eoss>`:

    <eos> seg_0 <break> ... <mask:0> ... <break> seg_k <mask:0> span_0 <eoss> <mask:1> span_1 <eoss> <eos>

The loss is next-token cross-entropy over the whole reordered sequence, with weight 0 wherever the target is a
`<mask:i>` (where a mask goes is not something to learn; what follows it is).

Option (not in the paper, default off): with probability `whole_text_probability` one of the spans is the whole first
text segment of the query document (the document after any retrieved ones). Uniform boundaries rarely cut a whole
caption, so the model otherwise seldom sees `<eos> <mask:0> <break> image`, which is the unconditional stream of
classifier-free guidance and the prompt of captioning by infilling; small models trained on little data need it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from cm3jax import vocab as vocab_lib
from cm3jax.config import default
from cm3jax.data.documents import Document

# Each span adds three tokens: the in-place <mask:i>, and <mask:i> ... <eoss> at the end.
TOKENS_ADDED_PER_SPAN = 3


@dataclasses.dataclass(frozen=True)
class CM3Options:
    poisson_lambda: float = default("data.cm3_poisson_lambda")
    min_spans: int = default("data.cm3_min_spans")  # CM3leon clamps the span count to [1, 16]; metaseq to [0, 511]
    max_spans: int = default("data.cm3_max_spans")
    whole_text_probability: float = default("data.cm3_whole_text_probability")

    @classmethod
    def from_config(cls, data_config) -> CM3Options:
        return cls(float(data_config.cm3_poisson_lambda), int(data_config.cm3_min_spans),
                   int(data_config.cm3_max_spans), float(data_config.cm3_whole_text_probability))


@dataclasses.dataclass(frozen=True)
class Span:
    segment: int
    start: int
    end: int  # exclusive


def draw_span_count(rng: np.random.Generator, options: CM3Options) -> int:
    return int(np.clip(rng.poisson(options.poisson_lambda), options.min_spans, options.max_spans))


def whole_text_span(document: Document, query_start: int, options: CM3Options,
                    rng: np.random.Generator) -> Span | None:
    """With probability options.whole_text_probability, the whole first text segment at or after `query_start`."""
    if options.whole_text_probability <= 0 or rng.random() >= options.whole_text_probability:
        return None
    for index in range(query_start, len(document)):
        if document[index].modality == vocab_lib.MODALITY_TEXT and len(document[index].tokens):
            return Span(index, 0, len(document[index].tokens))
    return None


def sample_spans(segment_lengths: list[int], num_spans: int, rng: np.random.Generator,
                 required: Sequence[Span] = ()) -> list[Span]:
    """Up to `num_spans` non-overlapping non-empty spans, each inside one segment, sorted in document order;
    the non-overlapping `required` ones are among them."""
    lengths = np.asarray(segment_lengths, np.int64)
    total = int(lengths.sum())
    if num_spans <= 0 or total == 0:
        return []
    kept: list[Span] = list(required)
    if len(kept) >= num_spans:
        return kept
    segment_of = np.repeat(np.arange(len(lengths)), lengths)
    for _ in range(num_spans * num_spans):
        segment = int(segment_of[rng.integers(total)])
        a, b = sorted(rng.integers(0, lengths[segment] + 1, size=2))
        if a == b:
            continue
        candidate = Span(segment, int(a), int(b))
        if all(k.segment != segment or candidate.end <= k.start or k.end <= candidate.start for k in kept):
            kept.append(candidate)
            if len(kept) == num_spans:
                break
    return sorted(kept, key=lambda s: (s.segment, s.start))


class MaskedDocument(NamedTuple):
    tokens: np.ndarray  # int32: the CM3-reordered serialised document
    weights: np.ndarray  # float32, per token: the loss weight of predicting it (0 for every <mask:i>)
    # int32, per token: an image code's raster index in its image, wherever CM3 moved it (0 for other tokens); what
    # model.image_grid_embedding embeds, since the codes left after a span cut out of an image, and the span moved
    # to the end, no longer count their cell from the image's start
    image_cells: np.ndarray


def cm3_mask_document(document: Document, spans: list[Span], vocab: vocab_lib.UnifiedVocab,
                      document_starts: frozenset[int] = frozenset(),
                      segment_weights: list[float] | None = None,
                      token_weights: list[np.ndarray] | None = None,
                      final_weight: float = 1.0) -> MaskedDocument:
    """The CM3-reordered serialised document with its per-token loss weights and image cells. With no spans its
    tokens are `serialize_document(document)` with weights 1.

    A retrieval-augmented sample is several documents in one segment list: a segment whose index is in
    `document_starts` begins a new document, so <eos> (not <break>) precedes it. `segment_weights` gives each
    segment's tokens their weight (the separator after a segment and its masked spans, moved to the end, take it
    too); `token_weights` (one array per segment) overrides it token by token, a moved span's `<eoss>` taking its
    last token's (instruction tuning weights the answer alone); the final <eos> has `final_weight`.
    """
    if len(spans) > vocab.num_masks:
        raise ValueError(f"{len(spans)} spans but only vocab.num_masks={vocab.num_masks} mask tokens")
    weight_of = segment_weights or [1.0] * len(document)
    if token_weights is None:
        token_weights = [np.full(len(segment.tokens), w, np.float32) for segment, w in zip(document, weight_of)]
    by_segment: dict[int, list[tuple[int, Span]]] = {}
    for i, span in enumerate(spans):
        by_segment.setdefault(span.segment, []).append((i, span))
    body, weights, cells = [], [], []
    cells_of = [np.arange(len(segment.tokens), dtype=np.int32) if segment.modality == vocab_lib.MODALITY_IMAGE
                else np.zeros(len(segment.tokens), np.int32) for segment in document]

    def emit(tokens, weight, cell=0):
        body.append(np.asarray(tokens, np.int32))
        weights.append(np.broadcast_to(np.asarray(weight, np.float32), (len(body[-1]),)))
        cells.append(np.broadcast_to(np.asarray(cell, np.int32), (len(body[-1]),)))

    emit([vocab_lib.EOS], weight_of[0] if document else 1.0)
    for index, segment in enumerate(document):
        if index:
            emit([vocab_lib.EOS if index in document_starts else vocab_lib.BREAK], weight_of[index - 1])
        cursor = 0
        for i, span in by_segment.get(index, []):
            emit(segment.tokens[cursor:span.start], token_weights[index][cursor:span.start],
                 cells_of[index][cursor:span.start])
            emit([vocab.mask_id(i)], 0.0)
            cursor = span.end
        emit(segment.tokens[cursor:], token_weights[index][cursor:], cells_of[index][cursor:])
    for i, span in enumerate(spans):
        emit([vocab.mask_id(i)], 0.0)
        emit(document[span.segment].tokens[span.start:span.end], token_weights[span.segment][span.start:span.end],
             cells_of[span.segment][span.start:span.end])
        emit([vocab_lib.EOSS], token_weights[span.segment][span.end - 1])
    emit([vocab_lib.EOS], final_weight)
    tokens = np.concatenate(body).astype(np.int32)
    return MaskedDocument(tokens, np.where(vocab.is_mask(tokens), 0.0, np.concatenate(weights)).astype(np.float32),
                          np.concatenate(cells).astype(np.int32))
