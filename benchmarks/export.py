"""Exporting a saved checkpoint of the cm3leon_350m shape: wall time and peak host memory of `cm3jax export` in each
format and dtype, next to the size of the parameters and of the largest tensor. The hf export reads, converts and
writes one layer's tensor at a time, so its memory should follow the largest single tensor, not the model. The proof:
the hf float32 export once more inside a memory cgroup smaller than the parameters (--cap_fraction of their size;
needs a writable cgroup memory controller, i.e. root; skipped otherwise), where it must finish with the same bytes.

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
    p.add_argument("--cap_fraction", type=float, default=0.8,
                   help="the capped run's memory limit as a fraction of the parameters' size (0: no capped run)")
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
    """(bytes of the LM's float32 parameters, bytes of the largest tensor the export reads at once: one layer's
    slice of a stacked parameter, or a whole other one)."""
    import numpy as np

    from cm3jax.config import load_recipe
    from cm3jax.export.params_reader import abstract_params, is_stacked_layers, leaves

    sizes = [(int(np.prod(leaf.shape)) * 4, leaf.shape[0] if is_stacked_layers(path) else 1)
             for path, leaf in leaves(abstract_params(load_recipe(recipe)))]
    return sum(size for size, _ in sizes), max(size // pieces for size, pieces in sizes)


def timed_process(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident MiB) of `command`, by GNU time."""
    result = subprocess.run(["/usr/bin/time", "-f", "%e %M", *command], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    seconds, kib = result.stderr.strip().splitlines()[-1].split()
    return float(seconds), int(kib) / 1024


def memory_cgroup(limit_bytes: int) -> str | None:
    """A fresh memory cgroup (v2, else v1) limited to `limit_bytes` with no swap; its folder, or None where cgroups
    cannot be written here."""
    v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
    for root, limit_file, swap_file in ((("/sys/fs/cgroup", "memory.max", "memory.swap.max"),) if v2 else
                                        (("/sys/fs/cgroup/memory", "memory.limit_in_bytes", None),)):
        folder = os.path.join(root, f"cm3jax_export_bench_{os.getpid()}")
        try:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, limit_file), "w") as f:
                f.write(str(limit_bytes))
            if swap_file and os.path.exists(os.path.join(folder, swap_file)):
                with open(os.path.join(folder, swap_file), "w") as f:
                    f.write("0")
            return folder
        except OSError:
            if os.path.isdir(folder):
                os.rmdir(folder)
    return None


def capped_export(args, limit_bytes: int) -> dict | None:
    """The hf float32 export run inside a memory cgroup of `limit_bytes`: its time, peak and whether its files equal
    the uncapped export's; None where no cgroup can be made."""
    import hashlib

    folder = memory_cgroup(limit_bytes)
    if folder is None:
        return None
    export_dir = os.path.join(args.workdir, "export", "lm-1-hf")

    def digest() -> str:
        with open(os.path.join(export_dir, "model.safetensors"), "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    export = [sys.executable, "-m", "cm3jax", "export", config_flag(args.recipe), f"--workdir={args.workdir}"]
    try:
        timed_process(export)
        expected = digest()
        inside = ["sh", "-c", f'echo $$ > {folder}/cgroup.procs && exec "$@"', "sh"]
        seconds, mib = timed_process(inside + export)
    finally:
        os.rmdir(folder)
    return {"limit_mib": limit_bytes / 2**20, "seconds": seconds, "peak_mib": mib, "same_bytes": digest() == expected}


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
          f"tensor read at once {largest / 2**20:.0f} MiB; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores")
    print(f"baseline process (JAX started, export code imported): {baseline_mib:.0f} MiB, {baseline_s:.1f} s")
    print(f"{'format':>8s}{'dtype':>10s}{'seconds':>9s}{'peak MiB':>10s}{'over baseline':>15s}")
    for r in rows:
        print(f"{r['format']:>8s}{r['dtype']:>10s}{r['seconds']:9.1f}{r['peak_mib']:10.0f}"
              f"{r['peak_over_baseline_mib']:15.0f}")
    capped = capped_export(args, int(args.cap_fraction * total)) if args.cap_fraction > 0 else None
    if capped is None:
        print("capped run: not run (--cap_fraction=0, or no writable cgroup memory controller here)")
    else:
        print(f"hf float32 inside a {capped['limit_mib']:.0f} MiB memory cgroup ({args.cap_fraction:.0%} of the "
              f"parameters): {capped['seconds']:.1f} s, peak {capped['peak_mib']:.0f} MiB, "
              f"{'the same' if capped['same_bytes'] else 'DIFFERENT'} bytes as uncapped")
    print(json.dumps({"benchmark": "export", "recipe": args.recipe, "params_mib": total / 2**20,
                      "largest_tensor_mib": largest / 2**20, "baseline_mib": baseline_mib, "rows": rows,
                      "capped": capped}))


if __name__ == "__main__":
    main()
