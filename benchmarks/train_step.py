"""Train-step throughput and MFU of the CM3leon decoder, side by side with PyTorch + HuggingFace OPTForCausalLM.

Both run the same architecture (pre-LN, no biases, no LayerNorm parameters, ReLU FFN 4d, learned positions,
untied LM head), batch, sequence length, dtype (float32 on CPU) and thread count, with AdamW and clipping at 1.0.
MFU = model FLOPs per step (cm3jax.models.transformer.flops_per_token, PaLM formula) / step time / peak, where the
peak is the best dense matmul throughput in the compute dtype measured in this run (jax and torch, the larger). On a
GPU torch runs the same step under bfloat16 autocast with SDPA attention.

Each implementation runs in its own worker process, so that neither framework's allocator and thread pools slow the
other, and the parent has them step in turns of a few back-to-back steps, so that a drift in machine speed affects
both alike; the first step of each turn is not timed (see StepWorkers.median_step_seconds).

The CPU shape runs cm3jax with its CPU training settings (no remat, model.scan_unroll = layers,
runtime.retain_freed_host_memory) and torch as installed; --torch_retain_host_memory gives torch the same malloc
settings, for a like-for-like comparison.

    python benchmarks/train_step.py                       # CPU: d=512, 8 layers, seq 512, batch 8
    python benchmarks/train_step.py --torch_retain_host_memory   # both with the same malloc settings
    python benchmarks/train_step.py --config=configs/cm3leon.py:350m --batch=8   # an accelerator, paper shape
    python benchmarks/train_step.py --config=configs/cm3leon.py:350m --batch=8 --remat=none --attention=cudnn

Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import platform
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="", help="recipe file for the model shape (default: the CPU target shape)")
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=0,
                   help="vocabulary size (default: the recipe's with --config, else 8192)")
    p.add_argument("--remat", default="", help="override model.remat_policy (none | full | dots | dots_no_batch)")
    p.add_argument("--attention", default="", help="override model.attention (xla | cudnn | splash)")
    p.add_argument("--steps", type=int, default=8, help="timed steps of each implementation")
    p.add_argument("--block", type=int, default=4, help="back-to-back timed steps per turn of each implementation")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--torch_retain_host_memory", action="store_true",
                   help="give the torch worker the malloc settings of runtime.retain_freed_host_memory too")
    return p.parse_args()


def load_model_config(args):
    from cm3jax.config import base_config, load_recipe
    from cm3jax.vocab import UnifiedVocab

    if args.config:
        config = load_recipe(args.config)
        args.d_model, args.layers, args.heads = config.model.d_model, config.model.num_layers, config.model.num_heads
        args.seq = config.train.seq_len
        args.vocab = args.vocab or UnifiedVocab.from_config(config.vocab).size
    else:
        config = base_config()
        # The CPU training settings: no remat, no layer loop, freed host memory kept (cm3jax/host_memory.py).
        config.model.update(remat_policy="none", scan_unroll=args.layers)
        config.runtime.retain_freed_host_memory = True
        args.vocab = args.vocab or 8192
    config.model.update(d_model=args.d_model, num_layers=args.layers, num_heads=args.heads, max_seq_len=args.seq)
    if args.remat:
        config.model.remat_policy = args.remat
    if args.attention:
        config.model.attention = args.attention
    config.train.update(global_batch_size=args.batch, seq_len=args.seq, steps=1000)
    return config


def time_calls(fn, steps: int) -> float:
    """Median seconds per call after two warm-up calls; fn must block until its result is ready."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_matmul_size(on_cpu: bool) -> int:
    """Side of the square matmul that measures the peak: large enough to saturate the device, small enough for CPU."""
    return 2048 if on_cpu else 8192


def jax_matmul_peak(n: int, dtype) -> float:
    import jax

    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    return 2 * n ** 3 / time_calls(lambda: matmul(a, b).block_until_ready(), 10)


def torch_matmul_peak(n: int, device: str) -> float:
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / time_calls(lambda: torch_sync(a @ b, device), 10)


def torch_sync(result, device: str):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    return result


def cm3jax_step(config, args, vocab_size: int):
    """A closure that runs one cm3jax train step (AdamW, clipping) and waits for it."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cm3jax.models.transformer import CM3LeonDecoder, DecoderConfig
    from cm3jax.train.lm import make_train_step
    from cm3jax.train.optim import make_optimizer
    from cm3jax.train.state import TrainState

    decoder_config = DecoderConfig.from_config(config.model, vocab_size)
    model = CM3LeonDecoder(decoder_config)
    optimizer, schedule = make_optimizer(config.optim, config.train.steps)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, args.seq), jnp.int32))["params"])
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
    rng = np.random.default_rng(0)
    shape = (args.batch, args.seq)
    batch = {
        "inputs": jnp.asarray(rng.integers(0, vocab_size, shape), jnp.int32),
        "targets": jnp.asarray(rng.integers(0, vocab_size, shape), jnp.int32),
        "loss_weights": jnp.ones(shape, jnp.float32),
        "image_cells": jnp.zeros(shape, jnp.int32),
        "segment_ids": jnp.ones(shape, jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(args.seq, dtype=jnp.int32), shape),
        "modality": jnp.ones(shape, jnp.int32),
    }
    step = jax.jit(make_train_step(model, optimizer, schedule, 0.0, 1), donate_argnums=0)
    holder = [state]

    def run():
        holder[0], metrics = step(holder[0], batch)
        jax.block_until_ready(metrics["loss"])

    return run


def torch_step(args, vocab_size: int, device: str):
    """A closure that runs one PyTorch + HF OPTForCausalLM train step (AdamW, clipping); bfloat16 autocast on cuda."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=vocab_size, hidden_size=args.d_model, num_hidden_layers=args.layers, ffn_dim=4 * args.d_model,
        num_attention_heads=args.heads, max_position_embeddings=args.seq, word_embed_proj_dim=args.d_model,
        enable_bias=False, layer_norm_elementwise_affine=False, do_layer_norm_before=True,
        activation_function="relu", dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False,
    )
    model = OPTForCausalLM._from_config(config, attn_implementation="sdpa").to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.1,
                                  fused=device == "cuda")
    inputs = torch.randint(0, vocab_size, (args.batch, args.seq), device=device)
    labels = torch.randint(0, vocab_size, (args.batch, args.seq), device=device)

    def run():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, vocab_size).float(), labels.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch_sync(None, device)

    return run


def step_worker(name: str, args, conn) -> None:
    """One implementation in its own process: builds its step, reports its figures, then runs and times one step per
    'step' message until 'stop'."""
    if name == "cm3jax" and not args.skip_torch:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")  # a GPU shared with the torch worker
    config = load_model_config(args)
    retain = config.runtime.retain_freed_host_memory if name == "cm3jax" else args.torch_retain_host_memory
    if retain:  # before either framework starts its threads
        from cm3jax.host_memory import retain_freed_host_memory

        retain = retain_freed_host_memory()
    import jax

    if name == "cm3jax":
        from cm3jax.models.transformer import DecoderConfig, flops_per_token

        device = jax.devices()[0]
        decoder_config = DecoderConfig.from_config(config.model, args.vocab, device.platform)
        peak = jax_matmul_peak(peak_matmul_size(device.platform == "cpu"), decoder_config.compute_dtype)
        report = {"device": device.device_kind, "platform": device.platform,
                  "dtype": str(decoder_config.compute_dtype), "attention": decoder_config.attention,
                  "remat": decoder_config.remat_policy, "scan_unroll": decoder_config.scan_unroll,
                  "retain_freed_host_memory": retain,
                  "flops_per_step": flops_per_token(decoder_config, args.seq) * args.batch * args.seq,
                  "jax_matmul_peak_tflops": peak / 1e12}
        run = cm3jax_step(config, args, args.vocab)
    else:
        import torch

        torch.set_num_threads(args.threads)
        size = peak_matmul_size(args.torch_device == "cpu")
        report = {"torch_matmul_peak_tflops": torch_matmul_peak(size, args.torch_device) / 1e12,
                  "torch_retain_host_memory": retain}
        run = torch_step(args, args.vocab, args.torch_device)
    conn.send(report)
    while conn.recv() == "step":
        start = time.perf_counter()
        run()
        conn.send(time.perf_counter() - start)


class StepWorkers:
    """Worker processes, one per implementation, started in order (each reports before the next starts)."""

    def __init__(self):
        self.context = multiprocessing.get_context("spawn")
        self.workers = {}

    def start(self, name: str, args) -> dict:
        parent, child = self.context.Pipe()
        process = self.context.Process(target=step_worker, args=(name, args, child), daemon=True)
        process.start()
        self.workers[name] = (process, parent)
        return parent.recv()

    def step(self, name: str) -> float:
        _, conn = self.workers[name]
        conn.send("step")
        return conn.recv()

    def median_step_seconds(self, steps: int, block: int) -> dict:
        """Median of `steps` timed steps of each implementation, taken in turns of `block` back-to-back steps.

        Each turn starts with one untimed step: on a VM that reclaims memory left idle while the other implementation
        ran, that step pays for faulting it back in, which a training run stepping back to back never does."""
        for name in self.workers:
            self.step(name)  # compiles
        times = {name: [] for name in self.workers}
        while any(len(t) < steps for t in times.values()):
            for name in self.workers:
                self.step(name)
                times[name] += [self.step(name) for _ in range(min(block, steps - len(times[name])))]
        return {name: sorted(t)[len(t) // 2] for name, t in times.items()}

    def stop(self) -> None:
        for process, conn in self.workers.values():
            conn.send("stop")
            process.join()


def main():
    args = parse_args()
    load_model_config(args)  # resolves the recipe's shape into args for the workers
    workers = StepWorkers()
    figures = workers.start("cm3jax", args)
    torch_device = {"cpu": "cpu", "gpu": "cuda"}.get(figures["platform"])
    use_torch = not args.skip_torch and torch_device and importlib.util.find_spec("transformers")
    if use_torch:
        args.torch_device = torch_device
        figures.update(workers.start("torch", args))
    elif torch_device and not args.skip_torch:
        print("torch/transformers not installed: pip install -e '.[bench]' for the side-by-side comparison")
    figures.update({"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "d_model": args.d_model, "layers": args.layers, "seq": args.seq, "batch": args.batch,
                    "vocab": args.vocab, "malloc_tunables": os.environ.get("GLIBC_TUNABLES", "")})
    peak = max(v for k, v in figures.items() if k.endswith("_matmul_peak_tflops")) * 1e12
    seconds = workers.median_step_seconds(args.steps, args.block)
    workers.stop()

    tokens = args.batch * args.seq
    labels = {"cm3jax": "cm3jax (jax.jit)", "torch": "torch + HF OPTForCausalLM"}
    rows = []
    for name, step_s in seconds.items():
        mfu = figures["flops_per_step"] / step_s / peak
        figures.update({f"{name}_step_s": step_s, f"{name}_tokens_per_s": tokens / step_s, f"{name}_mfu": mfu})
        rows.append((labels[name], step_s, tokens / step_s, mfu))
    if "torch" in seconds:
        figures["ratio_cm3jax_over_torch"] = seconds["torch"] / seconds["cm3jax"]

    print(f"device {figures['device']} ({figures['cpu']}), {args.threads} threads, {figures['dtype']}; "
          f"d={args.d_model} layers={args.layers} seq={args.seq} batch={args.batch} vocab={args.vocab}; "
          f"matmul peak {peak / 1e12:.3f} TFLOP/s")
    print(f"{'implementation':28s} {'step s':>9s} {'tokens/s':>10s} {'MFU':>7s}")
    for name, step_s, tps, mfu in rows:
        print(f"{name:28s} {step_s:9.4f} {tps:10.0f} {mfu:7.1%}")
    if "ratio_cm3jax_over_torch" in figures:
        print(f"cm3jax / torch throughput: {figures['ratio_cm3jax_over_torch']:.2f}x")
    print(json.dumps({"benchmark": "train_step", **figures}))


if __name__ == "__main__":
    main()
