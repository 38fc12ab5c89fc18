"""Multimodal documents: lists of text and image segments, their token-shard record format, and their serialisation
into one token stream per the vocabulary contract.

A document is `[Segment, ...]` whose tokens are already unified ids (vocab.py). Serialised, it reads
`<eos> seg_0 <break> seg_1 ... <eos>`: `<break>` at every switch between segments and `<eos>` at both ends. The leading
`<eos>` lets the first real token be predicted and makes `<eos> caption <break>` the zero-shot text-to-image prompt
(docs/paper.md §1).

Records in token shards (one ArrayRecord record per document) are msgpack maps
`{"segments": [[modality, int32 little-endian bytes], ...], "meta": {...}}`; `meta` carries what later stages need
(the source's example index, label and other fields: data/record_meta.py) and is optional.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import numpy as np

from cm3jax import vocab as vocab_lib

SEGMENT_MODALITIES = (vocab_lib.MODALITY_TEXT, vocab_lib.MODALITY_IMAGE)


@dataclasses.dataclass(frozen=True)
class Segment:
    modality: int  # vocab.MODALITY_TEXT or vocab.MODALITY_IMAGE
    tokens: np.ndarray  # unified ids, int32

    def __post_init__(self):
        if self.modality not in SEGMENT_MODALITIES:
            raise ValueError(f"segment modality must be text ({vocab_lib.MODALITY_TEXT}) or image "
                             f"({vocab_lib.MODALITY_IMAGE}), got {self.modality}")


Document = list[Segment]


def text_segment(ids: np.ndarray) -> Segment:
    return Segment(vocab_lib.MODALITY_TEXT, np.asarray(ids, np.int32))


def image_segment(ids: np.ndarray) -> Segment:
    return Segment(vocab_lib.MODALITY_IMAGE, np.asarray(ids, np.int32))


def encode_document_record(document: Document, meta: dict[str, Any] | None = None) -> bytes:
    segments = [[int(s.modality), np.asarray(s.tokens, "<i4").tobytes()] for s in document]
    return msgpack.packb({"segments": segments, "meta": meta or {}}, use_bin_type=True)


def decode_document_record(record: bytes) -> tuple[Document, dict[str, Any]]:
    """Record bytes -> (document, meta)."""
    payload = msgpack.unpackb(record, raw=False)
    document = [Segment(int(m), np.frombuffer(b, "<i4").astype(np.int32)) for m, b in payload["segments"]]
    return document, payload.get("meta", {})


def validate_document(document: Document, vocab: vocab_lib.UnifiedVocab) -> None:
    """Raises ValueError when a segment holds ids outside its modality's range (a tokenizer/vocab mismatch)."""
    for i, segment in enumerate(document):
        if segment.tokens.size and np.any(vocab.modality(segment.tokens) != segment.modality):
            name = "text" if segment.modality == vocab_lib.MODALITY_TEXT else "image"
            raise ValueError(f"segment {i}: ids outside the {name} range of the vocabulary (was the shard written "
                             f"with another vocab config?)")


def rotate_caption_image(document: Document, rng: np.random.Generator, image_first_probability: float) -> Document:
    """A caption-image pair (one text and one image segment, either order) is put image-first with the given
    probability, else text-first. Image-first documents teach captioning, text-first teach generation. Other
    documents (several images, instructions) keep their order."""
    modalities = sorted(s.modality for s in document)
    if modalities != [vocab_lib.MODALITY_TEXT, vocab_lib.MODALITY_IMAGE]:
        return document
    text, image = sorted(document, key=lambda s: s.modality)
    return [image, text] if rng.random() < image_first_probability else [text, image]


@dataclasses.dataclass
class FitReport:
    text_tokens_cut: int = 0
    segments_dropped: int = 0


def serialized_length(document: Document) -> int:
    """Tokens of `serialize_document(document)`: two <eos>, the segments, and a <break> between segments."""
    return 2 + sum(len(s.tokens) for s in document) + max(len(document) - 1, 0)


def fit_to_budget(document: Document, max_tokens: int) -> tuple[Document, FitReport]:
    """Shortens a document so that its serialisation has at most `max_tokens` tokens.

    An image is never cut. Whole segments are dropped from the end only while the document cannot fit even with
    every text segment cut to one token; then text is cut (from the end of the longest text segment).
    """
    report = FitReport()
    document = list(document)

    def shortest_possible(doc):
        return serialized_length(doc) - sum(len(s.tokens) - 1 for s in doc
                                            if s.modality == vocab_lib.MODALITY_TEXT and len(s.tokens) > 1)

    while document and shortest_possible(document) > max_tokens:
        document.pop()
        report.segments_dropped += 1
    excess = serialized_length(document) - max_tokens
    while excess > 0:
        i = max((j for j, s in enumerate(document) if s.modality == vocab_lib.MODALITY_TEXT),
                key=lambda j: len(document[j].tokens))
        cut = min(excess, len(document[i].tokens) - 1)
        document[i] = Segment(document[i].modality, document[i].tokens[:-cut])
        report.text_tokens_cut += cut
        excess -= cut
    return document, report


def serialize_document(document: Document) -> np.ndarray:
    parts = [np.array([vocab_lib.EOS], np.int32)]
    for i, segment in enumerate(document):
        if i:
            parts.append(np.array([vocab_lib.BREAK], np.int32))
        parts.append(segment.tokens.astype(np.int32))
    parts.append(np.array([vocab_lib.EOS], np.int32))
    return np.concatenate(parts)
