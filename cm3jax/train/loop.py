"""The generic training loop every trainer (LM, VQ-GAN, retriever) runs: sharded state initialisation or restore,
one jitted step with donated state, logging, periodic evaluation, checkpoints, preemption and divergence handling."""
from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cm3jax.config import config_to_json
from cm3jax.errors import MissingInputError
from cm3jax.parallel import sharding
from cm3jax.train.checkpoint import (
    Checkpointer,
    gather_process_states,
    require_resumable,
    resume_step,
    saved_config,
    select_process_state,
    set_aside_checkpoints_after,
)
from cm3jax.train.metrics import MetricsWriter, peak_flops_per_device
from cm3jax.workdir import StageDir


class TrainingDivergedError(RuntimeError):
    """The loss or gradient norm stopped being finite; the last good checkpoint is kept."""


class CheckpointableIterator(Protocol):
    """What the loop needs from a data source: this process's rows of each batch, and a JSON-serialisable position."""

    def __next__(self) -> dict: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


@dataclasses.dataclass
class TrainTask:
    """What a model family plugs into the loop.

    init_state(rng) builds the state with flax LogicallyPartitioned parameters (the loop only traces it for shapes and
    axis names, then runs it under jit with the resulting shardings). train_step(state, batch) -> (state, metrics)
    where metrics holds scalars and a boolean `finite`. eval_step(state, batch) -> sums that summarize_eval turns
    into the logged means. With `frozen` set, both steps take it as a third argument.
    """

    name: str
    init_state: Callable[[jax.Array], Any]
    train_step: Callable[[Any, dict], tuple[Any, dict]]
    train_data: CheckpointableIterator
    global_batch_size: int
    flops_per_step: float = 0.0
    tokens_per_step: int = 0
    eval_step: Callable[[Any, dict], dict] | None = None
    eval_data: Callable[[], Iterable[dict]] | None = None
    summarize_eval: Callable[[dict], dict] | None = None
    frozen: Any = None  # inputs the steps read but never update (e.g. LPIPS weights): a replicated jit argument
    after_eval: Callable[[Any, int, str], None] | None = None  # (state, step, workdir), e.g. to save sample images
    # (state, step) -> scalars, logged as `tasks/*` every task_eval_every steps (e.g. the LM scored on every task).
    task_eval: Callable[[Any, int], dict] | None = None
    task_eval_every: int = 0
    # (abstract params, their shardings) -> the parameters a fresh run starts from (fine-tuning); None: init_state's.
    # Optimizer state, step and data order still start afresh.
    initial_params: Callable[[Any, Any], Any] | None = None
    # Config fields (dotted names or section prefixes) that fix the state's shapes: a checkpoint saved with other
    # values cannot be resumed, and the run is refused with the fields named before anything is read or written.
    state_fields: tuple[str, ...] = ()


@dataclasses.dataclass
class TrainResult:
    state: Any
    step: int
    preempted: bool
    last_metrics: dict


class _PreemptionFlag:
    """Set by SIGTERM (how TPU VMs, SLURM and Kubernetes announce preemption); the loop finishes its step, saves
    and returns."""

    def __init__(self):
        self.event = threading.Event()
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("signal %d received: saving a checkpoint at the end of this step", signum)
        self.event.set()

    def reached(self, step: int) -> bool:
        local = self.event.is_set()
        if jax.process_count() == 1:
            return local
        # Every process must agree, or the collective save would hang.
        flags = multihost_utils.process_allgather(np.asarray(local, np.int32))
        return bool(np.any(flags))

    def restore_handlers(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _to_host(metrics: dict) -> dict:
    return {k: np.asarray(v).item() for k, v in jax.device_get(metrics).items()}


def abstract_state_and_shardings(init_state: Callable, mesh: Mesh, rules: tuple) -> tuple[Any, Any]:
    """Shapes and shardings of the state, from tracing init (no arrays are allocated)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init_state, jax.random.key(0))
    return nn.unbox(boxed), sharding.logical_to_shardings(boxed, mesh, rules)


def initialize_state(init_state: Callable, rng: jax.Array, mesh: Mesh, rules: tuple, shardings: Any) -> Any:
    """Runs init directly into its shards: no host ever holds the full model."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jax.jit(lambda r: nn.unbox(init_state(r)), out_shardings=shardings)(rng)


def restore_latest_state(init_state: Callable, config: ml_collections.ConfigDict, mesh: Mesh, stage_dir: str,
                         produced_by: str, step: int | None = None) -> tuple[Any, int]:
    """(state of the latest checkpoint under stage_dir/checkpoints, or of `step`, laid out on `mesh`; its step), for
    stages that use a trained model; `produced_by` names the command that writes the checkpoints, for the error."""
    abstract, shardings = abstract_state_and_shardings(init_state, mesh, sharding.logical_axis_rules(config))
    checkpointer = Checkpointer(StageDir.at(stage_dir).checkpoints, keep=1, create=False)
    try:
        if step is None:
            step = checkpointer.latest_step()
            if step is None:
                raise MissingInputError(f"no checkpoint under {checkpointer.directory}: run {produced_by} first")
        elif step not in checkpointer.all_steps():
            raise MissingInputError(f"no checkpoint of step {step} under {checkpointer.directory} (there are "
                                    f"{sorted(checkpointer.all_steps())})")
        state, _ = checkpointer.restore(step, abstract, shardings)
    finally:
        checkpointer.close()
    return state, step


def _with_frozen(task: TrainTask, mesh: Mesh, fn: Callable, in_shardings: tuple, **jit_kwargs) -> Callable:
    """jit(fn) called as (state, batch); `task.frozen`, when set, is placed once and passed as a third argument."""
    if task.frozen is None:
        return jax.jit(fn, in_shardings=in_shardings, **jit_kwargs)
    replicated = NamedSharding(mesh, PartitionSpec())
    compiled = jax.jit(fn, in_shardings=in_shardings + (replicated,), **jit_kwargs)
    frozen = jax.device_put(task.frozen, replicated)
    return lambda state, batch: compiled(state, batch, frozen)


def jit_train_step(task: TrainTask, mesh: Mesh, shardings: Any) -> Callable:
    """The one compiled train step: state keeps its shardings and is donated, batches split over the batch axes."""
    return _with_frozen(task, mesh, task.train_step, (shardings, sharding.batch_sharding(mesh)),
                        out_shardings=(shardings, None), donate_argnums=0)


def jit_eval_step(task: TrainTask, mesh: Mesh, shardings: Any) -> Callable:
    return _with_frozen(task, mesh, task.eval_step, (shardings, sharding.batch_sharding(mesh)))


def run(task: TrainTask, config: ml_collections.ConfigDict, mesh: Mesh, workdir: str,
        on_start: Callable[[], None] | None = None) -> TrainResult:
    """Trains `task` to config.train.steps, resuming from the latest checkpoint under `workdir` (or from
    config.train.restore_step). `on_start` runs once the checkpoint to resume from has been checked and read, before
    the first step: the stage writes its files there, so a refused run leaves nothing behind."""
    t = config.train
    rules = sharding.logical_axis_rules(config)
    abstract, shardings = abstract_state_and_shardings(task.init_state, mesh, rules)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract.params))
    if jax.process_index() == 0:
        print(f"{task.name}: {num_params / 1e6:.2f}M parameters on mesh {dict(mesh.shape)}", flush=True)
    stage_dir = StageDir.at(workdir)
    checkpoint_dir = stage_dir.checkpoints
    restore_step = resume_step(checkpoint_dir, int(t.get("restore_step", -1)))
    if restore_step is not None:
        require_resumable(config, saved_config(checkpoint_dir, restore_step), task.state_fields,
                          f"{checkpoint_dir}/{restore_step}")
        set_aside_checkpoints_after(checkpoint_dir, restore_step, stage_dir.checkpoints_set_aside)
    checkpointer = Checkpointer(checkpoint_dir, keep=t.keep_checkpoints, async_save=t.async_checkpointing)
    if restore_step is not None:
        try:
            state, data_state = checkpointer.restore(restore_step, abstract, shardings)
        except BaseException:
            checkpointer.close()  # its background threads must stop before the process exits
            raise
        if config.data.restore_iterator:
            task.train_data.set_state(select_process_state(data_state))
        else:
            logging.warning("%s: data iterator not restored (data.restore_iterator=False): fresh data order", task.name)
        if jax.process_index() == 0:
            print(f"{task.name}: resumed from step {restore_step} ({checkpoint_dir}/{restore_step})", flush=True)
    else:
        state = initialize_state(task.init_state, jax.random.key(t.seed), mesh, rules, shardings)
        if task.initial_params is not None:
            state = state.replace(params=task.initial_params(abstract.params, shardings.params))
    if on_start is not None:
        on_start()
    config_json = {"json": config_to_json(config)}

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        train_step = jit_train_step(task, mesh, shardings)
        eval_step = jit_eval_step(task, mesh, shardings) if task.eval_step else None

    step = int(jax.device_get(state.step))
    writer = MetricsWriter(stage_dir.logs, resumed_step=step, total_steps=int(t.steps))
    preemption = _PreemptionFlag()
    peak = peak_flops_per_device(jax.devices()[0].device_kind, t.peak_tflops_per_device)
    last_saved = restore_step
    started_at, start_step = time.perf_counter(), step
    pending = None  # (step, metrics) of the previous step, checked one step late to keep dispatch asynchronous
    interval_start, interval_steps = time.perf_counter(), 0
    metrics_host: dict = {}
    preempted = False

    def check_finite(at_step: int, metrics: dict) -> None:
        if not bool(jax.device_get(metrics["finite"])):
            checkpointer.wait_until_finished()
            where = f"step {last_saved} in {checkpointer.directory}" if last_saved is not None else "none yet"
            raise TrainingDivergedError(
                f"{task.name}: loss={float(jax.device_get(metrics['loss']))} grad_norm="
                f"{float(jax.device_get(metrics['grad_norm']))} at step {at_step} is not finite; stopped without "
                f"saving. Last good checkpoint: {where} (kept). Lower optim.peak_lr, raise optim.warmup_steps, set "
                f"train.z_loss_weight / model.qk_norm, or check the data.")

    try:
        while step < t.steps:
            # Entered per step: the task evaluation below runs other models under their own meshes and rules.
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                batch = sharding.global_batch(next(task.train_data), mesh, task.global_batch_size)
                state, metrics = train_step(state, batch)
                step += 1
                interval_steps += 1
                if pending is not None:
                    check_finite(*pending)
                pending = (step, metrics)

                if step % t.log_every == 0 or step == t.steps:
                    check_finite(step, metrics)
                    metrics_host = _to_host(metrics)
                    elapsed = time.perf_counter() - interval_start
                    metrics_host.pop("finite")
                    metrics_host.update(_throughput(task, elapsed / interval_steps, peak, mesh.devices.size))
                    metrics_host.update(_data_counters(task.train_data))
                    writer.write(step, metrics_host,
                                 note=_time_left(time.perf_counter() - started_at, step - start_step, t.steps - step))
                    interval_start, interval_steps = time.perf_counter(), 0

                if eval_step is not None and t.eval_every and (step % t.eval_every == 0 or step == t.steps):
                    writer.write(step, evaluate(task, eval_step, state, mesh), prefix="eval")
                    if task.after_eval is not None:
                        task.after_eval(state, step, workdir)
                    interval_start, interval_steps = time.perf_counter(), 0

                preempted = preemption.reached(step)
                if step % t.checkpoint_every == 0 or step == t.steps or preempted:
                    check_finite(step, metrics)
                    checkpointer.save(step, state, gather_process_states(task.train_data.get_state()), config_json)
                    last_saved = step
                    writer.sync()
                if preempted:
                    logging.warning("%s: preempted; checkpoint saved at step %d. Rerun the same command to resume.",
                                    task.name, step)
                    break
            if task.task_eval is not None and task.task_eval_every and step % task.task_eval_every == 0:
                writer.write(step, task.task_eval(state, step), prefix="tasks")
                interval_start, interval_steps = time.perf_counter(), 0
    finally:
        checkpointer.wait_until_finished()
        checkpointer.close()
        writer.close()
        preemption.restore_handlers()
    return TrainResult(state=state, step=step, preempted=preempted, last_metrics=metrics_host)


def _time_left(elapsed: float, steps_done: int, steps_left: int) -> str:
    """' (~1h02m left)' at the average pace of this run's steps so far (compilation included)."""
    if steps_done <= 0 or steps_left <= 0:
        return ""
    seconds = int(elapsed / steps_done * steps_left)
    hours, rest = divmod(seconds, 3600)
    return f" (~{hours}h{rest // 60:02d}m left)" if hours else f" (~{rest // 60}m{rest % 60:02d}s left)"


def _throughput(task: TrainTask, step_time: float, peak: float | None, num_devices: int) -> dict:
    out = {"step_time_s": step_time}
    if task.tokens_per_step:
        out["tokens_per_s"] = task.tokens_per_step / step_time
    if task.flops_per_step and peak:
        out["mfu"] = task.flops_per_step / step_time / (peak * num_devices)
    return out


def _data_counters(data: CheckpointableIterator) -> dict:
    """The iterator's skip/truncation counters (if it keeps any), summed over processes, as data_* metrics."""
    counters = getattr(data, "counters", None)
    if not counters:
        return {}
    keys = sorted(counters)
    values = np.asarray([counters[k] for k in keys], np.int64)
    if jax.process_count() > 1:
        values = multihost_utils.process_allgather(values).sum(axis=0)
    return {f"data_{k}": int(v) for k, v in zip(keys, values)}


def summed_over(batches: Iterable[dict], sums: Callable[[dict], dict], mesh: Mesh, global_batch_size: int) -> Any:
    """`sums(batch)` added up over `batches` (this process's rows of each global batch, assembled on `mesh`)."""
    totals = None
    for local_batch in batches:
        batch_sums = sums(sharding.global_batch(local_batch, mesh, global_batch_size))
        totals = batch_sums if totals is None else jax.tree.map(jnp.add, totals, batch_sums)
    return totals


def evaluate(task: TrainTask, eval_step: Callable, state: Any, mesh: Mesh) -> dict:
    """The held-out metrics: eval_step sums over task.eval_data(), turned into means by task.summarize_eval."""
    totals = summed_over(task.eval_data(), lambda batch: eval_step(state, batch), mesh, task.global_batch_size)
    means = task.summarize_eval(totals) if task.summarize_eval else totals
    return _to_host(means)
