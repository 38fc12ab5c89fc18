"""Decoding figures, in two parts.

speed: per-token time at a 1,024-token context with the KV cache (one new token against the cache) vs recomputing
the whole sequence (what decoding without a cache does for every token), and the latency of one image (grid^2
tokens) with classifier-free guidance (two streams in one batch) after a short prompt; for the demo model's shape
and the cm3leon_350m shape, random weights (position tables sized for the test). Side by side, the peer a user would
otherwise pick: the same weights exported as OPT (cm3jax/export/) and run by transformers' `generate` (its KV cache,
greedy, batch 1, image codes only through suppress_tokens, CFG through guidance_scale and negative_prompt_ids), float32
on CPU with every core (bfloat16 on a GPU), in the same process.

quality: on a finished demo run (`make demo`), the share of generated digits that an independent classifier reads as
the prompted digit without guidance, with CFG and with CD-K, with the demo config's generate settings, and with those
settings keeping each image as the best of --best_of draws by the retriever's caption-image score (the paper's FID
protocol re-ranks 8 samples by CLIP score); and caption accuracy on the held-out digits. The classifier is
scikit-learn's logistic regression trained on scikit-learn's own 8x8 digits (the train split), not by cm3jax;
generated 32x32 images are averaged down to 8x8 ink levels for it. Its accuracy on the real held-out digits and on
their VQ-GAN reconstructions bounds what generation can reach.

    python benchmarks/decode.py                                   # both parts
    python benchmarks/decode.py --parts=speed --models=demo       # on a GPU: --models=demo,cm3leon:350m

Each part prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform

import numpy as np
from timing import best_time  # benchmarks/ is on the path when run as a script

from cm3jax.evaluation.digits import caption_digit, digit_classifier, ink_8x8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT, LONG = 32, 160  # tokens generated after the same prompt; per token = (t(LONG) - t(SHORT)) / (LONG - SHORT)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="speed,quality")
    p.add_argument("--models", default="demo,cm3leon:350m")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peer", type=int, default=1, help="speed: also time transformers' generate on the same weights")
    p.add_argument("--image_latency", type=int, default=1, help="speed: also time one whole image with CFG "
                                                                "(minutes per run for the 350M shape on CPU)")
    p.add_argument("--workdir", default=os.path.join(ROOT, "workdir", "demo"))
    p.add_argument("--per_class", type=int, default=20, help="quality: images generated per digit and setting")
    p.add_argument("--cfg", default="1.5,3", help="quality: comma-separated CFG scales")
    p.add_argument("--cdk_alpha", default="", help="quality: comma-separated CD-K alphas (default: the demo's)")
    p.add_argument("--temperature", type=float, default=1.0, help="quality: temperature of the guidance sweep")
    p.add_argument("--best_of", type=int, default=8, help="quality: draws per kept image when re-ranking (paper: 8)")
    return p.parse_args()


def compiled_best_time(jitted, args: tuple, repeats: int) -> float:
    """best_time of a jitted function compiled ahead of time (no untimed warm-up run)."""
    return best_time(jitted.lower(*args).compile(), args, repeats)


def speed_row(name: str, args) -> dict:

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from cm3jax import vocab as vocab_lib
    from cm3jax.config import load_recipe
    from cm3jax.inference.decode import GREEDY, SamplingOptions, Schedule, left_pad, make_decoder
    from cm3jax.models.transformer import CM3LeonDecoder, DecoderConfig

    config = load_recipe(name)
    config.model.max_seq_len = args.context + 64
    vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
    cfg = DecoderConfig.for_run(config, vocab)
    params = jax.jit(lambda r: nn.unbox(CM3LeonDecoder(cfg).init(r, jnp.zeros((1, 8), jnp.int32))["params"]))(
        jax.random.key(0))
    rng = np.random.default_rng(0)
    greedy = GREEDY

    def prompt(length):
        return np.concatenate([[vocab_lib.EOS], vocab.text_ids(rng.integers(0, vocab.text_size, length - 1))])

    # KV cache: generating LONG instead of SHORT tokens after the same prompt costs LONG - SHORT tokens at ~context
    # positions (a wide gap: the prompt's prefill, in both times, varies from run to run).
    tokens, mask = left_pad([prompt(args.context - LONG)])
    timed = {}
    for steps in (SHORT, LONG):
        run = make_decoder(cfg, vocab, Schedule.image(steps), greedy)
        timed[steps] = compiled_best_time(run, (params, tokens, mask, jax.random.key(0)), args.repeats)
    cached = (timed[LONG] - timed[SHORT]) / (LONG - SHORT)
    forward = jax.jit(lambda p, t: CM3LeonDecoder(cfg).apply({"params": p}, t)[:, -1])
    full = jnp.asarray(prompt(args.context))[None]
    recompute = compiled_best_time(forward, (params, full), args.repeats)

    grid = int(config.vqgan.image_size) // 2 ** (len(config.vqgan.channel_multipliers) - 1)
    caption = prompt(12)
    unconditional = np.array([vocab_lib.EOS, vocab.mask_id(0), vocab_lib.BREAK])
    latency = float("nan")
    if args.image_latency:
        image = make_decoder(cfg, vocab, Schedule.image(grid * grid), SamplingOptions(guidance="cfg", cfg_scale=3.0))
        tokens, mask = left_pad([caption, unconditional])
        latency = compiled_best_time(image, (params, tokens, mask, jax.random.key(0)), max(1, args.repeats - 1))
    params_count = sum(x.size for x in jax.tree.leaves(params))
    row = {"model": name, "params_m": params_count / 1e6, "context": args.context,
           "kv_cache_ms_per_token": cached * 1e3, "recompute_ms_per_token": recompute * 1e3,
           "speedup": recompute / cached, "image_tokens": grid * grid, "image_latency_s": latency,
           "compute_dtype": str(cfg.compute_dtype.name if hasattr(cfg.compute_dtype, "name") else cfg.compute_dtype)}
    if args.peer:
        peer = transformers_speed(config, vocab, jax.device_get(params), prompt(args.context - LONG), caption,
                                  unconditional, grid if args.image_latency else 0, args.repeats)
        row.update(peer)
        row["vs_transformers_per_token"] = peer["transformers_ms_per_token"] / row["kv_cache_ms_per_token"]
        row["vs_transformers_image"] = peer["transformers_image_latency_s"] / latency
    return row


def transformers_speed(config, vocab, params, prompt, caption, unconditional, grid: int, repeats: int) -> dict:
    """The same model exported as OPT and decoded by transformers' generate: per-token time (generating LONG against
    SHORT tokens after `prompt`, as for cm3jax) and one image's latency with CFG (grid 0: not timed)."""
    import tempfile
    import time

    import torch
    import transformers

    from cm3jax.export import opt
    from cm3jax.export.params_reader import leaves
    from cm3jax.export.safetensors_files import write_safetensors

    on_gpu = torch.cuda.is_available()
    torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory() as folder:
        tensors = [t for path, leaf in leaves(params) for t in opt.opt_tensors(path, np.asarray(leaf))]
        write_safetensors(folder, [(k, v.shape, v.dtype) for k, v in tensors], tensors, max_shard_bytes=1 << 62)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(opt.opt_config(config.model, vocab, "float32"), f)
        model = transformers.OPTForCausalLM.from_pretrained(folder).eval()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    model = model.to("cuda" if on_gpu else "cpu", dtype)
    device = model.device
    not_image = [i for i in range(vocab.padded_size) if not vocab.image_offset <= i < vocab.size]

    def generate(ids, steps, **guidance):
        ids = torch.tensor(np.asarray(ids)[None], device=device)
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps,
                           min_new_tokens=steps, suppress_tokens=not_image, **guidance)

    def timed(fn, times):
        fn()  # warm-up
        best = float("inf")
        for _ in range(times):
            if on_gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if on_gpu:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return best

    short, long = (timed(lambda steps=steps: generate(prompt, steps), repeats) for steps in (SHORT, LONG))
    cfg = {"guidance_scale": 3.0, "negative_prompt_ids": torch.tensor(unconditional[None], device=device)}
    image = timed(lambda: generate(caption, grid * grid, **cfg), max(1, repeats - 1)) if grid else float("nan")
    return {"transformers_ms_per_token": (long - short) / (LONG - SHORT) * 1e3, "transformers_image_latency_s": image,
            "transformers_dtype": str(dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads()}


def speed_part(args) -> None:
    import jax

    rows = [speed_row(name, args) for name in args.models.split(",")]
    device = jax.devices()[0].device_kind
    print(f"\ndecoding speed ({device}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
          f"random weights, greedy, batch 1")
    print(f"{'model':>14s}{'params M':>10s}{'KV ms/tok':>11s}{'recompute ms/tok':>18s}{'x':>7s}"
          f"{'image tokens':>14s}{'image s (CFG)':>15s}")
    for r in rows:
        print(f"{r['model']:>14s}{r['params_m']:10.1f}{r['kv_cache_ms_per_token']:11.2f}"
              f"{r['recompute_ms_per_token']:18.2f}{r['speedup']:7.1f}{r['image_tokens']:14d}"
              f"{r['image_latency_s']:15.2f}")
    if args.peer:
        print(f"\nagainst transformers' generate on the same weights ({rows[0]['transformers_dtype']}, "
              f"{rows[0]['torch_threads']} torch threads); ratio = transformers time / cm3jax time")
        print(f"{'model':>14s}{'HF ms/tok':>11s}{'ratio':>8s}{'HF image s (CFG)':>18s}{'ratio':>8s}")
        for r in rows:
            print(f"{r['model']:>14s}{r['transformers_ms_per_token']:11.2f}{r['vs_transformers_per_token']:8.2f}"
                  f"{r['transformers_image_latency_s']:18.2f}{r['vs_transformers_image']:8.2f}")
    print(json.dumps({"benchmark": "decode_speed", "device": device, "rows": rows}))


def generated_accuracy(generator, classifier, options, per_class: int, best_of: int = 0) -> float:
    """Share of `per_class` images per digit that the classifier reads as the prompted digit. With best_of, each
    image is the best of that many draws by the retriever's caption-image score (the paper's FID protocol)."""
    from cm3jax.data.embedded.digits import NAMES

    hits = 0
    for digit, word in enumerate(NAMES):
        prompt = f"a handwritten {word}"
        if best_of:
            images = np.concatenate([generator.images(prompt, 1, options, seed=per_class * digit + i,
                                                      candidates=best_of)[0] for i in range(per_class)])
        else:
            images = generator.images(prompt, per_class, options, seed=digit)[0]
        hits += int(np.sum(classifier.predict(ink_8x8(images)) == digit))
    return hits / (10 * per_class)


def quality_part(args) -> None:
    from cm3jax.data.sources import SkipCounts, open_raw_source, read_examples
    from cm3jax.inference.decode import SamplingOptions
    from cm3jax.inference.generate import Generator
    from configs import demo

    config = demo.get_config()
    generator = Generator.load(config, args.workdir)
    classifier = digit_classifier()
    source = open_raw_source(config.raw_data, "validation", os.path.join(args.workdir, "data"))
    examples = list(read_examples(source, 32, SkipCounts()))
    labels = np.array([source.raw(i)[2]["label"] for i in range(len(source))])
    real = np.stack([e.image for e in examples])
    reconstructed = generator.decode_codes(np.stack([generator.encode_image(image) for image in real]))
    rows = [{"setting": "classifier on real held-out digits", "accuracy": float(np.mean(
        classifier.predict(ink_8x8(real)) == labels))},
            {"setting": "classifier on their VQ-GAN reconstructions", "accuracy": float(np.mean(
                classifier.predict(ink_8x8(reconstructed)) == labels))}]
    g = config.generate
    t = args.temperature
    settings = [("no guidance", SamplingOptions(temperature=t, guidance="none"))]
    settings += [(f"CFG {float(scale):g}", SamplingOptions(temperature=t, guidance="cfg", cfg_scale=float(scale)))
                 for scale in args.cfg.split(",")]
    settings += [(f"CD-K (alpha {float(alpha):g}, k {g.cdk_k})",
                  SamplingOptions(temperature=t, guidance="cdk", cdk_alpha=float(alpha), cdk_k=int(g.cdk_k)))
                 for alpha in (args.cdk_alpha or str(g.cdk_alpha)).split(",")]
    demo_settings = SamplingOptions.from_config(g)
    settings.append((f"demo settings (T {demo_settings.temperature:g}, {g.guidance} {g.cfg_scale:g})", demo_settings))
    for name, options in settings:
        rows.append({"setting": f"generated digits, {name}",
                     "accuracy": generated_accuracy(generator, classifier, options, args.per_class)})
    rows.append({"setting": f"generated digits, demo settings, best of {args.best_of} by the retriever",
                 "accuracy": generated_accuracy(generator, classifier, demo_settings, args.per_class, args.best_of)})
    captions = [generator.caption(e.image) for e in examples]
    rows.append({"setting": "captions naming the held-out digit (greedy, infill)",
                 "accuracy": float(np.mean([caption_digit(c) == y for c, y in zip(captions, labels)]))})

    print(f"\ndemo generation quality (LM step {generator.step}; {args.per_class} images per digit per setting, "
          f"guidance sweep at temperature {t:g}; {len(examples)} held-out digits)")
    for r in rows:
        print(f"{r['setting']:62s}{r['accuracy']:8.1%}")
    print(json.dumps({"benchmark": "decode_quality", "lm_step": generator.step, "per_class": args.per_class,
                      "temperature": t,
                      "rows": rows, "caption_examples": captions[:5]}))


def main():
    args = parse_args()
    parts = args.parts.split(",")
    if "speed" in parts:
        speed_part(args)
    if "quality" in parts:
        quality_part(args)


if __name__ == "__main__":
    main()
