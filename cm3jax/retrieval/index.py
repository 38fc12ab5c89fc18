"""Maximum-inner-product search over the memory bank: one interface, an exact and a ScaNN implementation, and a
sharded index whose processes each hold a slice of the bank.

Scores are inner products (the retriever's embeddings are l2-normalised, so they are cosine similarities), summed in
float64 and rounded to float32 (`inner_products`). A float32 matrix product picks its kernel, and so its rounding, by
the shapes involved (one query at a time rounds otherwise than a batch of sixty), so float32 scores of one query would
depend on which other queries share its search; float64 sums differ only far below float32's last bit, and the
rounded scores do not depend on the batch, the chunking, the process count or a resumption. Results are ordered by
score, ties by id, so the exact index and the sharded exact index agree element for element. ScaNN
(tree partitioning + asymmetric hashing + exact re-scoring of the best candidates, docs/paper.md §8) is chosen for banks
of `exact_below` vectors or more; its parameters come from IndexOptions, and those left at 0 are chosen by size
(num_leaves ~ sqrt(N)).

ScaNN's candidates are re-scored with `inner_products` before they are ordered, so its scores obey the same rule.

An index is saved as a folder: `index.json` (kind, size, dimension, options), `ids.npy` (the global id of each
row), `vectors.npy` and, for ScaNN, its own artifacts under `scann/`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Protocol

import numpy as np
from etils import epath

from cm3jax.config import default
from cm3jax.config_validation import INDEX_KINDS
from cm3jax.errors import MissingInputError
from cm3jax.storage import PathLike, atomic_write_text, load_arrays, local_mirror, save_arrays, staged_dir

INDEX_FILE = "index.json"


@dataclasses.dataclass(frozen=True)
class IndexOptions:
    kind: str = default("retrieval.index_kind")  # auto: exact below exact_below vectors, ScaNN from there
    exact_below: int = default("retrieval.exact_below")
    num_leaves: int = default("retrieval.num_leaves")  # ScaNN tree partitions; 0: ~sqrt(N)
    leaves_to_search: int = default("retrieval.leaves_to_search")  # partitions scanned per query; 0: num_leaves / 32
    dims_per_block: int = default("retrieval.dims_per_block")  # asymmetric hashing: dimensions per 4-bit code
    anisotropic_threshold: float = default("retrieval.anisotropic_threshold")
    reorder: int = default("retrieval.reorder")  # candidates re-scored exactly; 0: 1000
    training_sample_size: int = default("retrieval.training_sample_size")
    training_threads: int = default("retrieval.index_training_threads")
    seed: int = default("retrieval.seed")

    def __post_init__(self):
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"retrieval.index_kind={self.kind!r} not in {INDEX_KINDS}")

    @classmethod
    def from_config(cls, c) -> IndexOptions:
        """From the config's retrieval section."""
        return cls(kind=str(c.index_kind), exact_below=int(c.exact_below), num_leaves=int(c.num_leaves),
                   leaves_to_search=int(c.leaves_to_search), dims_per_block=int(c.dims_per_block),
                   anisotropic_threshold=float(c.anisotropic_threshold), reorder=int(c.reorder),
                   training_sample_size=int(c.training_sample_size),
                   training_threads=int(c.index_training_threads), seed=int(c.seed))


class VectorIndex(Protocol):
    size: int
    dim: int

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """[Q, dim] float32 -> (scores [Q, k] best first, global ids [Q, k]); rows past the bank's size get id -1
        and score -inf."""

    def save(self, folder: str) -> None: ...


def _check_vectors(vectors: np.ndarray, what: str) -> np.ndarray:
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.floating):
        raise ValueError(f"{what} must be a 2-D float array, got shape {vectors.shape} dtype {vectors.dtype}")
    if not np.all(np.isfinite(vectors)):
        raise ValueError(f"{what} has NaN or infinite entries")
    return np.ascontiguousarray(vectors, np.float32)


def inner_products(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """[Q, dim] x [N, dim] -> [Q, N] float32 scores, summed in float64 (see the module docstring: a query's scores do
    not depend on the other queries searched with it)."""
    return (np.asarray(queries, np.float64) @ np.asarray(vectors, np.float64).T).astype(np.float32)


def top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best (score descending, then id ascending) of candidate (scores, ids) [Q, C]; pads with
    (-inf, -1) when C < k."""
    if scores.shape[1] < k:
        pad = k - scores.shape[1]
        scores = np.concatenate([scores, np.full((scores.shape[0], pad), -np.inf, np.float32)], axis=1)
        ids = np.concatenate([ids, np.full((ids.shape[0], pad), -1, np.int64)], axis=1)
    # -1 ids (padding) sort last among equal (-inf) scores.
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


class ExactIndex:
    """Brute-force inner products, in blocks of the bank and of the queries so memory stays at two blocks' product."""

    BLOCK = 16_384
    QUERY_BLOCK = 1_024

    def __init__(self, vectors: np.ndarray, ids: np.ndarray | None = None):
        self.vectors = _check_vectors(vectors, "index vectors")
        self.size, self.dim = self.vectors.shape
        self.ids = np.arange(self.size, dtype=np.int64) if ids is None else np.asarray(ids, np.int64)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _check_vectors(queries, "queries")
        if len(queries) > self.QUERY_BLOCK:
            parts = [self.search(queries[i:i + self.QUERY_BLOCK], k) for i in range(0, len(queries), self.QUERY_BLOCK)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        best_scores = np.full((len(queries), 0), -np.inf, np.float32)
        best_ids = np.full((len(queries), 0), -1, np.int64)
        for start in range(0, self.size, self.BLOCK):
            scores = inner_products(queries, self.vectors[start:start + self.BLOCK])
            block_scores, block_ids = _at_least_kth(scores, self.ids[start:start + self.BLOCK], k)
            best_scores, best_ids = top_k(np.concatenate([best_scores, block_scores], axis=1),
                                          np.concatenate([best_ids, block_ids], axis=1), k)
        return best_scores, best_ids

    def save(self, folder: PathLike) -> None:
        _write_index(folder, "exact", self.size, self.dim, {})
        _save_vectors(folder, self.vectors, self.ids)


def _at_least_kth(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, every column scoring at least the row's k-th best score (so ties at the k-th place are all kept
    and the final order by id is exact), as padded [Q, C] (scores, ids)."""
    columns = scores.shape[1]
    if columns <= k:
        return scores, np.broadcast_to(ids, scores.shape)
    kth = np.partition(scores, columns - k, axis=1)[:, columns - k:columns - k + 1]
    rows, cols = np.nonzero(scores >= kth)
    counts = np.bincount(rows, minlength=len(scores))
    slot = np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]
    kept_scores = np.full((len(scores), counts.max()), -np.inf, np.float32)
    kept_ids = np.full((len(scores), counts.max()), -1, np.int64)
    kept_scores[rows, slot] = scores[rows, cols]
    kept_ids[rows, slot] = ids[cols]
    return kept_scores, kept_ids


def _save_vectors(folder: PathLike, vectors: np.ndarray, ids: np.ndarray) -> None:
    """ids first: an index folder is whole once vectors.npy exists."""
    save_arrays(epath.Path(folder) / "ids.npy", array=ids)
    save_arrays(epath.Path(folder) / "vectors.npy", array=vectors)


class ScannIndex:
    """ScaNN: tree partitions + asymmetric hashing + exact re-scoring of the best candidates, which are then scored
    once more by `inner_products` (RESCORE_MARGIN more than asked, so ScaNN's own float32 order cannot decide which
    candidate is k-th)."""

    RESCORE_MARGIN = 16

    def __init__(self, searcher, vectors: np.ndarray, ids: np.ndarray, params: dict):
        self.searcher = searcher
        self.vectors = _check_vectors(vectors, "index vectors")
        self.ids = np.asarray(ids, np.int64)
        self.size, self.dim = self.vectors.shape
        self.params = params

    @classmethod
    def build(cls, vectors: np.ndarray, options: IndexOptions, ids: np.ndarray | None = None) -> ScannIndex:
        import scann

        vectors = _check_vectors(vectors, "index vectors")
        n, dim = vectors.shape
        num_leaves = options.num_leaves or max(1, int(round(math.sqrt(n))))
        params = {"num_leaves": num_leaves,
                  "leaves_to_search": options.leaves_to_search or max(1, num_leaves // 32),
                  "reorder": options.reorder or 1000}
        sample = min(n, options.training_sample_size)
        builder = (scann.scann_ops_pybind.builder(vectors, 10, "dot_product")
                   .tree(num_leaves=num_leaves, num_leaves_to_search=params["leaves_to_search"],
                         training_sample_size=sample, spherical=True, min_partition_size=1)
                   .score_ah(options.dims_per_block, anisotropic_quantization_threshold=options.anisotropic_threshold,
                             training_sample_size=sample)
                   .reorder(params["reorder"]))
        # Reproducible builds: the builder has no seed argument, the partitioning config has (0 draws one per
        # build), and min_partition_size=1 turns off the re-drawing of small partitions, which is not seeded.
        scann_config = builder.create_config().replace(
            "partitioning {", f"partitioning {{\n        clustering_seed: {options.seed + 1}", 1)
        searcher = scann.scann_ops_pybind.create_searcher(vectors, scann_config, options.training_threads)
        return cls(searcher, vectors, np.arange(n) if ids is None else ids, params)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _check_vectors(queries, "queries")
        candidates = min(k + self.RESCORE_MARGIN, self.size)
        rows, _ = self.searcher.search_batched_parallel(
            queries, final_num_neighbors=candidates, pre_reorder_num_neighbors=max(self.params["reorder"], candidates))
        rows = np.asarray(rows, np.int64)
        found = rows >= 0
        safe_rows = np.clip(rows, 0, None)
        scores = np.einsum("qd,qcd->qc", queries.astype(np.float64), self.vectors[safe_rows].astype(np.float64))
        scores = np.where(found, scores.astype(np.float32), -np.inf).astype(np.float32)
        return top_k(scores, np.where(found, self.ids[safe_rows], -1), k)

    def save(self, folder: PathLike) -> None:
        _write_index(folder, "scann", self.size, self.dim, self.params)
        with staged_dir(epath.Path(folder) / "scann") as local:  # ScaNN writes local files only
            self.searcher.serialize(local, relative_path=True)  # loadable from wherever it is copied
        _save_vectors(folder, self.vectors, self.ids)


def build_index(vectors: np.ndarray, options: IndexOptions = IndexOptions(),
                ids: np.ndarray | None = None) -> VectorIndex:
    """An exact index for small banks (or when asked), ScaNN otherwise."""
    vectors = _check_vectors(vectors, "index vectors")
    if len(vectors) == 0:
        raise ValueError("cannot index an empty memory bank")
    if options.kind == "exact" or (options.kind == "auto" and len(vectors) < options.exact_below):
        return ExactIndex(vectors, ids)
    return ScannIndex.build(vectors, options, ids)


def _write_index(folder: PathLike, kind: str, size: int, dim: int, params: dict) -> None:
    epath.Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write_text(epath.Path(folder) / INDEX_FILE,
                      json.dumps({"kind": kind, "size": size, "dim": dim, "params": params}, indent=2))


def load_index(folder: PathLike) -> VectorIndex:
    folder = epath.Path(folder)
    path = folder / INDEX_FILE
    if not path.exists():
        raise MissingInputError(f"{path} not found: build the index with `cm3jax retrieve` first")
    meta = json.loads(path.read_text())
    ids = load_arrays(folder / "ids.npy")
    vectors = load_arrays(folder / "vectors.npy")
    if meta["kind"] == "exact":
        return ExactIndex(vectors, ids)
    import scann

    searcher = scann.scann_ops_pybind.load_searcher(local_mirror(folder / "scann"))
    return ScannIndex(searcher, vectors, ids, meta["params"])


Gather = Callable[[np.ndarray], np.ndarray]  # [n, ...] on every process -> [num_processes, n, ...]


def process_allgather(x: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x))


class ShardedIndex:
    """Each process indexes its slice of the bank (global ids); a search gathers every process's queries, searches
    them all against the local slice, gathers the candidates and keeps the global top-k by score.

    Every process must call search together, with the same number of queries (pad if needed).
    """

    def __init__(self, local: VectorIndex, gather: Gather = process_allgather, process_index: int | None = None):
        import jax

        self.local = local
        self.gather = gather
        self.process_index = jax.process_index() if process_index is None else process_index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _check_vectors(queries, "queries")
        all_queries = self.gather(queries)  # [P, Q, dim]
        processes, per_process = all_queries.shape[:2]
        scores, ids = self.local.search(all_queries.reshape(processes * per_process, -1), k)
        all_scores = self.gather(scores)  # [P(shards), P * Q, k]
        all_ids = self.gather(ids)
        rows = slice(self.process_index * per_process, (self.process_index + 1) * per_process)
        candidates_scores = np.concatenate(list(all_scores[:, rows]), axis=1)
        candidates_ids = np.concatenate(list(all_ids[:, rows]), axis=1)
        return top_k(candidates_scores, candidates_ids, k)
