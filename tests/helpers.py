"""Shared test helpers: run the LM train step directly on a mesh, outside the loop; run `cm3jax` commands on 1 or 2
processes on localhost; and the tiny whole-pipeline config."""
import os
import signal
import socket
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np

from cm3jax.parallel.mesh import create_mesh
from cm3jax.parallel.sharding import global_batch, logical_axis_rules
from cm3jax.train import loop
from cm3jax.train.lm import build_lm_task


def train_steps(config, devices, num_steps):
    """Initialises the LM on a mesh over `devices` and runs `num_steps` train steps.

    Returns (params on host, list of per-step metrics on host, state shardings)."""
    mesh = create_mesh(config, devices)
    task, _ = build_lm_task(config, mesh)
    rules = logical_axis_rules(config)
    _, shardings = loop.abstract_state_and_shardings(task.init_state, mesh, rules)
    state = loop.initialize_state(task.init_state, jax.random.key(config.train.seed), mesh, rules, shardings)
    history = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = loop.jit_train_step(task, mesh, shardings)
        for _ in range(num_steps):
            batch = global_batch(next(task.train_data), mesh, task.global_batch_size)
            state, metrics = step(state, batch)
            history.append(jax.device_get(metrics))
    return jax.device_get(state.params), history, shardings


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(command_and_flags, workdir, num_processes, devices_per_process, config="configs/tiny.py",
                   delayed_process=None, expect_success=True):
    """Runs `python -m cm3jax COMMAND --config=CONFIG --workdir=WORKDIR FLAGS...` on `num_processes` processes of
    `devices_per_process` CPU devices (gloo collectives between them); asserts each exits 0 (or, with
    `expect_success=False`, that none does); returns their outputs. Process `delayed_process` writes its files late
    (tests/delayed_writes)."""
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    if delayed_process is not None:
        env.update(CM3JAX_TEST_DELAYED_PROCESS=str(delayed_process), PYTHONPATH=os.pathsep.join(
            [os.path.join(REPO, "tests", "delayed_writes"), *filter(None, [env.get("PYTHONPATH")])]))
    args = [sys.executable, "-m", "cm3jax", command_and_flags[0], f"--config={config}", f"--workdir={workdir}",
            *command_and_flags[1:]]
    if num_processes > 1:
        args += [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                 f"--config.distributed.num_processes={num_processes}"]
    procs = [subprocess.Popen(args + ([f"--config.distributed.process_id={i}"] if num_processes > 1 else []),
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(num_processes)]
    outputs = communicate_all(procs, timeout=300)
    for p, out in zip(procs, outputs):
        assert (p.returncode == 0) == expect_success, out[-4000:]
    return outputs


def communicate_all(procs, timeout: float) -> list[str]:
    """Each process's output once all have exited. Past `timeout` seconds the ones still running are sent SIGABRT,
    which makes Python's fault handler (PYTHONFAULTHANDLER) print every thread's stack, and the test fails with those
    stacks: a hang is diagnosed, and no process outlives its test."""
    deadline = time.monotonic() + timeout
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    q.send_signal(signal.SIGABRT)
            stacks = outputs + [_output_or_kill(q) for q in procs[len(outputs):]]
            raise AssertionError(f"still running after {timeout} s; stacks at SIGABRT:\n" + "\n".join(
                f"--- process {i} ---\n{out[-6000:]}" for i, out in enumerate(stacks))) from None
    return outputs


def _output_or_kill(proc) -> str:
    try:
        return proc.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0]


def config_flags(config, base) -> list[str]:
    """`--config.FIELD=VALUE` for every field where `config` differs from `base` (a recipe's config), so a command
    line gives a subprocess the config a test built in Python."""
    flags = []
    for field, value in _leaves(config.to_dict()):
        base_value = base
        for key in field.split("."):
            base_value = base_value[key]
        if value != base_value:
            flags.append(f"--config.{field}={value if isinstance(value, str) else repr(value)}")
    return flags


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def copy_run(source, to):
    """A copy of a (session-wide) run folder that a test may change."""
    import shutil

    shutil.copytree(source, to, symlinks=True)
    return to


def tiny_pipeline_config():
    """The whole pipeline (data -> vqgan -> tokens -> retrieval -> lm) on 64 shapes scenes, a few steps per stage;
    samples off (they add compile time, not checks, where this is used)."""
    from configs import tiny

    c = tiny.get_config()
    c.raw_data.update(dataset="shapes", shapes_train_size=64, shapes_image_size=32)
    c.data.update(source="token_shards", retrieval="neighbours")
    c.train.update(seq_len=48, steps=4, checkpoint_every=2)
    c.model.max_seq_len = 160  # room for the editing prompts that eval scores
    c.generate.update(sample_captions=0, sample_prompts=())
    c.eval.update(num_examples=4, batch_size=4, loss_batches=1, guidance=("cfg",))
    return c


def read_metrics_rows(stage_dir):
    """Every row of a stage's metrics.jsonl (local or in a bucket)."""
    import json

    from etils import epath

    return [json.loads(line) for line in (epath.Path(stage_dir) / "logs" / "metrics.jsonl").read_text().splitlines()]


def train_losses(stage_dir):
    """(step, loss) of every train row of a stage's metrics.jsonl."""
    return [(r["step"], r["loss"]) for r in read_metrics_rows(stage_dir) if r["split"] == "train"]


def random_state_dict(seed=0):
    """A state dict of FID's InceptionV3 in pytorch-fid's names and layouts (conv weights [out, in, kh, kw]), random
    values."""
    from cm3jax.evaluation import inception

    rng = np.random.default_rng(seed)
    abstract = inception._abstract_variables()
    state = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract[collection])[0]:
            names = [p.key for p in path]
            shape = leaf.shape[::-1][:2] + leaf.shape[:2] if names[-1] == "kernel" else leaf.shape
            if names[-1] == "kernel":
                fan_in = np.prod(leaf.shape[:3])
                value = rng.normal(0, np.sqrt(2 / fan_in), shape)
            else:  # batch norm as the identity, so the random network keeps its input's differences
                value = np.ones(shape) if names[-1] in ("var", "scale") else np.zeros(shape)
            state[inception.torch_name(collection, names)] = value.astype(np.float32)
    state["fc.weight"] = np.zeros((1008, 2048), np.float32)  # the classifier: not part of the features
    return state
