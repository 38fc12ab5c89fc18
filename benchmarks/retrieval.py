"""Memory-bank index figures: build time, recall@10 against exact search, and queries/s for ScaNN vs exact search
on clustered, l2-normalised vectors (the shape of a retriever's document embeddings).

    python benchmarks/retrieval.py                      # 100k and 1M x 512
    python benchmarks/retrieval.py --sizes=100000 --leaves_to_search=0,20 --reorder=100,1000

The bank: `--clusters` Gaussian clusters (centres N(0, 1), points centre + 0.3 N(0, 1) per dimension), normalised;
queries drawn the same way. Both searchers use every core (ScaNN's parallel batched search, numpy's BLAS).
Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--leaves_to_search", default="0", help="comma list; 0: the index's default (num_leaves / 32)")
    p.add_argument("--reorder", default="0", help="comma list of re-scored candidates; 0: the index's default")
    return p.parse_args()


def clustered(n: int, dim: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """n normalised points around the given centres, generated in chunks to bound memory."""
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        points = centres[rng.integers(0, len(centres), stop - start)] + 0.3 * rng.standard_normal(
            (stop - start, dim), np.float32)
        out[start:stop] = points / np.linalg.norm(points, axis=1, keepdims=True)
    return out


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def measure_bank(args, bank: np.ndarray, queries: np.ndarray) -> list[dict]:
    """Exact search, then ScaNN at each (leaves, reorder) setting, on one bank."""
    from cm3jax.retrieval.index import ExactIndex, IndexOptions, ScannIndex

    exact = ExactIndex(bank)
    (_, truth), exact_s = timed(lambda: exact.search(queries, args.k))
    rows = [{"size": len(bank), "index": "exact", "build_s": 0.0, "recall_at_10": 1.0,
             "queries_per_s": args.queries / exact_s, "speedup": 1.0}]
    settings = [(int(leaves), int(reorder)) for leaves in args.leaves_to_search.split(",")
                for reorder in args.reorder.split(",")]
    for leaves, reorder in settings:
        options = IndexOptions(kind="scann", leaves_to_search=leaves, reorder=reorder)
        index, build_s = timed(lambda: ScannIndex.build(bank, options))
        (_, found), scann_s = timed(lambda: index.search(queries, args.k))
        recall = float(np.mean([len(set(f) & set(t)) / args.k for f, t in zip(found, truth)]))
        rows.append({"size": len(bank), "index": f"scann (leaves {index.params['leaves_to_search']}/"
                                                 f"{index.params['num_leaves']}, reorder {index.params['reorder']})",
                     "build_s": build_s, "recall_at_10": recall, "queries_per_s": args.queries / scann_s,
                     "speedup": exact_s / scann_s})
    return rows


def main():
    args = parse_args()
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.clusters, args.dim), np.float32)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        rows += measure_bank(args, clustered(n, args.dim, centres, rng), clustered(args.queries, args.dim, centres, rng))

    print(f"\nmemory-bank search ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), dim "
          f"{args.dim}, {args.clusters} clusters, {args.queries} queries, k={args.k}")
    print(f"{'bank':>9s}  {'index':44s}{'build s':>9s}{'recall@10':>11s}{'queries/s':>11s}{'x exact':>9s}")
    for r in rows:
        print(f"{r['size']:9d}  {r['index']:44s}{r['build_s']:9.1f}{r['recall_at_10']:11.3f}"
              f"{r['queries_per_s']:11.0f}{r['speedup']:9.1f}")
    print(json.dumps({"benchmark": "retrieval_index", "dim": args.dim, "clusters": args.clusters,
                      "queries": args.queries, "cpu_count": os.cpu_count(), "rows": rows}))


if __name__ == "__main__":
    main()
