"""SFT variants side by side on one pretrained run: `sft.loss_on` (all | target) x `sft.cm3` (on | off) x seeds, each
instruction-tuned for the same steps from the same LM and scored by `cm3jax eval` on the same held-out scenes, next
to the pretrained LM itself.

    python benchmarks/sft_variants.py --config=configs/shapes.py --workdir=RUN --steps=300 --seeds=0,1

RUN must hold a trained LM (`cm3jax pipeline` up to `lm`). Each variant trains in RUN/sft_variants/<name>/ (the
run's data, VQ-GAN, tokenizers, tokens and LM linked in, so the examples and the start are the same) and is
evaluated there (eval/sft-<step>/metrics.json); the pretrained LM is scored in RUN/sft_variants/pretrained/. A
variant already trained or scored is not trained or scored again (delete its folder to redo it). Prints a table
(one row per model: the headline score of every task) and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINKED = ("data", "vqgan", "text_tokenizer", "tokens", "retrieval", "lm")
# The figure reported per task (its path in metrics.json): the held-out loss; scene-exact for images and captions,
# exact match for VQA, every object in its box for grounding.
HEADLINE = {"loss": ("loss", "loss"), "text_to_image": ("text_to_image", "cfg", "exact"),
            "caption": ("caption", "exact"), "vqa": ("vqa", "exact"), "edit": ("edit", "exact"),
            "structure": ("structure", "exact"), "grounded": ("grounded", "all")}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/shapes.py")
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=300, help="SFT steps of every variant")
    p.add_argument("--seeds", default="0,1", help="comma list of train.seed (data.seed follows)")
    p.add_argument("--loss_on", default="all,target")
    p.add_argument("--cm3", default="on,off")
    p.add_argument("--overrides", default="", help="more --config.* flags for every command, space-separated")
    return p.parse_args()


def cm3jax(command: str, config: str, workdir: str, flags: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "cm3jax", command, f"--config={config}", f"--workdir={workdir}", *flags],
                   cwd=ROOT, check=True)


def headline(metrics: dict) -> dict[str, float]:
    figures = {}
    for name, path in HEADLINE.items():
        value = metrics
        for key in path:
            value = value.get(key, {}) if isinstance(value, dict) else {}
        if isinstance(value, float):
            figures[name] = value
    return figures


def linked_run(run: str, name: str) -> str:
    """RUN/sft_variants/<name>: a workdir whose data, tokenizers, tokens and LM are RUN's (links)."""
    variant = os.path.join(run, "sft_variants", name)
    os.makedirs(variant, exist_ok=True)
    for stage in LINKED:
        link = os.path.join(variant, stage)
        if not os.path.lexists(link):
            os.symlink(os.path.join(run, stage), link)
    return variant


def scored_once(config: str, workdir: str, model: str, step: int, flags: list[str]) -> dict[str, float]:
    """The headline scores of `model` in `workdir`, evaluated unless its metrics are already there."""
    path = os.path.join(workdir, "eval", f"{model}-{step}", "metrics.json")
    if not os.path.exists(path):
        cm3jax("eval", config, workdir, [*flags, f"--config.eval.model={model}"])
    with open(path) as f:
        return headline(json.load(f))


def main() -> None:
    args = parse_args()
    run = os.path.abspath(args.workdir)
    extra = args.overrides.split()
    with open(os.path.join(run, "lm", "COMPLETE.json")) as f:
        lm_step = json.load(f)["step"]
    # The pretrained LM scored in a folder of its own, so the run's own eval/ is left as the pipeline wrote it.
    scored = {"pretrained": scored_once(args.config, linked_run(run, "pretrained"), "lm", lm_step, extra)}
    for seed in args.seeds.split(","):  # every variant of one seed before the next seed
        for loss_on in args.loss_on.split(","):
            for cm3 in args.cm3.split(","):
                name = f"loss_{loss_on}-cm3_{cm3}-seed{seed}"
                variant = linked_run(run, name)
                flags = [*extra, f"--config.sft.steps={args.steps}", f"--config.sft.loss_on={loss_on}",
                         f"--config.sft.cm3={cm3 == 'on'}", f"--config.train.seed={seed}",
                         f"--config.data.seed={seed}"]
                cm3jax("sft", args.config, variant, flags)  # a variant already trained resumes at its end
                scored[name] = scored_once(args.config, variant, "sft", args.steps, flags)
    tasks = list(HEADLINE)
    print(f"{'model':<32}" + "".join(f"{t:>15}" for t in tasks))
    for name, scores in scored.items():
        print(f"{name:<32}" + "".join(f"{scores.get(t, float('nan')):>15.3f}" for t in tasks))
    print(json.dumps({"benchmark": "sft_variants", "config": args.config, "steps": args.steps,
                      "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "scores": scored}))


if __name__ == "__main__":
    main()
