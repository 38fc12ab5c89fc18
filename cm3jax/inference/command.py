"""`cm3jax generate <task>`: one request to the trained model, written to DIR/samples/<task>-<time>."""
from __future__ import annotations

import io
import json
import os
from typing import Any

import jax
import ml_collections
from etils import epath

from cm3jax.errors import UserError
from cm3jax.storage import absolute_path, atomic_write_text, save_png
from cm3jax.workdir import Workdir

GENERATE_TASKS = ("image", "caption", "vqa", "infill", "edit", "structure", "grounded")
# Tasks that read an image: the one to caption, question, infill or edit, or the segmentation map to follow.
_IMAGE_TASKS = ("caption", "vqa", "infill", "edit", "structure")


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
    request: dict = {"task": task, "model": flags.get("model")}
    if request["model"] not in (None, "lm", "sft"):
        raise GenerateInputError(f"--model must be lm or sft, got {request['model']!r}")
    if task in ("image", "structure", "grounded"):
        if not (flags.get("prompt") or "").strip():
            raise GenerateInputError(f"generate {task} needs a non-empty --prompt")
        request["prompt"] = flags["prompt"]
    if task in _IMAGE_TASKS:
        image = flags.get("image")
        if not image or not epath.Path(image).is_file():
            raise GenerateInputError(f"generate {task} needs --image PATH of an existing image file, got {image!r}")
        request["image"] = os.fspath(absolute_path(image))
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
    if task == "edit":
        if not (flags.get("instruction") or "").strip():
            raise GenerateInputError("generate edit needs a non-empty --instruction")
        request["instruction"] = flags["instruction"]
    if task == "grounded":
        request["boxes"] = parse_boxes(flags.get("boxes"))
    if "image" in request:  # read last: every flag is checked first
        _require_decodable_image(request["image"], task)
    return request


def _require_decodable_image(path: str, task: str) -> None:
    import PIL.Image

    try:
        with PIL.Image.open(io.BytesIO(epath.Path(path).read_bytes())) as image:
            image.load()
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:  # empty, truncated, not an image
        raise GenerateInputError(f"generate {task}: --image {path} cannot be read as an image ({e})") from e


def parse_boxes(text: str | None) -> list[tuple[str, tuple[int, int, int, int]]]:
    """"red circle:0,0,20,20;blue square:40,40,60,60" -> [(name, (x0, y0, x1, y1)), ...] in pixels."""
    objects = []
    for part in (text or "").split(";"):
        name, _, corners = part.rpartition(":")
        try:
            box = tuple(int(v) for v in corners.split(","))
        except ValueError:
            box = ()
        if not name.strip() or len(box) != 4:
            raise GenerateInputError(f"generate grounded needs --boxes \"NAME:x0,y0,x1,y1;...\" (pixels), got "
                                     f"{text!r}")
        objects.append((name.strip(), box))
    return objects


def model_to_use(model: str | None, workdir: Workdir) -> str:
    """`model` (lm or sft) when given, else the instruction-tuned model where the run has one, else the LM."""
    if model:
        return model
    return "sft" if workdir.sft.checkpoints.is_dir() else "lm"


def run_generate(config: ml_collections.ConfigDict, workdir: Workdir, request: dict) -> None:
    from cm3jax.config_validation import validate_generate_config
    from cm3jax.inference.decode import SamplingOptions
    from cm3jax.inference.generate import Generator, contact_sheet

    validate_generate_config(config)
    g, task, result = config.generate, request["task"], dict(request)
    options = SamplingOptions.from_config(g)
    generator = Generator.load(config, workdir, model=model_to_use(request.get("model"), workdir))
    images = None
    if task == "caption":
        result["caption"] = generator.caption(request["image"], seed=g.seed)
    elif task == "vqa":
        result["answer"] = generator.answer(request["image"], request["question"], seed=g.seed)
    else:
        num, seed = int(g.num), int(g.seed)
        if task == "image":
            images, _ = generator.images(request["prompt"], num, options, seed, int(g.retrieve),
                                         int(g.rerank_candidates))
        elif task == "infill":
            images = generator.infill(request["image"], request["box"], options, num=num, seed=seed)
        elif task == "edit":
            images = generator.edit(request["image"], request["instruction"], num, options, seed)
        elif task == "structure":
            images = generator.structure(request["image"], request["prompt"], num, options, seed)
        else:
            images = generator.grounded(request["prompt"], request["boxes"], num, options, seed)
        result["images"] = len(images)
    if jax.process_index() != 0:  # every process decodes its share; one writes the request's folder
        return
    # Written once the request has run, so a request refused on the way leaves no folder behind.
    out_dir = workdir.new_generate_folder(task)
    if images is not None:
        for i, image in enumerate(images):
            save_png(out_dir / f"{i:03d}.png", image)
        save_png(out_dir / "sheet.png", contact_sheet(images, columns=min(len(images), 8)))
    result.update(model=generator.model, step=generator.step, generate=g.to_dict())
    atomic_write_text(out_dir / "settings.json", json.dumps(result, indent=2, default=str))
    for key in ("caption", "answer"):
        if key in result:
            print(f"{key}: {result[key]}", flush=True)
    print(f"generate {task}: written to {out_dir}", flush=True)
