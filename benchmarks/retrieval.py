"""Retrieval figures, in two parts.

index: build time, recall@10 against exact search, and queries/s for ScaNN vs exact search on clustered,
l2-normalised vectors (the shape of a retriever's document embeddings). The bank: `--clusters` Gaussian clusters
(centres N(0, 1), points centre + 0.3 N(0, 1) per dimension), normalised; queries drawn the same way. Both searchers
use every core (ScaNN's parallel batched search, numpy's BLAS).

lm: the paper's central claim at demo scale. The demo LM (configs/demo.py) is trained twice on the demo workdir's
token shards, same steps and seed, without and with retrieved documents; each is then evaluated on every held-out
document (one per row) with 0 and with 2 retrieved documents before it, the loss taken on the held-out document's
tokens only. The workdir's data, VQ-GAN, token and retrieval stages are run first where missing.

    python benchmarks/retrieval.py                      # both parts: 100k and 1M x 512, then the LM comparison
    python benchmarks/retrieval.py --parts=index --sizes=100000 --leaves_to_search=0,20 --reorder=100,1000
    python benchmarks/retrieval.py --parts=lm --lm_workdir=workdir/demo

Each part prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="index,lm")
    p.add_argument("--lm_workdir", default=os.path.join(ROOT, "workdir", "demo"))
    p.add_argument("--lm_steps", type=int, default=0, help="LM training steps (0: the demo config's)")
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
        index, build_s = timed(lambda options=options: ScannIndex.build(bank, options))
        (_, found), scann_s = timed(lambda index=index: index.search(queries, args.k))
        recall = float(np.mean([len(set(f) & set(t)) / args.k for f, t in zip(found, truth)]))
        rows.append({"size": len(bank), "index": f"scann (leaves {index.params['leaves_to_search']}/"
                                                 f"{index.params['num_leaves']}, reorder {index.params['reorder']})",
                     "build_s": build_s, "recall_at_10": recall, "queries_per_s": args.queries / scann_s,
                     "speedup": exact_s / scann_s})
    return rows


def index_part(args):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.clusters, args.dim), np.float32)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        bank, queries = clustered(n, args.dim, centres, rng), clustered(args.queries, args.dim, centres, rng)
        rows += measure_bank(args, bank, queries)

    print(f"\nmemory-bank search ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), dim "
          f"{args.dim}, {args.clusters} clusters, {args.queries} queries, k={args.k}")
    print(f"{'bank':>9s}  {'index':44s}{'build s':>9s}{'recall@10':>11s}{'queries/s':>11s}{'x exact':>9s}")
    for r in rows:
        print(f"{r['size']:9d}  {r['index']:44s}{r['build_s']:9.1f}{r['recall_at_10']:11.3f}"
              f"{r['queries_per_s']:11.0f}{r['speedup']:9.1f}")
    print(json.dumps({"benchmark": "retrieval_index", "dim": args.dim, "clusters": args.clusters,
                      "queries": args.queries, "cpu_count": os.cpu_count(), "rows": rows}))


def held_out_losses(config, state, num_retrieved: int) -> dict:
    """Losses of `state` on every held-out document, one per row, after `num_retrieved` retrieved documents."""
    import math

    import flax.linen as nn
    import jax

    from cm3jax.data.shards import open_token_shards
    from cm3jax.parallel.mesh import create_mesh
    from cm3jax.parallel.sharding import logical_axis_rules
    from cm3jax.train import loop
    from cm3jax.train.lm import build_lm_task

    c = config.copy_and_resolve_references()
    documents = len(open_token_shards(c.data.token_dir, c.data.eval_split))
    c.data.update(retrieval="neighbours", eval_num_retrieved=num_retrieved, packing="pad")
    c.train.update(eval_every=1, eval_batches=math.ceil(documents / c.train.global_batch_size))
    mesh = create_mesh(c, jax.devices())
    task, _ = build_lm_task(c, mesh)
    rules = logical_axis_rules(c)
    _, shardings = loop.abstract_state_and_shardings(task.init_state, mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return loop.evaluate(task, loop.jit_eval_step(task, mesh, shardings), state, mesh)


def lm_part(args):
    from cm3jax.stages import STAGES
    from cm3jax.train.lm import train_language_model
    from cm3jax.workdir import Workdir
    from configs import demo

    workdir = Workdir(args.lm_workdir)
    config = workdir.resolve(demo.get_config())
    for stage in STAGES:
        if stage.name == "lm":
            break
        if not workdir.stage(stage.name).is_complete():
            stage.run(config, workdir)
    config.train.update(eval_every=0)
    if args.lm_steps:
        config.train.steps = args.lm_steps
    rows = []
    for mode in ("none", "neighbours"):
        trained = config.copy_and_resolve_references()
        trained.data.retrieval = mode
        stage_dir = str(workdir.stage("benchmark") / f"lm-retrieval-{mode}")
        shutil.rmtree(stage_dir, ignore_errors=True)  # a fresh run each time, never a resumed one
        start = time.perf_counter()
        result = train_language_model(trained, stage_dir)
        train_s = time.perf_counter() - start
        for k in (0, 2):
            losses = held_out_losses(trained, result.state, k)
            rows.append({"trained_with": mode, "eval_retrieved": k, "train_s": train_s, "steps": result.step,
                         **{key: float(losses[key]) for key in ("loss", "text_loss", "image_loss")}})

    print(f"\nLM with vs without retrieval (configs/demo.py, {config.train.steps} steps, seed {config.train.seed}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores); held-out loss on the held-out "
          f"documents' tokens")
    print(f"{'trained with':>14s}{'eval K':>8s}{'loss':>9s}{'text':>9s}{'image':>9s}{'train s':>9s}")
    for r in rows:
        print(f"{r['trained_with']:>14s}{r['eval_retrieved']:8d}{r['loss']:9.3f}{r['text_loss']:9.3f}"
              f"{r['image_loss']:9.3f}{r['train_s']:9.0f}")
    print(json.dumps({"benchmark": "retrieval_lm", "config": "demo", "steps": config.train.steps, "rows": rows}))


def main():
    args = parse_args()
    parts = args.parts.split(",")
    if "index" in parts:
        index_part(args)
    if "lm" in parts:
        lm_part(args)


if __name__ == "__main__":
    main()
