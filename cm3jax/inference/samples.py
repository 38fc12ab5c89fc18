"""The pipeline's `samples` stage: what a finished run can do, written to DIR/samples.

- `images.png`: one row per prompt of `generate.sample_prompts`, `generate.num` images each (config.generate's
  guidance, sampling, retrieval and re-ranking), with `images.json` listing the prompts row by row;
- `captions.json` and `captions.png`: captions of the first `generate.sample_captions` held-out images.
"""
from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
import PIL.Image

from cm3jax.inference.decode import SamplingOptions
from cm3jax.inference.generate import Generator, contact_sheet
from cm3jax.workdir import Workdir, atomic_write_text


def held_out_images(config: ml_collections.ConfigDict, workdir: Workdir | str,
                    count: int) -> list[tuple[np.ndarray, str]]:
    """(image, reference caption) of the first `count` readable examples of the eval split's raw data."""
    from cm3jax.data.sources import SkipCounts, open_raw_source, read_examples

    source = open_raw_source(config.raw_data, config.data.eval_split, str(Workdir.of(workdir).data))
    examples = read_examples(source, int(config.vqgan.image_size), SkipCounts(), range(min(len(source), 4 * count)))
    return [(e.image, e.caption) for _, e in zip(range(count), examples)]


def write_samples(config: ml_collections.ConfigDict, workdir: Workdir | str, out_dir: str | os.PathLike) -> dict:
    g, out_dir = config.generate, os.fspath(out_dir)
    generator = Generator.load(config, workdir)
    options = SamplingOptions.from_config(g)
    summary: dict = {"lm_step": generator.step}
    prompts = list(g.sample_prompts)
    if prompts:
        rows = [generator.images(prompt, int(g.num), options, seed=int(g.seed) + i, retrieve=int(g.retrieve),
                                 candidates=int(g.rerank_candidates))[0]
                for i, prompt in enumerate(prompts)]
        PIL.Image.fromarray(contact_sheet(np.concatenate(rows), columns=int(g.num))).save(
            os.path.join(out_dir, "images.png"))
        atomic_write_text(os.path.join(out_dir, "images.json"), json.dumps(
            {"rows": prompts, "guidance": g.guidance, "cfg_scale": g.cfg_scale, "temperature": g.temperature,
             "retrieve": g.retrieve, "rerank_candidates": g.rerank_candidates}, indent=2))
        summary["images"] = os.path.join(out_dir, "images.png")
    if g.sample_captions:
        pairs = held_out_images(config, workdir, int(g.sample_captions))
        captions = [{"reference": reference, "generated": generator.caption(image)} for image, reference in pairs]
        PIL.Image.fromarray(contact_sheet(np.stack([image for image, _ in pairs]), columns=len(pairs))).save(
            os.path.join(out_dir, "captions.png"))
        atomic_write_text(os.path.join(out_dir, "captions.json"), json.dumps(captions, indent=2))
        summary["captions"] = os.path.join(out_dir, "captions.json")
    return summary
