"""Retriever training: the dual encoder's symmetric InfoNCE loss at a learned temperature (CLIP) over the caption-image
pairs of the train token shards, as a TrainTask for the generic loop (same mesh, checkpoints, logging, preemption as
the LM). Held-out evaluation reports the loss and in-batch top-1 accuracy in both directions.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cm3jax import vocab as vocab_lib
from cm3jax.config_validation import validate_config
from cm3jax.data.batches import CountingBatches
from cm3jax.data.documents import Document, decode_document_record
from cm3jax.data.shards import open_token_shards
from cm3jax.models.retriever import DualEncoder, RetrieverConfig, tower_input
from cm3jax.parallel.mesh import create_mesh, num_slices
from cm3jax.parallel.sharding import process_rows
from cm3jax.train import loop
from cm3jax.train.loop import TrainResult, TrainTask
from cm3jax.train.optim import make_optimizer
from cm3jax.train.state import TrainState

Batch = dict[str, jax.Array]


def document_parts(document: Document, vocab: vocab_lib.UnifiedVocab) -> tuple[np.ndarray, np.ndarray]:
    """(text pieces of all text segments, codes of the first image segment) of a document, tower-local ids; a part
    the document lacks is empty."""
    text = [vocab.text_pieces(s.tokens) for s in document if s.modality == vocab_lib.MODALITY_TEXT]
    images = [vocab.image_codes(s.tokens) for s in document if s.modality == vocab_lib.MODALITY_IMAGE]
    return (np.concatenate(text) if text else np.zeros(0, np.int32)), (images[0] if images else np.zeros(0, np.int32))


class PairExample:
    """A token-shard record -> the towers' inputs; a document without both a text and an image part gets valid 0
    (counted in `unpaired`), so batch shapes never change."""

    def __init__(self, records: Sequence[bytes], vocab: vocab_lib.UnifiedVocab, text_len: int, image_len: int):
        self.records, self.vocab, self.text_len, self.image_len = records, vocab, text_len, image_len

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        text, image = document_parts(decode_document_record(self.records[int(index)])[0], self.vocab)
        paired = len(text) > 0 and len(image) > 0
        text_tokens, text_mask = tower_input(text, None, self.text_len)
        image_tokens, image_mask = tower_input(image, None, self.image_len)
        return {"text": text_tokens, "text_mask": text_mask, "image": image_tokens, "image_mask": image_mask,
                "valid": np.float32(paired), "unpaired": np.int64(not paired)}


class PairBatches(CountingBatches):
    """This process's rows of every global batch of caption-image pairs; shuffled, repeated, checkpointable."""

    def __init__(self, records: Sequence[bytes], vocab: vocab_lib.UnifiedVocab, cfg: RetrieverConfig, *,
                 rows: tuple[int, int], global_batch_size: int, seed: int, shuffle: bool):
        per_process = rows[1] - rows[0]
        shard, num_shards = rows[0] // per_process, global_batch_size // per_process
        ds = grain.MapDataset.range(len(records))
        if shuffle:
            ds = ds.shuffle(seed=seed)
        ds = ds.repeat(None)[shard::num_shards].map(
            PairExample(records, vocab, cfg.text_tower.max_seq_len, cfg.image_tower.max_seq_len))
        super().__init__(ds.batch(per_process, drop_remainder=True).to_iter_dataset(), ("unpaired",))


def contrastive_sums(text: jax.Array, image: jax.Array, logit_scale: jax.Array, valid: jax.Array) -> dict:
    """Symmetric InfoNCE over the batch: row i's text should pick image i among the valid images and vice versa.
    Returns sums over valid rows (loss of both directions averaged, top-1 hits per direction) and their count."""
    logits = logit_scale * (text @ image.T)
    allowed = valid[None, :] > 0
    logits = jnp.where(allowed, logits, -1e9)
    diagonal = jnp.diagonal(logits)
    text_to_image = jax.nn.logsumexp(logits, axis=1) - diagonal
    image_to_text = jax.nn.logsumexp(jnp.where(allowed.T, logits, -1e9), axis=0) - diagonal
    per_pair = 0.5 * (text_to_image + image_to_text)
    rows = jnp.arange(logits.shape[0])
    return {"loss": jnp.sum(per_pair * valid), "pairs": jnp.sum(valid),
            "text_to_image_hits": jnp.sum((jnp.argmax(logits, axis=1) == rows) * valid),
            "image_to_text_hits": jnp.sum((jnp.argmax(logits, axis=0) == rows) * valid)}


def summarize_contrastive(sums: dict) -> dict:
    pairs = jnp.maximum(sums["pairs"], 1.0)
    return {"loss": sums["loss"] / pairs, "text_to_image_top1": sums["text_to_image_hits"] / pairs,
            "image_to_text_top1": sums["image_to_text_hits"] / pairs}


def make_retriever_steps(model: DualEncoder, optimizer: optax.GradientTransformation,
                         schedule: optax.Schedule) -> tuple[Callable, Callable]:
    def sums_of(params, batch: Batch) -> dict:
        text, image, scale = model.apply({"params": params}, batch["text"], batch["text_mask"], batch["image"],
                                         batch["image_mask"])
        return {**contrastive_sums(text, image, scale, batch["valid"]), "logit_scale": scale}

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        def objective(params):
            sums = sums_of(params, batch)
            return sums["loss"] / jnp.maximum(sums["pairs"], 1.0), sums

        (loss, sums), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        metrics = {**summarize_contrastive(sums), "temperature": 1.0 / sums["logit_scale"],
                   "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step)}
        metrics["finite"] = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
        return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state), metrics

    def eval_step(state: TrainState, batch: Batch) -> dict:
        sums = sums_of(state.params, batch)
        sums.pop("logit_scale")
        return sums

    return train_step, eval_step


def retriever_stage_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config the loop runs the retriever with: its own optimizer, batch, steps and intervals."""
    stage = ml_collections.ConfigDict(config.to_dict())
    stage.train.update(config.retriever.train.to_dict())
    stage.optim.update(config.retriever.optim.to_dict())
    return stage


def retriever_state_init(config: ml_collections.ConfigDict) -> tuple[Callable, Callable, Callable]:
    """(init_state(rng) -> TrainState, train_step, eval_step) for the retriever stage config."""
    model_config = RetrieverConfig.from_config(config)
    model = DualEncoder(model_config)
    optimizer, schedule = make_optimizer(config.optim, int(config.train.steps))

    def init_state(rng: jax.Array) -> TrainState:
        text = jnp.zeros((1, model_config.text_tower.max_seq_len), jnp.int32)
        image = jnp.zeros((1, model_config.image_tower.max_seq_len), jnp.int32)
        params = model.init(rng, text, text > 0, image, image > 0)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

    return (init_state,) + make_retriever_steps(model, optimizer, schedule)


# The config fields that fix the dual encoder's parameter shapes.
RETRIEVER_STATE_FIELDS = ("vocab", "retriever.embed_dim", "retriever.text_len", "retriever.num_layers",
                          "retriever.d_model", "retriever.num_heads", "vqgan.image_size", "vqgan.channel_multipliers")


def train_retriever(config: ml_collections.ConfigDict, stage_dir: str, token_dir: str, devices=None) -> TrainResult:
    """Trains the dual encoder on the train split's token shards under `stage_dir` (resumes); the result's state
    holds the trained parameters (also when training was already complete)."""
    devices = list(devices if devices is not None else jax.devices())
    stage = retriever_stage_config(config)
    validate_config(stage, len(devices), num_slices(devices), jax.process_count())
    mesh = create_mesh(stage, devices)
    t = stage.train
    vocab = vocab_lib.UnifiedVocab.from_config(stage.vocab)
    vocab_lib.require_saved_vocab(vocab, token_dir)
    model_config = RetrieverConfig.from_config(stage)
    rows = process_rows(mesh, t.global_batch_size)

    def batches(split: str, shuffle: bool) -> PairBatches:
        return PairBatches(open_token_shards(token_dir, split), vocab, model_config, rows=rows,
                           global_batch_size=t.global_batch_size, seed=int(stage.data.seed), shuffle=shuffle)

    def eval_data():
        held_out = batches(stage.data.eval_split, shuffle=False)
        return (next(held_out) for _ in range(t.eval_batches))

    init_state, train_step, eval_step = retriever_state_init(stage)
    task = TrainTask(name="retriever", init_state=init_state, train_step=train_step,
                     train_data=batches(stage.data.train_split, shuffle=True), global_batch_size=t.global_batch_size,
                     eval_step=eval_step, eval_data=eval_data if t.eval_every else None,
                     summarize_eval=summarize_contrastive, state_fields=RETRIEVER_STATE_FIELDS)
    return loop.run(task, stage, mesh, stage_dir)


def host_params(params: Any) -> Any:
    """The full parameter tree as numpy on every process (parameters may be sharded across processes)."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return jax.device_get(params)
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), params)
