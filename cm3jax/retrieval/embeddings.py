"""Memory-bank embeddings: the encoders that turn queries (one modality of a document) into vectors, either the
trained dual encoder or embeddings computed elsewhere (e.g. CLIP) read from .npy files, and the combination of a
document's text and image embeddings.

A document's embedding is the l2-normalised average of its l2-normalised text and image embeddings (docs/paper.md §4);
a document with one modality is that modality's normalised embedding.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from cm3jax import vocab as vocab_lib
from cm3jax.data.documents import Document
from cm3jax.errors import BadInputError, MissingInputError
from cm3jax.retrieval.neighbours import Query
from cm3jax.storage import local_mirror

PARTS = {vocab_lib.MODALITY_TEXT: "text", vocab_lib.MODALITY_IMAGE: "image"}


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def document_embeddings(text: np.ndarray, image: np.ndarray, has_text: np.ndarray,
                        has_image: np.ndarray) -> np.ndarray:
    """[N, dim] text and image embeddings (rows of an absent modality are ignored) -> [N, dim] document embeddings.

    has_text / has_image [N] bool say which parts each document has; a document with neither is an error.
    """
    has_text, has_image = np.asarray(has_text, bool), np.asarray(has_image, bool)
    if np.any(~has_text & ~has_image):
        empty = np.flatnonzero(~has_text & ~has_image)
        raise ValueError(f"documents {empty[:5].tolist()} have neither text nor image to embed")
    combined = (l2_normalize(text) * has_text[:, None]) + (l2_normalize(image) * has_image[:, None])
    return l2_normalize(combined)


def load_embedding_file(path: str, expected_count: int, expected_dim: int | None = None,
                        allow_empty_rows: bool = False) -> np.ndarray:
    """Embeddings computed elsewhere (e.g. CLIP), one row per document of a split in token-shard order, as float32
    (memory-mapped; rows are normalised where they are used).

    The file must hold a float [expected_count, dim] array (dim == expected_dim when given). Every row must be
    finite and non-zero unless `allow_empty_rows` (a part file, whose rows for documents without that part are
    ignored; such rows are checked when looked up).
    """
    if not epath.Path(path).exists():
        raise MissingInputError(f"{path} not found: provide a float .npy array with one embedding row per document "
                                f"of the token shards ({expected_count} rows, in shard order)")
    try:
        vectors = np.load(local_mirror(path), mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise BadInputError(f"{path} is not a plain .npy array: {e}") from e
    if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.floating):
        raise BadInputError(f"{path}: expected a 2-D float array [documents, dim], got shape {vectors.shape} "
                         f"dtype {vectors.dtype}")
    if vectors.shape[0] != expected_count:
        raise BadInputError(f"{path} has {vectors.shape[0]} rows but the split has {expected_count} documents "
                         f"(one row per document, in token-shard order)")
    if expected_dim is not None and vectors.shape[1] != expected_dim:
        raise BadInputError(f"{path} has dimension {vectors.shape[1]}, expected {expected_dim}")
    if not allow_empty_rows:
        check_rows(vectors, np.arange(expected_count), path)
    return vectors


def check_rows(vectors: np.ndarray, rows: np.ndarray, path: str) -> np.ndarray:
    """vectors[rows] as float32, or a ValueError naming the rows of `path` that are zero, NaN or infinite."""
    picked = np.asarray(vectors[np.asarray(rows)], np.float32)
    bad = ~np.all(np.isfinite(picked), axis=1) | ~np.any(picked != 0, axis=1)
    if bad.any():
        raise BadInputError(f"{path}: rows {np.asarray(rows)[bad][:5].tolist()} are zero, NaN or infinite")
    return picked


class RetrieverEncoder:
    """Embeds queries with the trained dual encoder on this process's first device (the parameters are small enough
    to live on one), in jitted batches of `batch_size` rows.

    A query's row in its batch is fixed by its record id (record_id mod batch_size, batches holding records of one
    block of batch_size ids and one modality), so its vector is computed at the same position of the same program
    however the documents are chunked, split across processes or resumed: its float value does not depend on
    which other documents are embedded with it."""

    def __init__(self, params: Any, model_config, vocab: vocab_lib.UnifiedVocab, batch_size: int):
        import jax

        from cm3jax.models.retriever import DualEncoder

        model = DualEncoder(model_config)
        self.dim = model_config.embed_dim
        self.batch_size = batch_size
        self.params = jax.device_put(params, jax.local_devices()[0])
        self.towers = {
            vocab_lib.MODALITY_TEXT: (jax.jit(lambda p, t, m: model.apply({"params": p}, t, m,
                                                                          method=DualEncoder.embed_text)),
                                      vocab.text_pieces, model_config.text_tower.max_seq_len),
            vocab_lib.MODALITY_IMAGE: (jax.jit(lambda p, t, m: model.apply({"params": p}, t, m,
                                                                           method=DualEncoder.embed_image)),
                                       vocab.image_codes, model_config.image_tower.max_seq_len),
        }

    def _batches(self, queries: Sequence[Query]) -> list[tuple[int, dict[int, int]]]:
        """(modality, {row in the batch: index of the query}) for every batch to run; a second query of the same
        record and modality (generation prompts) goes to a batch of its own."""
        batches: dict[tuple[int, int, int], dict[int, int]] = {}
        for i, query in enumerate(queries):
            block, row = divmod(query.record_id, self.batch_size)
            repeat = 0
            while row in batches.setdefault((query.modality, block, repeat), {}):
                repeat += 1
            batches[(query.modality, block, repeat)][row] = i
        return [(modality, rows) for (modality, _, _), rows in batches.items()]

    def __call__(self, queries: Sequence[Query]) -> np.ndarray:
        from cm3jax.models.retriever import tower_input

        out = np.zeros((len(queries), self.dim), np.float32)
        for modality, rows in self._batches(queries):
            embed, local_ids, length = self.towers[modality]
            tokens = np.zeros((self.batch_size, length), np.int32)
            masks = np.zeros((self.batch_size, length), bool)
            for row, i in rows.items():
                tokens[row], masks[row] = tower_input(local_ids(queries[i].tokens), queries[i].keep, length)
            vectors = np.asarray(embed(self.params, tokens, masks))
            for row, i in rows.items():
                out[i] = vectors[row]
        return out


class PrecomputedEncoder:
    """Embeddings computed elsewhere for one split: a query (record, modality) reads that record's row of the
    modality's file, `template.format(split=..., part="text" | "image")`. Query-token dropout cannot apply to
    precomputed vectors, so these queries use the whole part."""

    def __init__(self, template: str, split: str, count: int):
        self.paths = {m: template.format(split=split, part=part) for m, part in PARTS.items()}
        text = load_embedding_file(self.paths[vocab_lib.MODALITY_TEXT], count, allow_empty_rows=True)
        image = load_embedding_file(self.paths[vocab_lib.MODALITY_IMAGE], count, text.shape[1], allow_empty_rows=True)
        self.vectors = {vocab_lib.MODALITY_TEXT: text, vocab_lib.MODALITY_IMAGE: image}
        self.dim = text.shape[1]

    def __call__(self, queries: Sequence[Query]) -> np.ndarray:
        out = np.zeros((len(queries), self.dim), np.float32)
        for modality, vectors in self.vectors.items():
            rows = [i for i, q in enumerate(queries) if q.modality == modality]
            if rows:
                records = np.array([queries[i].record_id for i in rows])
                out[rows] = l2_normalize(check_rows(vectors, records, self.paths[modality]))
        return out


def part_queries(record_id: int, document: Document) -> list[Query]:
    """The whole text part and the whole image part (those present) of a document, as queries."""
    queries = []
    for modality in PARTS:
        tokens = [s.tokens for s in document if s.modality == modality]
        if tokens:
            tokens = np.concatenate(tokens)
            queries.append(Query(record_id, modality, tokens, np.ones(len(tokens), bool)))
    return queries


def embed_documents(documents: Sequence[tuple[int, Document]], encoder) -> tuple[np.ndarray, np.ndarray]:
    """(document embeddings [N, dim], multimodal [N] bool) of (record id, document) pairs."""
    queries = [part_queries(record_id, document) for record_id, document in documents]
    flat = [q for qs in queries for q in qs]
    vectors = encoder(flat) if flat else np.zeros((0, encoder.dim), np.float32)
    text = np.zeros((len(documents), vectors.shape[1]), np.float32)
    image = np.zeros_like(text)
    has_text, has_image = np.zeros(len(documents), bool), np.zeros(len(documents), bool)
    row = 0
    for i, qs in enumerate(queries):
        for q in qs:
            if q.modality == vocab_lib.MODALITY_TEXT:
                text[i], has_text[i] = vectors[row], True
            else:
                image[i], has_image[i] = vectors[row], True
            row += 1
    return document_embeddings(text, image, has_text, has_image), has_text & has_image
