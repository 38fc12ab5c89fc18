"""VQ-GAN tokenizer figures: encode and decode throughput for the demo and paper configs on this machine, and the
held-out quality of the demo's trained VQ-GAN (PSNR, LPIPS, codebook usage, code perplexity on the whole digits
validation split).

    make demo && python benchmarks/vqgan.py            # quality from workdir/demo/vqgan
    python benchmarks/vqgan.py --workdir=DIR --paper_batch=32

Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform

from timing import best_time  # benchmarks/ is on the path when run as a script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=os.path.join(ROOT, "workdir", "demo"))
    p.add_argument("--demo_batch", type=int, default=64)
    p.add_argument("--paper_batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args()


def recipe(spec: str):
    from cm3jax.config import load_recipe

    return load_recipe(spec)


def throughput(config, batch: int, repeats: int) -> dict:
    import jax

    from cm3jax.models.vqgan import VQGAN, VQGANConfig

    model_config = VQGANConfig.from_config(config)
    model = VQGAN(model_config)
    images = jax.random.uniform(jax.random.key(0), (batch, model_config.image_size, model_config.image_size, 3),
                                minval=-1, maxval=1)
    params = jax.jit(model.init)(jax.random.key(1), images[:1])["params"]
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))
    decode = jax.jit(lambda p, c: model.apply({"params": p}, c, method=model.decode))
    codes = jax.block_until_ready(encode(params, images))
    jax.block_until_ready(decode(params, codes))

    return {"image_size": model_config.image_size, "tokens_per_image": model_config.tokens_per_image,
            "codebook": model_config.codebook_size, "batch": batch,
            "encode_images_per_s": batch / best_time(encode, (params, images), repeats),
            "decode_images_per_s": batch / best_time(decode, (params, codes), repeats),
            "device": jax.devices()[0].device_kind, "params_m": sum(x.size for x in jax.tree.leaves(params)) / 1e6}


def held_out_quality(workdir: str) -> dict | None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cm3jax.data.sources import SkipCounts, open_raw_source, read_examples
    from cm3jax.models.vqgan import VQGAN, pixels_from_uint8
    from cm3jax.tokenizers.image import ImageTokenizer
    from cm3jax.train.vqgan import code_statistics, load_lpips, psnr
    from cm3jax.workdir import Workdir

    config, workdir = recipe("demo"), Workdir(workdir)
    if not workdir.vqgan.checkpoints.is_dir():
        return None
    tokenizer = ImageTokenizer.load(config, workdir)
    params, step, model = tokenizer.params, tokenizer.step, VQGAN(tokenizer.model_config)
    lpips_model, lpips_params = load_lpips("vgg16")
    source = open_raw_source(config.raw_data, "validation", str(workdir.data))
    images = np.stack([e.image for e in read_examples(source, config.vqgan.image_size, SkipCounts())])
    images = jnp.asarray(pixels_from_uint8(images))
    reconstructions, codes, _, _ = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images)
    perceptual = jax.jit(lambda p, a, b: lpips_model.apply({"params": p}, a, b))(
        lpips_params, jnp.clip(reconstructions, -1, 1), images)
    stats = code_statistics(codes, model.config.codebook_size, jnp.ones(images.shape[0]))
    return {"vqgan_step": step, "images": int(images.shape[0]),
            "psnr_db": float(jnp.mean(psnr(reconstructions, images))),
            "lpips_vgg16": float(jnp.mean(perceptual)), "codebook_usage": float(stats["codebook_usage"]),
            "code_perplexity": float(stats["code_perplexity"])}


def main():
    args = parse_args()
    rows = {"demo": throughput(recipe("demo"), args.demo_batch, args.repeats),
            "paper (cm3leon_350m)": throughput(recipe("cm3leon:350m"), args.paper_batch, args.repeats)}
    quality = held_out_quality(args.workdir)
    print(f"\nVQ-GAN ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    print(f"{'config':22s}{'image':>7s}{'tokens':>8s}{'params':>9s}{'batch':>7s}{'encode img/s':>14s}"
          f"{'decode img/s':>14s}")
    for name, r in rows.items():
        print(f"{name:22s}{r['image_size']:7d}{r['tokens_per_image']:8d}{r['params_m']:8.1f}M{r['batch']:7d}"
              f"{r['encode_images_per_s']:14.1f}{r['decode_images_per_s']:14.1f}")
    if quality is None:
        print(f"no trained demo VQ-GAN under {args.workdir}: run `make demo` for the held-out quality figures")
    else:
        print(f"demo VQ-GAN after {quality['vqgan_step']} steps, digits validation ({quality['images']} images): "
              f"PSNR {quality['psnr_db']:.2f} dB, LPIPS(vgg16) {quality['lpips_vgg16']:.4f}, codebook usage "
              f"{quality['codebook_usage']:.1%}, code perplexity {quality['code_perplexity']:.1f}")
    print(json.dumps({"benchmark": "vqgan", "machine": platform.machine(), "cpu_count": os.cpu_count(),
                      "throughput": rows, "demo_quality": quality}))


if __name__ == "__main__":
    main()
