"""Guidance scales swept on held-out scenes that `cm3jax eval` does not score: the figures a recipe's
`generate.cfg_scale` (text -> image, structure, grounded) and `generate.image_scale` / `generate.text_scale` (edit)
are chosen from.

    python benchmarks/guidance_sweep.py --config=configs/shapes.py --workdir=RUN [--model=sft] [--num_examples=64]

RUN must hold the trained model (`cm3jax sft`, or `cm3jax train` with --model=lm) of a `shapes` run. The scenes are
the eval split's documents after the first eval.num_examples ones (those `cm3jax eval` reports on; another --split is
read from its start), so the chosen scales are not fitted to the reported scenes. The model is loaded and compiled
once; every setting decodes the same scenes with the same seeds. Prints one markdown table per task (the headline
score and the per-field scores of every setting), the best setting of each task (ties broken by the share of cells
right) and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cm3jax.config import load_recipe  # noqa: E402
from cm3jax.evaluation.evaluate import held_out_documents, score_image_task  # noqa: E402
from cm3jax.inference.generate import Generator  # noqa: E402
from cm3jax.workdir import Workdir  # noqa: E402

HEADLINE = {"text_to_image": "exact", "structure": "exact", "edit": "exact", "grounded": "all"}
FIELDS = ("exact", "all", "objects", "cells", "kind", "color", "size", "count")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/shapes.py")
    p.add_argument("--workdir", required=True)
    p.add_argument("--model", default="sft", choices=("lm", "sft"))
    p.add_argument("--split", default="", help="default: the recipe's eval.split")
    p.add_argument("--num_examples", type=int, default=64, help="scenes per setting")
    p.add_argument("--tasks", default="text_to_image,structure,grounded,edit")
    p.add_argument("--cfg_scales", default="1,1.5,3,5", help="text -> image, structure and grounded")
    p.add_argument("--image_scales", default="1,1.5,3", help="edit")
    p.add_argument("--text_scales", default="1,1.5,3,7.5", help="edit")
    p.add_argument("--temperatures", default="", help="comma list (default: the recipe's generate.temperature)")
    return p.parse_args()


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def settings_for(task: str, args, temperatures: list[float]) -> list[dict]:
    if task == "edit":
        grid = itertools.product(temperatures, floats(args.image_scales), floats(args.text_scales))
        return [dict(temperature=t, image_scale=i, text_scale=s) for t, i, s in grid]
    return [dict(temperature=t, cfg_scale=s) for t, s in itertools.product(temperatures, floats(args.cfg_scales))]


def flat_scores(task: str, metrics: dict) -> dict[str, float]:
    """text_to_image's metrics are keyed by guidance ("text_to_image/cfg"); the others are flat."""
    if task == "text_to_image":
        metrics = metrics["text_to_image/cfg"]
    return {k: float(v) for k, v in metrics.items() if k in FIELDS}


def markdown(task: str, rows: list[tuple[dict, dict]]) -> str:
    setting_keys = list(rows[0][0])
    fields = [f for f in FIELDS if f in rows[0][1]]
    lines = ["| " + " | ".join(setting_keys + fields) + " |", "|---" * (len(setting_keys) + len(fields)) + "|"]
    for setting, scores in rows:
        lines.append("| " + " | ".join([f"{setting[k]:g}" for k in setting_keys] +
                                       [f"{scores[f]:.3f}" for f in fields]) + " |")
    return f"## {task}\n\n" + "\n".join(lines)


def main() -> None:
    args = parse_args()
    config = load_recipe(args.config)
    if str(config.raw_data.dataset) != "shapes":
        sys.exit(f"guidance_sweep: scores shapes scenes, but {args.config} trains on {config.raw_data.dataset!r}")
    config.eval.guidance = ("cfg",)
    split = args.split or str(config.eval.split)
    first = int(config.eval.num_examples) if split == str(config.eval.split) else 0
    workdir = Workdir.of(args.workdir)
    generator = Generator.load(config, workdir, model=args.model)
    examples = held_out_documents(generator, workdir, split, args.num_examples, start=first)
    if len(examples) < args.num_examples:
        sys.exit(f"guidance_sweep: the {split} split has {len(examples)} scenes after the first {first}; "
                 f"--num_examples={args.num_examples} asked for more")
    temperatures = floats(args.temperatures) or [float(config.generate.temperature)]
    summary = {"model": args.model, "step": generator.step, "split": split, "examples": len(examples),
               "first_example": first, "tasks": {}}
    for task in args.tasks.split(","):
        rows = []
        for setting in settings_for(task, args, temperatures):
            config.generate.update(setting)
            start = time.time()
            rows.append((setting, flat_scores(task, score_image_task(config, generator, examples, task))))
            print(f"{task} {setting}: {rows[-1][1].get(HEADLINE[task]):.3f} ({time.time() - start:.0f} s)",
                  file=sys.stderr, flush=True)
        # Ties (64 scenes give few distinct scores) go to the setting with more cells right.
        best = max(rows, key=lambda row: (row[1][HEADLINE[task]], row[1].get("cells", 0.0)))
        print(markdown(task, rows) + f"\n\nbest {HEADLINE[task]}: {best[1][HEADLINE[task]]:.3f} at {best[0]}\n",
              flush=True)
        summary["tasks"][task] = {"best": best[0], "rows": [{**s, **scores} for s, scores in rows]}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
