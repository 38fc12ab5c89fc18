"""The CM3leon retrieval strategy (docs/paper.md §4): which memory-bank documents become a training document's
neighbours.

For each training document the query is its text part or its image part, never both (so the retrieved documents
cannot leak the target), with 20% of the query's tokens dropped. Among the index's candidates the document itself
is skipped, and so is any candidate scoring above `duplicate_threshold` with the query (a near-copy) or with a
neighbour already chosen (diversity). Multimodal candidates come before single-modality ones, each group in score
order.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from cm3jax import vocab as vocab_lib
from cm3jax.config import default
from cm3jax.data.documents import Document
from cm3jax.retrieval.index import VectorIndex

QUERY_MODALITIES = (vocab_lib.MODALITY_TEXT, vocab_lib.MODALITY_IMAGE)


@dataclasses.dataclass(frozen=True)
class StrategyOptions:
    num_neighbours: int = default("retrieval.num_neighbours")  # kept per document (CM3leon: 3 per caption-image pair)
    candidates: int = default("retrieval.candidates")  # searched per query before filtering
    duplicate_threshold: float = default("retrieval.duplicate_threshold")
    query_dropout: float = default("retrieval.query_dropout")
    seed: int = default("retrieval.seed")

    @classmethod
    def from_config(cls, c) -> StrategyOptions:
        """From the config's retrieval section."""
        return cls(num_neighbours=int(c.num_neighbours), candidates=int(c.candidates),
                   duplicate_threshold=float(c.duplicate_threshold), query_dropout=float(c.query_dropout),
                   seed=int(c.seed))


def query_modality(document: Document, rng: np.random.Generator) -> int:
    """Text or image, drawn uniformly among the modalities the document has."""
    present = [m for m in QUERY_MODALITIES if any(s.modality == m for s in document)]
    if not present:
        raise ValueError("a document without text or image segments cannot be a query")
    return present[rng.integers(len(present))]


@dataclasses.dataclass(frozen=True)
class Query:
    """One modality of a document, to be embedded: its tokens (unified ids) and which of them the encoder reads
    (dropped tokens keep their place, so an image query keeps its code grid)."""

    record_id: int  # the document's record in its split
    modality: int
    tokens: np.ndarray
    keep: np.ndarray  # bool, like tokens


def document_query(record_id: int, document: Document, modality: int, dropout: float,
                   rng: np.random.Generator) -> Query:
    """The document's tokens of one modality, each dropped with probability `dropout` (at least one is kept)."""
    tokens = np.concatenate([s.tokens for s in document if s.modality == modality])
    keep = rng.random(len(tokens)) >= dropout
    if not keep.any():
        keep[rng.integers(len(tokens))] = True
    return Query(record_id, modality, tokens, keep)


def select_neighbours(candidate_ids: np.ndarray, candidate_scores: np.ndarray, bank_vectors: np.ndarray,
                      multimodal: np.ndarray, self_id: int, options: StrategyOptions) -> np.ndarray:
    """Up to num_neighbours bank ids for one query, -1 padded; see the module docstring for the rules.

    candidate_ids / candidate_scores: the index's answer for the query (best first, scores are inner products with
    it); bank_vectors [N, dim] and multimodal [N] describe the bank.
    """
    usable = (candidate_ids >= 0) & (candidate_ids != self_id) & (candidate_scores <= options.duplicate_threshold)
    ids = candidate_ids[usable]
    # Stable: score order is kept inside each group.
    ids = ids[np.argsort(~multimodal[ids], kind="stable")]
    chosen: list[int] = []
    for candidate in ids:
        if chosen and np.max(bank_vectors[chosen] @ bank_vectors[candidate]) > options.duplicate_threshold:
            continue
        chosen.append(int(candidate))
        if len(chosen) == options.num_neighbours:
            break
    return np.array(chosen + [-1] * (options.num_neighbours - len(chosen)), np.int64)


EmbedQueries = Callable[[Sequence[Query]], np.ndarray]  # queries -> [len(queries), dim] unit vectors


def find_neighbours(documents: Sequence[tuple[int, Document]], embed_queries: EmbedQueries, index: VectorIndex,
                    bank_vectors: np.ndarray, multimodal: np.ndarray, options: StrategyOptions,
                    in_bank: bool = True) -> np.ndarray:
    """[len(documents), num_neighbours] bank ids for (record id, document) pairs of one split. `in_bank`: the
    split is the memory bank itself, so a document's own record id is skipped. Each document's query draw is seeded
    by (options.seed, its id), so a rerun or another batching gives the same neighbours."""
    queries = []
    for record_id, document in documents:
        rng = np.random.default_rng((options.seed, record_id))
        modality = query_modality(document, rng)
        queries.append(document_query(record_id, document, modality, options.query_dropout, rng))
    vectors = np.asarray(embed_queries(queries), np.float32)
    scores, ids = index.search(vectors, options.candidates + 1)  # + 1: the document itself is usually first
    return np.stack([select_neighbours(ids[i], scores[i], bank_vectors, multimodal,
                                       record_id if in_bank else -1, options)
                     for i, (record_id, _) in enumerate(documents)])
