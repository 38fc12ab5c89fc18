"""`cm3jax tokenize`: raw image-caption pairs -> token shards the data pipeline reads (DIR/tokens).

Text goes through the SentencePiece tokenizer (trained on the train captions first when DIR/text_tokenizer has none),
images through the trained VQ-GAN (DIR/vqgan, latest checkpoint) in jitted batches split over this process's devices.
Each document is `[caption, image codes]` in the unified vocabulary, one ArrayRecord record each. Shard k of a split
holds raw examples [k * shard_size, (k + 1) * shard_size); process p writes the shards k = p mod P, and a shard that is
already written is kept, so an interrupted job resumes where it stopped. Bad images and empty captions are skipped and
counted; `manifest.json` records the counts, the vocabulary and the code grid.
"""
from __future__ import annotations

import json
import math

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from cm3jax import vocab as vocab_lib
from cm3jax.config_validation import (
    require,
    validate_raw_data_config,
    validate_tokenize_config,
    validate_vocab_config,
)
from cm3jax.data.documents import encode_document_record, image_segment, text_segment
from cm3jax.data.record_meta import map_meta_images
from cm3jax.data.shards import MANIFEST_FILE, shard_path, write_token_shard
from cm3jax.data.sources import SKIP_REASONS, SkipCounts, open_counts, open_raw_source, read_captions, read_examples
from cm3jax.errors import BadInputError
from cm3jax.parallel.mesh import data_parallel_mesh
from cm3jax.progress import Progress
from cm3jax.stages.stage import Stage
from cm3jax.storage import atomic_write_text, files_digest
from cm3jax.tokenizers.image import ImageTokenizer
from cm3jax.tokenizers.text import TextTokenizer
from cm3jax.workdir import INPUTS_FILE, StageDir, Workdir


def load_or_train_text_tokenizer(config: ml_collections.ConfigDict, workdir: Workdir) -> TextTokenizer:
    """DIR/text_tokenizer/text.model; when absent, process 0 trains it on the train captions, the other texts of
    their records (questions, answers, instructions) and the SFT instructions, while the others wait (the workdir is
    a filesystem every process sees)."""
    from cm3jax.data.sft import TEMPLATE_TEXTS

    path = workdir.text_tokenizer
    if not path.exists() and jax.process_index() == 0:
        source = open_raw_source(config.raw_data, "train", str(workdir.data))
        counts = open_counts(source)
        texts = list(read_captions(source, counts, meta_texts=True))
        counts.log("text tokenizer captions")
        if not texts:
            raise BadInputError(f"the train split of raw_data.dataset={config.raw_data.dataset!r} has no readable "
                             f"caption to train the text tokenizer on")
        # The instructions weigh as much as a few hundred captions, so their words become pieces.
        texts += list(TEMPLATE_TEXTS) * max(1, min(len(texts) // 100, 100))
        tokenizer = TextTokenizer.train(texts, vocab_size=int(config.vocab.text_size),
                                        model_type=str(config.tokenize.text_model_type))
        path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(path)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("cm3jax: text tokenizer ready")
    return TextTokenizer.load(path)


def tokens_inputs(image_tokenizer: ImageTokenizer, workdir: Workdir, raw_data: dict) -> dict:
    """The identity of what token shards are made from: the VQ-GAN (step and parameters), the text tokenizer and
    the raw data (`raw_data_identity`)."""
    return {"vqgan_step": int(image_tokenizer.step), "vqgan_params_sha256": image_tokenizer.digest(),
            "text_tokenizer_sha256": files_digest(workdir.text_tokenizer), "raw_data": raw_data}


def raw_data_identity(config: ml_collections.ConfigDict, sources: dict) -> dict:
    """The raw data the shards are cut from: its settings (dataset, paths, keys, image size), the version of an
    embedded dataset, and per split the examples and the shards they are cut into. A change to any of them makes the
    shards already written another data's (the files' contents are not hashed: a corpus rewritten in place with as
    many examples is not seen)."""
    from cm3jax.data.embedded import embedded_version

    shard_size = int(config.tokenize.shard_size)
    return {"settings": json.loads(json.dumps(config.raw_data.to_dict(), sort_keys=True)), "shard_size": shard_size,
            "embedded_version": embedded_version(config.raw_data.dataset),
            "splits": {split: {"examples": len(source), "shards": num_shards(len(source), shard_size)}
                       for split, source in sources.items()}}


def _as_recorded(inputs: dict, tokens: StageDir) -> dict:
    """`inputs` without `embedded_version` when the folder's inputs.json was written before it was recorded: those
    shards are taken as they are (and their identity, which later stages recorded, kept) rather than refused for a
    field they could not have."""
    path = tokens.path / INPUTS_FILE
    if not path.exists() or "embedded_version" in json.loads(path.read_text()).get("raw_data", {}):
        return inputs
    raw_data = {k: v for k, v in inputs["raw_data"].items() if k != "embedded_version"}
    return {**inputs, "raw_data": raw_data}


def num_shards(examples: int, shard_size: int) -> int:
    return max(1, math.ceil(examples / shard_size))


def tokenize_dataset(config: ml_collections.ConfigDict, workdir: Workdir, devices=None) -> dict:
    """Writes DIR/tokens/{split}-*.array_record for the train and validation splits; returns the manifest."""
    devices = list(devices if devices is not None else jax.local_devices())
    require(int(config.tokenize.batch_size) % len(devices) == 0, "tokenize.batch_size",
            f"{config.tokenize.batch_size} images per batch cannot be split over the {len(devices)} local devices")
    vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
    raw_data_dir = str(workdir.data)
    tokens = workdir.tokens
    out_dir = tokens.path
    # A resumed job must not mix two id layouts in one folder (the layout is saved once every check has passed).
    if (out_dir / vocab_lib.VOCAB_FILE).exists():
        vocab_lib.require_saved_vocab(vocab, out_dir)
    # What cannot be made here is checked, the earliest stage's first, before the text tokenizer is trained (a
    # refused run writes nothing).
    sources = {split: open_raw_source(config.raw_data, split, raw_data_dir) for split in config.tokenize.splits}
    image_tokenizer = ImageTokenizer.load(config, workdir, data_parallel_mesh(devices))
    text = load_or_train_text_tokenizer(config, workdir)
    if text.vocab_size > vocab.text_size:
        raise vocab_lib.VocabMismatchError(
            f"the text tokenizer {workdir.text_tokenizer} has {text.vocab_size} pieces but vocab.text_size="
            f"{vocab.text_size}: raise vocab.text_size or train a smaller tokenizer")
    # Shards of one folder come from one VQ-GAN, one text tokenizer and one raw dataset cut into the same shards,
    # also across interrupted runs.
    inputs = _as_recorded(tokens_inputs(image_tokenizer, workdir, raw_data_identity(config, sources)), tokens)
    tokens.check_inputs(inputs)
    tokens.create()
    vocab_lib.check_or_save_vocab(vocab, out_dir, write=jax.process_index() == 0)
    tokens.record_inputs(inputs)
    model_config = image_tokenizer.model_config
    batch_size = int(config.tokenize.batch_size)

    manifest = {"vocab": vocab.to_dict(), "text_pieces": text.vocab_size, "vqgan_step": image_tokenizer.step,
                "inputs": inputs,
                "code_grid": model_config.grid_size, "image_size": model_config.image_size, "splits": {}}
    shard_size = int(config.tokenize.shard_size)
    for split, source in sources.items():
        shards = num_shards(len(source), shard_size)
        # Every process opens the same source; its open-time skips are counted once, by process 0.
        counts, documents = open_counts(source) if jax.process_index() == 0 else SkipCounts(), 0
        todo = [shard for shard in range(jax.process_index(), shards, jax.process_count())
                if not shard_path(out_dir, split, shard, shards).exists()]
        logging.info("tokenize %s: %d shards here, %d already written", split, len(todo),
                     len(range(jax.process_index(), shards, jax.process_count())) - len(todo))
        progress = Progress(f"tokenize {split}", total=len(todo))
        for shard in todo:
            indices = range(shard * shard_size, min((shard + 1) * shard_size, len(source)))
            records = _encode_examples(read_examples(source, model_config.image_size, counts, indices), text, vocab,
                                       image_tokenizer.encode, batch_size)
            written = write_token_shard(records, out_dir, split, shard, shards)
            documents += written
            progress.advance(f"shard {shard + 1}/{shards}: {written} documents")
        counts.log(f"tokenize {split}")
        skipped, documents = _sum_over_processes(counts, documents)
        manifest["splits"][split] = {"raw_examples": len(source), "documents_written_now": documents,
                                     "skipped": skipped, "shards": shards}
    if jax.process_index() == 0:
        atomic_write_text(tokens / MANIFEST_FILE, json.dumps(manifest, indent=2))
    return manifest


def _sum_over_processes(counts: SkipCounts, documents: int) -> tuple[dict, int]:
    """(skip counts, documents written) summed over every process, so the manifest describes the whole job."""
    if jax.process_count() == 1:
        return dict(counts), documents
    values = np.array([documents] + [counts[reason] for reason in SKIP_REASONS], np.int32)
    total = np.asarray(multihost_utils.process_allgather(values)).sum(axis=0)
    return {reason: int(n) for reason, n in zip(SKIP_REASONS, total[1:]) if n}, int(total[0])


def _encode_examples(examples, text: TextTokenizer, vocab: vocab_lib.UnifiedVocab, encode_images, batch_size: int):
    """Yields document records; uint8 images (each example's own and those in its meta) are encoded batch_size at a
    time (the last batch padded); a meta image is stored as the unified ids of its codes (record_meta.py)."""
    pending = []

    def encode(images: list[np.ndarray]) -> list[np.ndarray]:
        codes = []
        for start in range(0, len(images), batch_size):
            batch = np.stack(images[start:start + batch_size])
            padding = np.zeros((batch_size - len(batch),) + batch.shape[1:], batch.dtype)
            codes += list(encode_images(np.concatenate([batch, padding]))[:len(batch)])
        return [vocab.image_ids(grid.reshape(-1)) for grid in codes]

    def flush():
        meta_images = []
        for example in pending:
            map_meta_images(example.meta, meta_images.append)
        ids = iter(encode([e.image for e in pending] + meta_images))
        main = [next(ids) for _ in pending]
        for example, image_ids in zip(pending, main):
            meta = map_meta_images(example.meta, lambda _: np.asarray(next(ids), "<i4").tobytes())
            document = [text_segment(vocab.text_ids(text.encode(example.caption))), image_segment(image_ids)]
            yield encode_document_record(document, meta)

    for example in examples:
        pending.append(example)
        if len(pending) == batch_size:
            yield from flush()
            pending = []
    if pending:
        yield from flush()


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> bool:
    config = workdir.resolve(config)
    stage_dir = workdir.tokens
    manifest = tokenize_dataset(config, workdir)
    stage_dir.mark_complete(config, manifest)
    print(f"tokens: {json.dumps(manifest['splits'])} in {stage_dir}", flush=True)
    return True


def validate(config: ml_collections.ConfigDict) -> None:
    validate_raw_data_config(config)
    validate_tokenize_config(config)
    validate_vocab_config(config)


STAGE = Stage(name="tokens", command="tokenize", run=run, validate=validate, needs=("data", "vqgan"),
              config_fields=("tokenize", "vocab"),
              summary="text tokenizer (trained when absent) + VQ-GAN codes -> token shards in DIR/tokens (resumable)")
