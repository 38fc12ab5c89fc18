"""The grain input pipeline: document records -> CM3 training rows -> this process's rows of each global batch.

    source records --shuffle(seed), repeat--> (global index, record)
      --every num_streams-th element--> per-stream --decode, retrieval hook, caption/image rotation, fit to
      seq_len, CM3 masking--> examples --first-fit packing (or pad)--> rows --batch--> stream batches
      --zip this process's streams--> local batch --multiprocess prefetch--> the training loop

Data streams make the batch independent of the number of processes: the global batch is `num_streams` equal blocks of
rows, block s always comes from stream s (elements s, s+S, s+2S, ... of the shuffled order), and each process builds the
streams whose rows its devices hold. Every random choice of an example is seeded by (seed, global index), so the
content of a batch depends only on the config and the source (and on data.num_workers, which splits each stream
between worker processes).

The iterator state (grain's, plus the skip/truncation counters) is JSON and goes into the checkpoint's `data` item.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from cm3jax import vocab as vocab_lib
from cm3jax.config import default
from cm3jax.data import cm3
from cm3jax.data.augment import NeighbourRetrieval, NoRetrieval, RetrievalAugmenter, assemble_sample
from cm3jax.data.batches import CountingBatches
from cm3jax.data.documents import decode_document_record, rotate_caption_image
from cm3jax.data.shards import open_token_shards
from cm3jax.data.synthetic import SyntheticDocumentSource
from cm3jax.errors import BadInputError, MissingInputError
from cm3jax.storage import local_mirror
from cm3jax.workdir import neighbours_file

BATCH_KEYS = ("inputs", "targets", "loss_weights", "image_cells", "segment_ids", "positions", "modality")
COUNTER_KEYS = ("text_tokens_cut", "segments_dropped", "retrieved_dropped")
_SEQUENCE_KEYS = ("inputs", "targets", "loss_weights", "image_cells")


def resolve_num_streams(data_config, num_processes: int) -> int:
    """data.num_streams, with -1 meaning one stream per process."""
    streams = int(data_config.num_streams)
    return num_processes if streams == -1 else streams


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    seq_len: int
    global_batch_size: int
    num_streams: int
    seed: int = default("data.seed")
    shuffle: bool = default("data.shuffle")
    image_first_probability: float = default("data.image_first_probability")
    cm3: cm3.CM3Options = cm3.CM3Options()
    packing: str = default("data.packing")  # first_fit | pad
    packing_bins: int = default("data.packing_bins")  # 0: rows per stream
    num_workers: int = default("data.num_workers")
    worker_buffer_size: int = default("data.worker_buffer_size")
    retrieved_loss_weight: float = default("data.retrieved_loss_weight")

    @classmethod
    def from_config(cls, config, num_processes: int) -> PipelineOptions:
        d, t = config.data, config.train
        return cls(seq_len=int(t.seq_len), global_batch_size=int(t.global_batch_size),
                   num_streams=resolve_num_streams(d, num_processes),
                   seed=int(d.seed), shuffle=bool(d.shuffle), image_first_probability=float(d.image_first_probability),
                   cm3=cm3.CM3Options.from_config(d), packing=str(d.packing), packing_bins=int(d.packing_bins),
                   num_workers=int(d.num_workers), worker_buffer_size=int(d.worker_buffer_size),
                   retrieved_loss_weight=float(d.retrieved_loss_weight))

    @property
    def rows_per_stream(self) -> int:
        return self.global_batch_size // self.num_streams


def open_document_source(data_config, vocab: vocab_lib.UnifiedVocab, split: str) -> Sequence[bytes]:
    """The random-access records of `split`: token shards under data.token_dir, or the synthetic source."""
    d = data_config
    if d.source == "synthetic":
        return SyntheticDocumentSource(
            vocab, num_records=d.synthetic_records, split="train" if split == d.train_split else "validation",
            seed=d.seed, text_len=d.synthetic_text_len, image_tokens=d.synthetic_image_tokens,
            text_pieces=d.synthetic_text_pieces)
    if not d.token_dir:
        raise ValueError("data.token_dir is empty: set it to a folder of token shards")
    vocab_lib.require_saved_vocab(vocab, d.token_dir)
    return open_token_shards(d.token_dir, split)


def open_retrieval(data_config, vocab: vocab_lib.UnifiedVocab, split: str, evaluation: bool) -> RetrievalAugmenter:
    """The configured augmentation for `split`: precomputed neighbours from the train split's memory bank, K drawn
    from data.num_retrieved_probs in training and fixed to data.eval_num_retrieved at evaluation."""
    d = data_config
    if d.retrieval == "none":
        return NoRetrieval()
    path = neighbours_file(d.neighbours_dir, split)
    if not path.exists():
        raise MissingInputError(f"{path} not found: data.retrieval='neighbours' reads the neighbours that the "
                                f"retrieval stage writes (set data.neighbours_dir, or data.retrieval='none')")
    neighbours = np.load(local_mirror(path), mmap_mode="r")
    records = open_document_source(d, vocab, split)
    if neighbours.ndim != 2 or len(neighbours) != len(records):
        raise BadInputError(f"{path} has shape {neighbours.shape}: expected one row per record of the {split} split "
                         f"({len(records)})")
    probs = ([0.0] * int(d.eval_num_retrieved) + [1.0]) if evaluation else list(d.num_retrieved_probs)
    return NeighbourRetrieval(np.asarray(neighbours), open_document_source(d, vocab, d.train_split), probs)


class DocumentToExample:
    """(global index, source index, record) -> one training example of at most seq_len tokens, plus counters.

    A plain picklable class: grain worker processes run it. An example maker declares the per-token arrays it
    returns (`sequence_keys`, packed into rows) and its per-example counters (`counter_keys`, summed)."""

    sequence_keys = _SEQUENCE_KEYS
    counter_keys = COUNTER_KEYS

    def __init__(self, vocab: vocab_lib.UnifiedVocab, options: PipelineOptions, augment: RetrievalAugmenter):
        self.vocab = vocab
        self.options = options
        self.augment = augment

    def __call__(self, item: tuple[int, int, bytes]) -> dict[str, Any]:
        global_index, source_index, record = item
        o = self.options
        rng = np.random.default_rng([o.seed, global_index])
        document, meta = decode_document_record(record)
        retrieved = [rotate_caption_image(d, rng, o.image_first_probability)
                     for d in self.augment(source_index, document, meta, rng)]
        document = rotate_caption_image(document, rng, o.image_first_probability)
        num_spans = cm3.draw_span_count(rng, o.cm3)
        # seq_len inputs need seq_len + 1 tokens; keep room for the tokens the spans add.
        sample = assemble_sample(retrieved, document, o.seq_len + 1 - cm3.TOKENS_ADDED_PER_SPAN * num_spans)
        required = cm3.whole_text_span(sample.segments, sample.retrieved_segments, o.cm3, rng) if num_spans else None
        spans = cm3.sample_spans([len(s.tokens) for s in sample.segments], num_spans, rng,
                                 (required,) if required is not None else ())
        weights = ([o.retrieved_loss_weight] * sample.retrieved_segments
                   + [1.0] * (len(sample.segments) - sample.retrieved_segments))
        masked = cm3.cm3_mask_document(sample.segments, spans, self.vocab, sample.document_starts, weights)
        report = sample.report
        return {
            "inputs": masked.tokens[:-1],
            "targets": masked.tokens[1:],
            "loss_weights": masked.weights[1:],
            "image_cells": masked.image_cells[:-1],
            "text_tokens_cut": np.int64(report.text_tokens_cut),
            "segments_dropped": np.int64(report.segments_dropped),
            "retrieved_dropped": np.int64(sample.retrieved_dropped),
        }


class PackedToBatchRow:
    """Packed (or padded) example -> the batch contract's row (docs/design.md, Contracts), counters summed over
    packed examples."""

    def __init__(self, vocab: vocab_lib.UnifiedVocab, packed: bool, sequence_keys: tuple[str, ...],
                 counter_keys: tuple[str, ...]):
        self.vocab = vocab
        self.packed = packed
        self.sequence_keys, self.counter_keys = sequence_keys, counter_keys

    def __call__(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
        row = {key: example[key] for key in self.sequence_keys}
        if self.packed:
            row["segment_ids"] = example["inputs_segment_ids"].astype(np.int32)
            row["positions"] = example["inputs_positions"].astype(np.int32)
        else:
            row["segment_ids"] = (np.arange(len(row["inputs"])) < example["length"]).astype(np.int32)
            row["positions"] = np.where(row["segment_ids"] > 0, np.arange(len(row["inputs"])), 0).astype(np.int32)
        row["loss_weights"] = row["loss_weights"].astype(np.float32)
        row["image_cells"] = row["image_cells"].astype(np.int32)
        row["modality"] = self.vocab.modality(row["targets"])
        for key in self.counter_keys:
            row[key] = np.int64(np.sum(example[key]))
        return row


class PadToLength:
    def __init__(self, seq_len: int, sequence_keys: tuple[str, ...], counter_keys: tuple[str, ...]):
        self.seq_len = seq_len
        self.sequence_keys, self.counter_keys = sequence_keys, counter_keys

    def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
        n = len(example["inputs"])
        out = {key: np.pad(example[key], (0, self.seq_len - n)) for key in self.sequence_keys}
        out.update({key: example[key] for key in self.counter_keys}, length=n)
        return out


class _WithRecord:
    def __init__(self, source: Sequence[bytes]):
        self.source = source

    def __call__(self, indices: tuple[int, int]) -> tuple[int, int, bytes]:
        global_index, source_index = indices
        return global_index, source_index, self.source[source_index]


def _pair_with_global_index(global_index: int, source_index: int) -> tuple[int, int]:
    return global_index, int(source_index)


def stream_indices(num_records: int, stream: int, options: PipelineOptions) -> grain.MapDataset:
    """(global index, source index) of the stream's elements: every num_streams-th element of the source order,
    shuffled afresh each epoch when options.shuffle, repeated forever."""
    ds = grain.MapDataset.range(num_records)
    if options.shuffle:
        ds = ds.shuffle(seed=options.seed)
    ds = ds.repeat(None).map_with_index(_pair_with_global_index)
    return ds[stream::options.num_streams]


def _concatenate_rows(stream_batches: tuple[dict[str, np.ndarray], ...]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([b[key] for b in stream_batches]) for key in stream_batches[0]}


def stream_dataset(source: Sequence[bytes], stream: int, vocab: vocab_lib.UnifiedVocab, options: PipelineOptions,
                   to_example) -> grain.IterDataset:
    """Batches of rows_per_stream rows built by `to_example` (DocumentToExample, or SFT's RecordToTaskExample) from
    elements stream, stream + S, ... of the shuffled, repeated source."""
    keys, counters = to_example.sequence_keys, to_example.counter_keys
    ds = stream_indices(len(source), stream, options).map(_WithRecord(source))
    ds = ds.map(to_example).to_iter_dataset()
    if options.packing == "first_fit":
        lengths = {key: options.seq_len for key in keys}
        ds = grain.experimental.FirstFitPackIterDataset(
            ds, length_struct=lengths, num_packing_bins=options.packing_bins or options.rows_per_stream,
            seed=options.seed + stream, shuffle_bins=options.shuffle, meta_features=counters)
    else:
        ds = ds.map(PadToLength(options.seq_len, keys, counters))
    ds = ds.map(PackedToBatchRow(vocab, options.packing == "first_fit", keys, counters))
    return ds.batch(options.rows_per_stream, drop_remainder=True)


def local_streams(rows: tuple[int, int], options: PipelineOptions) -> range:
    """The streams whose rows [start, stop) of the global batch this process holds."""
    start, stop = rows
    per = options.rows_per_stream
    if start % per or stop % per:
        raise ValueError(f"this process holds batch rows [{start}, {stop}), which do not align with data.num_streams="
                         f"{options.num_streams} blocks of {per} rows; use a multiple of the process count")
    return range(start // per, stop // per)


class DocumentBatches(CountingBatches):
    """This process's rows of every global batch, as numpy arrays under BATCH_KEYS (and the example maker's other
    sequence keys); checkpointable.

    `counters` holds this process's running totals of the example maker's counters (text tokens cut and segments
    dropped to fit seq_len; SFT: the examples of each task)."""

    def __init__(self, sources: Sequence[bytes], vocab: vocab_lib.UnifiedVocab, options: PipelineOptions,
                 rows: tuple[int, int], augment: RetrievalAugmenter | None = None, to_example=None):
        to_example = to_example or DocumentToExample(vocab, options, augment or NoRetrieval())
        streams = [stream_dataset(sources, s, vocab, options, to_example) for s in local_streams(rows, options)]
        ds = grain.experimental.ZipIterDataset(streams).map(_concatenate_rows) if len(streams) > 1 else streams[0]
        if options.num_workers > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=options.num_workers,
                                                             per_worker_buffer_size=options.worker_buffer_size))
        super().__init__(ds, to_example.counter_keys)
