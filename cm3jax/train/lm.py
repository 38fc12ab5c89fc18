"""The language-model objective: weighted next-token cross-entropy (split by target modality), z-loss, and the
jitted train / eval steps with gradient accumulation."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath
from jax.sharding import Mesh

from cm3jax import vocab as vocab_lib
from cm3jax.config_validation import ConfigError, validate_config
from cm3jax.data.pipeline import DocumentBatches, PipelineOptions, open_document_source, open_retrieval
from cm3jax.errors import MissingInputError
from cm3jax.models.transformer import CM3LeonDecoder, DecoderConfig, flops_per_token
from cm3jax.parallel.mesh import create_mesh, num_slices
from cm3jax.parallel.sharding import process_rows
from cm3jax.storage import files_digest
from cm3jax.train import loop
from cm3jax.train.checkpoint import checkpoint_steps, saved_config, state_differences
from cm3jax.train.loop import TrainResult, TrainTask
from cm3jax.train.optim import make_optimizer
from cm3jax.train.state import TrainState
from cm3jax.workdir import StageDir, neighbours_file

Batch = dict[str, jax.Array]


def loss_sums(logits: jax.Array, batch: Batch, z_loss_weight: float,
              task_names: tuple[str, ...] = ()) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (objective summed over weighted tokens, per-metric sums).

    Sums, not means, so gradient accumulation and data parallelism normalise once by the total weight.
    `modality` is the modality of each target token: text and image losses are reported separately. With
    `task_names`, the batch's per-token `task` (1 + the index of the token's task; 0 for padding) splits the loss by
    task too (instruction tuning).
    """
    weights = batch["loss_weights"].astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    ce = log_z - target_logit
    z_loss = jnp.square(log_z)
    objective = jnp.sum(weights * (ce + z_loss_weight * z_loss))
    text = weights * (batch["modality"] == vocab_lib.MODALITY_TEXT)
    image = weights * (batch["modality"] == vocab_lib.MODALITY_IMAGE)
    sums = {
        "loss": jnp.sum(weights * ce),
        "weight": jnp.sum(weights),
        "z_loss": jnp.sum(weights * z_loss),
        "text_loss": jnp.sum(text * ce),
        "text_weight": jnp.sum(text),
        "image_loss": jnp.sum(image * ce),
        "image_weight": jnp.sum(image),
    }
    for index, name in enumerate(task_names):
        in_task = weights * (batch["task"] == index + 1)
        sums[f"task_loss/{name}"] = jnp.sum(in_task * ce)
        sums[f"task_weight/{name}"] = jnp.sum(in_task)
    return objective, sums


def means_from_sums(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-token means; a split with no tokens in the batch reports NaN-free zero."""
    def mean(key, weight_key):
        return sums[key] / jnp.maximum(sums[weight_key], 1.0)

    means = {
        "loss": mean("loss", "weight"),
        "z_loss": mean("z_loss", "weight"),
        "text_loss": mean("text_loss", "text_weight"),
        "image_loss": mean("image_loss", "image_weight"),
        "loss_tokens": sums["weight"],
    }
    for key in sums:
        if key.startswith("task_loss/"):
            name = key.removeprefix("task_loss/")
            means[f"{name}_loss"] = mean(key, f"task_weight/{name}")
    return means


def forward(model: nn.Module, params: Any, batch: Batch) -> jax.Array:
    return model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                       image_cells=batch["image_cells"])


def _split_microbatches(batch: Batch, accum: int) -> Batch:
    """[B, ...] -> [accum, B/accum, ...] taking every accum-th row, so each data shard keeps its rows local."""
    def split(x):
        x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    z_loss_weight: float, grad_accum_steps: int,
                    task_names: tuple[str, ...] = ()) -> Callable[[TrainState, Batch], tuple]:
    def grads_and_sums(params, batch):
        def objective(p):
            return loss_sums(forward(model, p, batch), batch, z_loss_weight, task_names)

        (_, sums), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return grads, sums

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        if grad_accum_steps == 1:
            grads, sums = grads_and_sums(state.params, batch)
        else:
            def accumulate(carry, microbatch):
                grads, sums = grads_and_sums(state.params, microbatch)
                return jax.tree.map(jnp.add, carry, (grads, sums)), None

            zero_grads = jax.tree.map(jnp.zeros_like, state.params)
            sums_shape = jax.eval_shape(grads_and_sums, state.params, batch)[1]
            zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)
            (grads, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums),
                                            _split_microbatches(batch, grad_accum_steps))
        grads = jax.tree.map(lambda g: g / jnp.maximum(sums["weight"], 1.0), grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = means_from_sums(sums)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = schedule(state.step)
        metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(model: nn.Module, z_loss_weight: float,
                   task_names: tuple[str, ...] = ()) -> Callable[[TrainState, Batch], dict]:
    def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        return loss_sums(forward(model, state.params, batch), batch, z_loss_weight, task_names)[1]

    return eval_step


def lm_state_init(config: ml_collections.ConfigDict) -> tuple[Callable, DecoderConfig, optax.GradientTransformation,
                                                                optax.Schedule]:
    """(init_state(rng) -> TrainState, the decoder's config, its optimizer and learning-rate schedule)."""
    vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
    decoder_config = DecoderConfig.for_run(config, vocab)
    model = CM3LeonDecoder(decoder_config)
    optimizer, schedule = make_optimizer(config.optim, config.train.steps)

    def init_state(rng: jax.Array) -> TrainState:
        params = model.init(rng, jnp.zeros((1, config.train.seq_len), jnp.int32))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

    return init_state, decoder_config, optimizer, schedule


@dataclasses.dataclass(frozen=True)
class FineTuning:
    """What turns LM training into instruction tuning (cm3jax/train/sft.py): the examples, the parameters a fresh
    run starts from, and their identity."""
    to_example: Callable[..., Any]  # (the pipeline's options, held_out=False) -> its example maker
    task_names: tuple[str, ...]  # the tasks whose losses are logged apart
    initial_params: Callable[[Any, Any], Any]  # (abstract params, their shardings) -> params
    inputs: dict  # recorded in inputs.json: a run resumes only from the parameters it started from


def build_lm_task(config: ml_collections.ConfigDict, mesh: Mesh,
                  fine_tuning: FineTuning | None = None) -> tuple[TrainTask, DecoderConfig]:
    """The CM3leon LM as a TrainTask for the generic loop, fed by the configured data source (or, fine-tuning, by
    its examples)."""
    t = config.train
    vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
    init_state, decoder_config, optimizer, schedule = lm_state_init(config)
    model = CM3LeonDecoder(decoder_config)
    task_names = fine_tuning.task_names if fine_tuning else ()

    rows = process_rows(mesh, t.global_batch_size)
    options = PipelineOptions.from_config(config, jax.process_count())
    tokens_per_step = t.global_batch_size * t.seq_len
    task = TrainTask(
        state_fields=LM_STATE_FIELDS,
        name="sft" if fine_tuning else "lm",
        init_state=init_state,
        train_step=make_train_step(model, optimizer, schedule, t.z_loss_weight, t.grad_accum_steps, task_names),
        train_data=DocumentBatches(open_document_source(config.data, vocab, config.data.train_split), vocab, options,
                                   rows, open_retrieval(config.data, vocab, config.data.train_split, evaluation=False),
                                   to_example=fine_tuning.to_example(options) if fine_tuning else None),
        global_batch_size=t.global_batch_size,
        flops_per_step=flops_per_token(decoder_config, t.seq_len) * tokens_per_step,
        tokens_per_step=tokens_per_step,
        eval_step=make_eval_step(model, t.z_loss_weight, task_names),
        eval_data=held_out_batches(config, mesh, int(t.eval_batches), fine_tuning) if t.eval_every else None,
        summarize_eval=means_from_sums,
        initial_params=fine_tuning.initial_params if fine_tuning else None,
    )
    return task, decoder_config


def held_out_batches(config: ml_collections.ConfigDict, mesh: Mesh, num_batches: int,
                     fine_tuning: FineTuning | None = None) -> Callable[[], Iterator]:
    """A callable giving the same `num_batches` batches of data.eval_split every time, unshuffled, with
    data.eval_num_retrieved documents retrieved before each (fine-tuning: its examples of the split). Held-out loss
    is the loss on the held-out documents themselves: the retrieved ones are context (no loss)."""
    vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
    rows = process_rows(mesh, config.train.global_batch_size)
    options = dataclasses.replace(PipelineOptions.from_config(config, jax.process_count()), shuffle=False,
                                  num_workers=0, retrieved_loss_weight=0.0)
    source = open_document_source(config.data, vocab, config.data.eval_split)
    augment = open_retrieval(config.data, vocab, config.data.eval_split, evaluation=True)
    to_example = fine_tuning.to_example(options, held_out=True) if fine_tuning else None

    def batches():
        stream = DocumentBatches(source, vocab, options, rows, augment, to_example)
        return (next(stream) for _ in range(num_batches))

    return batches


# The config fields that fix the LM's parameter shapes.
LM_STATE_FIELDS = ("vocab", "model.num_layers", "model.d_model", "model.num_heads", "model.head_dim", "model.ffn_dim",
                   "model.activation", "model.max_seq_len", "model.tie_embeddings", "model.param_dtype",
                   "model.image_grid_embedding", "vqgan.image_size", "vqgan.channel_multipliers")


def lm_checkpoint_step(config: ml_collections.ConfigDict, source: StageDir, step: int, source_field: str,
                       step_field: str, use: str, how_to_train: str) -> int:
    """`step` (-1: the latest) of the LM checkpoints under `source` after checking that it exists and that its model
    has this config's vocabulary and shapes; errors name `source_field` / `step_field` and say what `use` needs."""
    steps = checkpoint_steps(source.checkpoints) if source.checkpoints.exists() else []
    if not steps:
        raise MissingInputError(f"no checkpoint under {source.checkpoints}: {how_to_train}")
    step = steps[-1] if step < 0 else step
    if step not in steps:
        raise ConfigError(f"config.{step_field}: no checkpoint of step {step} under {source.checkpoints} (there "
                          f"are {steps})")
    listed = state_differences(config, saved_config(source.checkpoints, step), LM_STATE_FIELDS)
    if listed:
        raise ConfigError(f"config.{source_field}: {source.checkpoints}/{step} is another model ({listed}); {use} "
                          f"a checkpoint of this config's vocabulary and model shape")
    return step


def lm_inputs(config: ml_collections.ConfigDict) -> dict:
    """The identity of what the LM trains on: the token shards and, with retrieval, the neighbour files."""
    d = config.data
    inputs = {"tokens": StageDir.at(d.token_dir).identity() if d.source == "token_shards" else d.source}
    if d.retrieval == "neighbours":
        inputs["neighbours"] = files_digest(
            *(neighbours_file(d.neighbours_dir, split) for split in (d.train_split, d.eval_split)))
    return inputs


def init_from_params(config: ml_collections.ConfigDict) -> tuple[Callable[[Any, Any], Any] | None, dict]:
    """(what a fresh LM run's parameters are restored from, what inputs.json records of it) for train.init_from;
    (None, {}) for a random init."""
    if not str(config.train.init_from):
        return None, {}
    from cm3jax.train.init_from import starting_point

    start = starting_point(config, str(config.train.init_from), int(config.train.init_step), "train.init_from",
                           "train.init_step", "training starts from",
                           "point train.init_from at a stage folder with checkpoints or at an export")
    return start.restore, {"init_from_step": start.step, "init_from_inputs": start.identity}


def train_language_model(config: ml_collections.ConfigDict, stage_dir: str, devices=None,
                         on_start: Callable[[], None] | None = None,
                         task_eval: Callable[[Any, int, Mesh], dict] | None = None,
                         fine_tuning: FineTuning | None = None) -> TrainResult:
    """Validates the config, builds the mesh over `devices` (default: all) and trains the LM under `stage_dir`
    (`fine_tuning`: instruction-tunes it); `task_eval(params, step, mesh)` scores it every eval.every steps.

    Everything is checked (the config, the token folder's vocabulary, a resumed run's vocabulary and checkpoint)
    before `stage_dir/vocab.json` is written and `on_start` runs, so a refused run writes nothing."""
    devices = list(devices if devices is not None else jax.devices())
    validate_config(config, len(devices), num_slices(devices), jax.process_count())
    vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
    if config.data.source == "token_shards":
        vocab_lib.require_saved_vocab(vocab, config.data.token_dir)
    if (epath.Path(stage_dir) / vocab_lib.VOCAB_FILE).exists():
        vocab_lib.require_saved_vocab(vocab, stage_dir)
    # SFT starts from its pretrained model; an LM run from train.init_from, or a random init.
    initial_params, init_inputs = (None, fine_tuning.inputs) if fine_tuning else init_from_params(config)
    inputs = lm_inputs(config) | init_inputs
    # A run resumes on the token shards and neighbours (and pretrained parameters) it started with.
    StageDir.at(stage_dir).check_inputs(inputs)
    mesh = create_mesh(config, devices)
    task, _ = build_lm_task(config, mesh, fine_tuning)
    if initial_params is not None:
        task.initial_params = initial_params
    if task_eval is not None:
        task.task_eval = lambda state, step: task_eval(state.params, step, mesh)
        task.task_eval_every = int(config.eval.every)

    def start() -> None:
        vocab_lib.check_or_save_vocab(vocab, stage_dir, write=jax.process_index() == 0)
        StageDir.at(stage_dir).record_inputs(inputs)
        if on_start is not None:
            on_start()

    return loop.run(task, config, mesh, stage_dir, on_start=start)
