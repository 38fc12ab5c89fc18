"""Input-pipeline throughput against what the trainer consumes, measured in one run on this machine.

The pipeline runs in full: ArrayRecord token shards (written here from the synthetic caption-image source with the
demo config's shapes) -> record decode -> retrieved documents (the demo's K distribution, from a neighbours file of
random other records written here) -> caption/image rotation -> CM3 masking -> first-fit packing -> batching, with
0 worker processes (everything in the training process) and with N grain worker processes. The trainer is the demo
config's jitted train step on this machine's devices, under the demo's runtime settings (as `cm3jax` applies them:
the pipeline runs under them too). Tokens are batch rows x seq_len (the unit the trainer
consumes); the share of them that are real (non-padding) tokens is reported too.

    python benchmarks/pipeline.py                 # demo config, 0 and 2 workers
    python benchmarks/pipeline.py --workers=4 --batches=300

Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="grain worker processes for the second measurement")
    p.add_argument("--batches", type=int, default=200, help="timed batches per pipeline measurement")
    p.add_argument("--train_steps", type=int, default=10, help="timed trainer steps")
    p.add_argument("--records", type=int, default=20000)
    return p.parse_args()


def demo_config():
    from configs import demo

    return demo.get_config()


def write_shards(config, directory: str, num_records: int) -> None:
    """Token shards of the synthetic source and, for each record, retrieval.num_neighbours random other records."""
    import numpy as np

    from cm3jax import vocab as vocab_lib
    from cm3jax.data.pipeline import open_document_source
    from cm3jax.data.shards import write_token_shards

    vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
    config.data.update(source="synthetic", synthetic_records=num_records)
    source = open_document_source(config.data, vocab, config.data.train_split)
    write_token_shards((source[i] for i in range(num_records)), directory, "train", num_shards=8)
    vocab.save(directory)
    rng = np.random.default_rng(0)
    offsets = rng.integers(1, num_records, size=(num_records, config.retrieval.num_neighbours))
    np.save(os.path.join(directory, "neighbours-train.npy"), (np.arange(num_records)[:, None] + offsets) % num_records)


def time_pipeline(config, token_dir: str, workers: int, batches: int) -> dict:
    import numpy as np

    from cm3jax import vocab as vocab_lib
    from cm3jax.data.pipeline import DocumentBatches, PipelineOptions, open_document_source, open_retrieval

    config.data.update(source="token_shards", token_dir=token_dir, neighbours_dir=token_dir, num_workers=workers)
    vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
    options = PipelineOptions.from_config(config, num_processes=1)
    iterator = DocumentBatches(open_document_source(config.data, vocab, "train"), vocab, options,
                               rows=(0, config.train.global_batch_size),
                               augment=open_retrieval(config.data, vocab, "train", evaluation=False))
    for _ in range(5):  # start-up: worker processes, first reads
        next(iterator)
    real_tokens = documents = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        real_tokens += int(np.sum(batch["segment_ids"] > 0))
        documents += int(np.sum(batch["segment_ids"].max(axis=1)))  # packed documents are numbered 1..n per row
    elapsed = time.perf_counter() - start
    rows = batches * config.train.global_batch_size
    return {"workers": workers, "batches_per_s": batches / elapsed, "examples_per_s": documents / elapsed,
            "tokens_per_s": rows * config.train.seq_len / elapsed, "real_token_share": real_tokens /
            (rows * config.train.seq_len)}


def time_trainer(config, steps: int) -> dict:
    import flax.linen as nn
    import jax
    import numpy as np

    from cm3jax.parallel.mesh import create_mesh
    from cm3jax.parallel.sharding import global_batch, logical_axis_rules
    from cm3jax.train import loop
    from cm3jax.train.lm import build_lm_task

    config.data.update(source="synthetic", retrieval="none", num_workers=0)  # the step's cost depends on shapes only
    mesh = create_mesh(config, jax.devices())
    task, _ = build_lm_task(config, mesh)
    rules = logical_axis_rules(config)
    _, shardings = loop.abstract_state_and_shardings(task.init_state, mesh, rules)
    state = loop.initialize_state(task.init_state, jax.random.key(0), mesh, rules, shardings)
    batches = [next(task.train_data) for _ in range(steps + 2)]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = loop.jit_train_step(task, mesh, shardings)
        device_batches = [global_batch(b, mesh, task.global_batch_size) for b in batches]
        for b in device_batches[:2]:  # compile and warm up
            state, metrics = step(state, b)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for b in device_batches[2:]:
            state, metrics = step(state, b)
        jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - start
    step_time = elapsed / steps
    tokens = config.train.global_batch_size * config.train.seq_len
    return {"step_time_s": step_time, "tokens_per_s": tokens / step_time, "devices": len(jax.devices()),
            "device_kind": jax.devices()[0].device_kind, "finite": bool(np.isfinite(jax.device_get(metrics["loss"])))}


def main():
    args = parse_args()
    from absl import flags

    from cm3jax.host_memory import apply_runtime_config

    apply_runtime_config(demo_config().runtime)

    flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags
    with tempfile.TemporaryDirectory() as token_dir:
        write_shards(demo_config(), token_dir, args.records)
        pipelines = [time_pipeline(demo_config(), token_dir, w, args.batches) for w in (0, args.workers)]
    trainer = time_trainer(demo_config(), args.train_steps)

    config = demo_config()
    print(f"\nInput pipeline vs demo trainer ({platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"batch {config.train.global_batch_size} x seq {config.train.seq_len})")
    print(f"{'':28s}{'batches/s':>11s}{'examples/s':>12s}{'tokens/s':>11s}{'x trainer':>11s}{'real tokens':>13s}")
    for p in pipelines:
        name = f"pipeline, {p['workers']} workers"
        print(f"{name:28s}{p['batches_per_s']:11.1f}{p['examples_per_s']:12.0f}"
              f"{p['tokens_per_s']:11.0f}{p['tokens_per_s'] / trainer['tokens_per_s']:11.1f}"
              f"{p['real_token_share']:13.1%}")
    print(f"{'demo trainer (' + trainer['device_kind'] + ')':28s}{1 / trainer['step_time_s']:11.2f}{'':12s}"
          f"{trainer['tokens_per_s']:11.0f}{1.0:11.1f}")
    best = max(p["tokens_per_s"] for p in pipelines)
    print(json.dumps({
        "benchmark": "pipeline", "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "batch": config.train.global_batch_size, "seq_len": config.train.seq_len,
        "pipeline": pipelines, "trainer": trainer,
        "ratio_best_pipeline_to_trainer": best / trainer["tokens_per_s"],
    }))


if __name__ == "__main__":
    main()
