"""`cm3jax generate <task>`: one request to the trained model, written to DIR/samples/<task>-<time>."""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
from etils import epath

from cm3jax.errors import UserError
from cm3jax.storage import atomic_write_text, is_remote, save_png
from cm3jax.workdir import Workdir

GENERATE_TASKS = ("image", "caption", "vqa", "infill")


class GenerateInputError(UserError, ValueError):
    """A generate request that cannot run: reported in one line."""


def generate_request(config: ml_collections.ConfigDict, task: str, flags: dict[str, Any]) -> dict:
    """The request from the command's flags (None where not given), falling back to config.generate (which it
    updates), checked before any model is loaded."""
    g = config.generate
    for flag, field in (("num", "num"), ("seed", "seed"), ("retrieve", "retrieve"),
                        ("candidates", "rerank_candidates")):
        if flags.get(flag) is not None:
            g[field] = flags[flag]
    if flags.get("cdk"):
        g.guidance = "cdk"
    elif flags.get("cfg") is not None:
        g.guidance, g.cfg_scale = "cfg", flags["cfg"]
    request: dict = {"task": task}
    if task == "image":
        if not (flags.get("prompt") or "").strip():
            raise GenerateInputError("generate image needs a non-empty --prompt")
        request["prompt"] = flags["prompt"]
    else:
        image = flags.get("image")
        if not image or not epath.Path(image).is_file():
            raise GenerateInputError(f"generate {task} needs --image PATH of an existing image file, got {image!r}")
        request["image"] = image if is_remote(image) else os.path.abspath(image)
    if task == "vqa":
        if not (flags.get("question") or "").strip():
            raise GenerateInputError("generate vqa needs a non-empty --question")
        request["question"] = flags["question"]
    if task == "infill":
        try:
            box = tuple(int(v) for v in (flags.get("box") or "").split(","))
        except ValueError:
            box = ()
        if len(box) != 4:
            raise GenerateInputError(f"generate infill needs --box x0,y0,x1,y1 (pixels), got {flags.get('box')!r}")
        request["box"] = box
    return request


def run_generate(config: ml_collections.ConfigDict, workdir: Workdir, request: dict) -> None:
    from cm3jax.config_validation import validate_generate_config
    from cm3jax.inference.decode import SamplingOptions
    from cm3jax.inference.generate import Generator, contact_sheet

    validate_generate_config(config)
    g, task, result = config.generate, request["task"], dict(request)
    options = SamplingOptions.from_config(g)
    generator = Generator.load(config, workdir)
    out_dir = workdir.generate_output(task)
    out_dir.mkdir(parents=True, exist_ok=True)
    if task == "caption":
        result["caption"] = generator.caption(request["image"], seed=g.seed)
    elif task == "vqa":
        result["answer"] = generator.answer(request["image"], request["question"], seed=g.seed)
    else:
        if task == "image":
            images, _ = generator.images(request["prompt"], int(g.num), options, int(g.seed), int(g.retrieve),
                                         int(g.rerank_candidates))
        else:
            images = generator.infill(request["image"], request["box"], options, num=int(g.num), seed=int(g.seed))
        for i, image in enumerate(images):
            save_png(out_dir / f"{i:03d}.png", image)
        save_png(out_dir / "sheet.png", contact_sheet(images, columns=min(len(images), 8)))
        result["images"] = len(images)
    result.update(lm_step=generator.step, generate=g.to_dict())
    atomic_write_text(out_dir / "settings.json", json.dumps(result, indent=2, default=str))
    for key in ("caption", "answer"):
        if key in result:
            print(f"{key}: {result[key]}", flush=True)
    print(f"generate {task}: written to {out_dir}", flush=True)
