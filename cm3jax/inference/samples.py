"""The pipeline's `samples` stage: what a finished run can do (its SFT model where the pipeline trains one, else its
LM), written to DIR/samples.

- `images.png`: one row per prompt of `generate.sample_prompts`, `generate.num` images each (config.generate's
  guidance, sampling, retrieval and re-ranking), with `images.json` listing the prompts row by row;
- `captions.json` and `captions.png`: captions of the first `generate.sample_captions` held-out images.
"""
from __future__ import annotations

import json

import ml_collections
import numpy as np
from etils import epath

from cm3jax.inference.decode import SamplingOptions
from cm3jax.inference.generate import Generator, contact_sheet
from cm3jax.storage import PathLike, atomic_write_text, save_png
from cm3jax.workdir import Workdir


def held_out_images(config: ml_collections.ConfigDict, workdir: Workdir | str,
                    count: int) -> list[tuple[np.ndarray, str]]:
    """(image, reference caption) of the first `count` readable examples of the eval split's raw data."""
    from cm3jax.data.sources import SkipCounts, open_raw_source, read_examples

    source = open_raw_source(config.raw_data, config.data.eval_split, str(Workdir.of(workdir).data))
    examples = read_examples(source, int(config.vqgan.image_size), SkipCounts(), range(min(len(source), 4 * count)))
    return [(e.image, e.caption) for _, e in zip(range(count), examples)]


def write_samples(config: ml_collections.ConfigDict, workdir: Workdir | str, out_dir: PathLike) -> dict:
    g, out_dir = config.generate, epath.Path(out_dir)
    generator = Generator.load(config, workdir, model="sft" if int(config.sft.steps) > 0 else "lm")
    options = SamplingOptions.from_config(g)
    summary: dict = {"model": generator.model, "step": generator.step}
    prompts = list(g.sample_prompts)
    if prompts:
        rows = [generator.images(prompt, int(g.num), options, seed=int(g.seed) + i, retrieve=int(g.retrieve),
                                 candidates=int(g.rerank_candidates))[0]
                for i, prompt in enumerate(prompts)]
        save_png(out_dir / "images.png", contact_sheet(np.concatenate(rows), columns=int(g.num)))
        atomic_write_text(out_dir / "images.json", json.dumps(
            {"rows": prompts, "guidance": g.guidance, "cfg_scale": g.cfg_scale, "temperature": g.temperature,
             "retrieve": g.retrieve, "rerank_candidates": g.rerank_candidates}, indent=2))
        summary["images"] = str(out_dir / "images.png")
    if g.sample_captions:
        pairs = held_out_images(config, workdir, int(g.sample_captions))
        captions = [{"reference": reference, "generated": generator.caption(image)} for image, reference in pairs]
        save_png(out_dir / "captions.png", contact_sheet(np.stack([image for image, _ in pairs]), columns=len(pairs)))
        atomic_write_text(out_dir / "captions.json", json.dumps(captions, indent=2))
        summary["captions"] = str(out_dir / "captions.json")
    return summary
