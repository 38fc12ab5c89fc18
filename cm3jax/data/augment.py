"""Retrieval augmentation: the pipeline's hook that puts retrieved documents before a training document.

`RetrievalAugmenter` returns the retrieved documents (best first) for a training document; the pipeline rotates
each one, fits the sample to the sequence budget with `assemble_sample` and serialises it as
`<eos> retrieved_1 <eos> retrieved_2 <eos> query <eos>` (each document's segments joined by <break>).
`NoRetrieval` is the default; `NeighbourRetrieval` reads precomputed neighbours (cm3jax/retrieval/neighbours.py).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from cm3jax.data.documents import Document, FitReport, decode_document_record, fit_to_budget, serialized_length


class RetrievalAugmenter(Protocol):
    def __call__(self, record_index: int, document: Document, meta: dict,
                 rng: np.random.Generator) -> list[Document]:
        """The documents to put before `document` (record `record_index` of its split), best first."""


class NoRetrieval:
    def __call__(self, record_index: int, document: Document, meta: dict,
                 rng: np.random.Generator) -> list[Document]:
        return []


class NeighbourRetrieval:
    """K of a document's precomputed neighbours, K drawn from `num_retrieved_probs` (P(K = 0), P(K = 1), ...).

    neighbours [records, max_neighbours] holds memory-bank record ids (-1: none) for each record of the split being
    read; bank is the memory bank's random-access records (the train token shards). A plain picklable class: grain
    worker processes run it.
    """

    def __init__(self, neighbours: np.ndarray, bank: Sequence[bytes], num_retrieved_probs: Sequence[float]):
        probs = np.asarray(num_retrieved_probs, np.float64)
        if probs.ndim != 1 or np.any(probs < 0) or not np.isclose(probs.sum(), 1.0):
            raise ValueError(f"data.num_retrieved_probs must be probabilities of K = 0, 1, ..., got {list(probs)}")
        if len(probs) - 1 > neighbours.shape[1]:
            raise ValueError(f"data.num_retrieved_probs allows K up to {len(probs) - 1} but only "
                             f"{neighbours.shape[1]} neighbours per document were computed")
        self.neighbours = neighbours
        self.bank = bank
        self.probs = probs

    def __call__(self, record_index: int, document: Document, meta: dict,
                 rng: np.random.Generator) -> list[Document]:
        k = int(rng.choice(len(self.probs), p=self.probs))
        ids = [int(i) for i in self.neighbours[record_index] if i >= 0][:k]
        return [decode_document_record(self.bank[i])[0] for i in ids]


@dataclasses.dataclass
class AssembledSample:
    segments: Document  # retrieved documents' segments, then the query's
    document_starts: frozenset[int]  # segment indices that begin a new document
    retrieved_segments: int  # the first this-many segments come from retrieved documents
    report: FitReport
    retrieved_dropped: int  # retrieved documents left out for lack of room


def assemble_sample(retrieved: list[Document], query: Document, max_tokens: int) -> AssembledSample:
    """Fits the query document to `max_tokens` first (fit_to_budget), then adds whole retrieved documents in order
    while they fit; a retrieved document is never cut."""
    query, report = fit_to_budget(query, max_tokens)
    used = serialized_length(query)
    kept, dropped = [], 0
    for document in retrieved:
        # Its tokens, the <break>s inside it and the <eos> that ends it.
        extra = sum(len(s.tokens) for s in document) + len(document)
        if document and used + extra <= max_tokens:
            kept.append(document)
            used += extra
        else:
            dropped += 1
    segments, starts = [], set()
    for document in kept + [query]:
        if segments:
            starts.add(len(segments))
        segments.extend(document)
    return AssembledSample(segments, frozenset(starts), len(segments) - len(query), report, dropped)
