"""Per-task learning curves of a run, as markdown tables: what `--config.eval.every=N` scored while the LM and the SFT
model trained (`tasks/*` rows of DIR/<stage>/logs/metrics.jsonl) and the held-out loss of every eval (`eval` rows,
with SFT's per-task losses).

    python benchmarks/learning_curves.py --workdir=DIR [--stages=lm,sft] [--metrics=text_to_image/cfg/exact,...]

Without --metrics every task's headline metric is shown (the ones docs/evaluation.md quotes).
"""
from __future__ import annotations

import argparse
import json
import pathlib

HEADLINE = ("vqa/exact", "caption/exact", "text_to_image/cfg/exact", "text_to_image/none/exact", "grounded/all",
            "structure/exact", "edit/exact", "text_to_image/cfg/cells", "loss/loss", "loss/image_loss")
TASK_LOSSES = ("loss", "image_loss", "text_loss", "text_to_image_loss", "caption_loss", "vqa_loss", "edit_loss",
               "structure_loss", "grounded_loss")


def read_rows(metrics_file: pathlib.Path, split: str) -> list[dict]:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    latest = {row["step"]: row for row in rows if row.get("split") == split}  # a resumed run logs a step again
    return [latest[step] for step in sorted(latest)]


def table(rows: list[dict], keys: tuple[str, ...]) -> str:
    keys = tuple(k for k in keys if any(k in row for row in rows))
    lines = ["| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for row in rows:
        cells = [f"{row[k]:.3f}" if k in row else "" for k in keys]
        lines.append(f"| {row['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--stages", default="lm,sft")
    parser.add_argument("--metrics", default="", help="comma-separated tasks/* keys (default: the headline ones)")
    args = parser.parse_args()
    metrics = tuple(args.metrics.split(",")) if args.metrics else HEADLINE
    for stage in args.stages.split(","):
        metrics_file = pathlib.Path(args.workdir, stage, "logs", "metrics.jsonl")
        if not metrics_file.exists():
            print(f"## {stage}: no {metrics_file}\n")
            continue
        print(f"## {stage}: scores while training (eval.every)\n\n{table(read_rows(metrics_file, 'tasks'), metrics)}\n")
        print(f"## {stage}: held-out loss\n\n{table(read_rows(metrics_file, 'eval'), TASK_LOSSES)}\n")


if __name__ == "__main__":
    main()
