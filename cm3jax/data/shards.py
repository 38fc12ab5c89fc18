"""Token shards: ArrayRecord files, one encoded document (documents.encode_document_record) per record, named
`{split}-{index:05d}-of-{count:05d}.array_record` so a glob per split finds them in order."""
from __future__ import annotations

import glob
import os
from collections.abc import Iterable

import grain
from array_record.python import array_record_module

from cm3jax.errors import MissingInputError

# group_size:1 keeps every record independently readable: the pipeline reads records in shuffled order.
_WRITER_OPTIONS = "group_size:1"


def shard_path(directory: str, split: str, shard: int, num_shards: int) -> str:
    return os.path.join(directory, f"{split}-{shard:05d}-of-{num_shards:05d}.array_record")


def shard_paths(directory: str, split: str) -> list[str]:
    return sorted(glob.glob(os.path.join(directory, f"{split}-*-of-*.array_record")))


def write_token_shards(records: Iterable[bytes], directory: str, split: str, num_shards: int) -> list[str]:
    """Writes records round-robin into `num_shards` files (to temporary names, renamed once all are closed, so a
    reader never sees a half-written split). Returns the paths."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    os.makedirs(directory, exist_ok=True)
    paths = [shard_path(directory, split, i, num_shards) for i in range(num_shards)]
    writers = [array_record_module.ArrayRecordWriter(f"{p}.tmp", _WRITER_OPTIONS) for p in paths]
    try:
        for i, record in enumerate(records):
            writers[i % num_shards].write(record)
    finally:
        for writer in writers:
            writer.close()
    for path in paths:
        os.replace(f"{path}.tmp", path)
    return paths


def write_token_shard(records: Iterable[bytes], directory: str, split: str, shard: int, num_shards: int) -> int:
    """Writes one shard (temporary name, renamed when closed); returns the number of records."""
    os.makedirs(directory, exist_ok=True)
    path = shard_path(directory, split, shard, num_shards)
    writer = array_record_module.ArrayRecordWriter(f"{path}.tmp", _WRITER_OPTIONS)
    count = 0
    try:
        for record in records:
            writer.write(record)
            count += 1
    finally:
        writer.close()
    os.replace(f"{path}.tmp", path)
    return count


def open_token_shards(directory: str, split: str) -> grain.sources.ArrayRecordDataSource:
    paths = shard_paths(directory, split)
    if not paths:
        raise MissingInputError(
            f"no token shards for split {split!r} in {directory} (expected {split}-00000-of-NNNNN.array_record). "
            f"Run `cm3jax tokenize` first, or point data.token_dir at a folder of token shards.")
    return grain.sources.ArrayRecordDataSource(paths)
