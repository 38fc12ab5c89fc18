"""Exporting a saved checkpoint of the cm3leon_350m shape: wall time and peak host memory of `cm3jax export` in each
format and dtype, next to the size of the parameters and of the largest tensor. The hf export reads, converts and
writes one tensor at a time, so its memory should follow the largest tensor, not the model.

    python benchmarks/export.py                           # cm3leon:350m, run folder /tmp/cm3jax_export_bench
    python benchmarks/export.py --recipe=demo --workdir=/tmp/demo_export

The run folder (random weights: the LM checkpoint with its optimizer state, a VQ-GAN checkpoint of the recipe's
shape, a small text tokenizer) is made here unless it exists. Every export is its own `cm3jax export` process under
GNU time; a process that only starts JAX and imports the export code is measured the same way as the baseline.
Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPORTS = (("hf", "float32"), ("hf", "bfloat16"), ("params", "float32"))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="cm3leon:350m")
    p.add_argument("--workdir", default="/tmp/cm3jax_export_bench")
    return p.parse_args()


def config_flag(recipe: str) -> str:
    name, _, arg = recipe.partition(":")
    return f"--config=configs/{name}.py" + (f":{arg}" if arg else "")


def make_run(recipe: str, workdir: str) -> None:
    """A run folder holding what `cm3jax export` reads, with random weights, saved as training saves them."""
    import jax

    from cm3jax.config import config_to_json, load_recipe
    from cm3jax.parallel.mesh import create_mesh, data_parallel_mesh
    from cm3jax.parallel.sharding import logical_axis_rules
    from cm3jax.tokenizers.text import TextTokenizer
    from cm3jax.train.checkpoint import Checkpointer
    from cm3jax.train.lm import lm_state_init
    from cm3jax.train.loop import abstract_state_and_shardings, initialize_state
    from cm3jax.train.vqgan import vqgan_stage_config, vqgan_state_init
    from cm3jax.workdir import Workdir

    w = Workdir(workdir)
    config = w.resolve(load_recipe(recipe))
    sentences = [f"a {c} {s} at the {p}" for c in ("red", "green", "blue") for s in ("circle", "square", "triangle")
                 for p in ("top", "bottom", "left", "right", "center")]
    w.text_tokenizer.parent.mkdir(parents=True, exist_ok=True)
    TextTokenizer.train(sentences * 20, vocab_size=512).save(w.text_tokenizer)
    for stage_dir, stage_config, init_state, mesh in (
            (w.lm, config, lm_state_init(config)[0], create_mesh(config)),
            (w.vqgan, vqgan_stage_config(config), vqgan_state_init(vqgan_stage_config(config))[0],
             data_parallel_mesh())):
        rules = logical_axis_rules(stage_config)
        _, shardings = abstract_state_and_shardings(init_state, mesh, rules)
        state = initialize_state(init_state, jax.random.key(0), mesh, rules, shardings)
        checkpointer = Checkpointer(stage_dir.checkpoints, keep=1, async_save=False)
        checkpointer.save(1, state, {}, {"json": config_to_json(stage_config)})
        checkpointer.wait_until_finished()
        checkpointer.close()
        del state


def parameter_sizes(recipe: str) -> tuple[int, int]:
    """(bytes of the LM's float32 parameters, bytes of its largest one)."""
    import numpy as np

    from cm3jax.config import load_recipe
    from cm3jax.export.params_reader import abstract_params, leaves

    sizes = [int(np.prod(leaf.shape)) * 4 for _, leaf in leaves(abstract_params(load_recipe(recipe)))]
    return sum(sizes), max(sizes)


def timed_process(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident MiB) of `command`, by GNU time."""
    result = subprocess.run(["/usr/bin/time", "-f", "%e %M", *command], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    seconds, kib = result.stderr.strip().splitlines()[-1].split()
    return float(seconds), int(kib) / 1024


def main():
    args = parse_args()
    if not os.path.isdir(os.path.join(args.workdir, "lm", "checkpoints")):
        make_run(args.recipe, args.workdir)
    total, largest = parameter_sizes(args.recipe)
    baseline_s, baseline_mib = timed_process([sys.executable, "-c", "import jax, cm3jax.export.command; jax.devices()"])
    rows = []
    for export_format, dtype in EXPORTS:
        seconds, mib = timed_process([sys.executable, "-m", "cm3jax", "export", config_flag(args.recipe),
                                      f"--workdir={args.workdir}", f"--config.export.format={export_format}",
                                      f"--config.export.dtype={dtype}"])
        rows.append({"format": export_format, "dtype": dtype, "seconds": seconds, "peak_mib": mib,
                     "peak_over_baseline_mib": mib - baseline_mib})
    print(f"\n`cm3jax export` of {args.recipe} (random weights): parameters {total / 2**20:.0f} MiB float32, largest "
          f"tensor {largest / 2**20:.0f} MiB; {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"baseline process (JAX started, export code imported): {baseline_mib:.0f} MiB, {baseline_s:.1f} s")
    print(f"{'format':>8s}{'dtype':>10s}{'seconds':>9s}{'peak MiB':>10s}{'over baseline':>15s}")
    for r in rows:
        print(f"{r['format']:>8s}{r['dtype']:>10s}{r['seconds']:9.1f}{r['peak_mib']:10.0f}"
              f"{r['peak_over_baseline_mib']:15.0f}")
    print(json.dumps({"benchmark": "export", "recipe": args.recipe, "params_mib": total / 2**20,
                      "largest_tensor_mib": largest / 2**20, "baseline_mib": baseline_mib, "rows": rows}))


if __name__ == "__main__":
    main()
