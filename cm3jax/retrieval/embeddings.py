"""Memory-bank embeddings: combining a document's text and image embeddings, and reading embeddings computed
elsewhere (e.g. CLIP) from an .npy file.

A document's embedding is the l2-normalised average of its l2-normalised text and image embeddings (REFERENCE §4);
a document with one modality is that modality's normalised embedding.
"""
from __future__ import annotations

import os

import numpy as np


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


def load_bank_embeddings(path: str, expected_count: int, expected_dim: int | None = None) -> np.ndarray:
    """Embeddings computed elsewhere, one row per memory-bank document in token-shard order, l2-normalised.

    The file must hold a float [expected_count, dim] array (dim == expected_dim when given) with finite values.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: provide a float .npy array with one embedding row per document "
                                f"of the token shards ({expected_count} rows, in shard order)")
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{path} is not a plain .npy array: {e}") from e
    if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.floating):
        raise ValueError(f"{path}: expected a 2-D float array [documents, dim], got shape {vectors.shape} "
                         f"dtype {vectors.dtype}")
    if vectors.shape[0] != expected_count:
        raise ValueError(f"{path} has {vectors.shape[0]} rows but the memory bank has {expected_count} documents "
                         f"(one row per document, in token-shard order)")
    if expected_dim is not None and vectors.shape[1] != expected_dim:
        raise ValueError(f"{path} has dimension {vectors.shape[1]}, expected {expected_dim}")
    vectors = np.asarray(vectors, np.float32)
    bad = ~np.all(np.isfinite(vectors), axis=1) | (np.linalg.norm(vectors, axis=1) == 0)
    if bad.any():
        raise ValueError(f"{path}: rows {np.flatnonzero(bad)[:5].tolist()} are zero, NaN or infinite")
    return l2_normalize(vectors)
