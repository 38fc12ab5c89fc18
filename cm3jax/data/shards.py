"""Token shards: ArrayRecord files, one encoded document (documents.encode_document_record) per record, named
`{split}-{index:05d}-of-{count:05d}.array_record`. A split is read as the shards its folder's manifest.json lists
(`cm3jax tokenize` writes it), or, in a folder without one, as the one complete set of shards a glob finds."""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable

import grain
from array_record.python import array_record_module
from etils import epath

from cm3jax.errors import BadInputError, MissingInputError
from cm3jax.storage import PathLike, local_mirror, staged_file

MANIFEST_FILE = "manifest.json"  # written by `cm3jax tokenize`: counts per split, the vocabulary, the code grid
# group_size:1 keeps every record independently readable: the pipeline reads records in shuffled order.
_WRITER_OPTIONS = "group_size:1"


def shard_path(directory: PathLike, split: str, shard: int, num_shards: int) -> epath.Path:
    return epath.Path(directory) / f"{split}-{shard:05d}-of-{num_shards:05d}.array_record"


def shard_paths(directory: PathLike, split: str) -> list[epath.Path]:
    """The split's shards, in order: the `shards` manifest.json gives for it, each required to exist; without a
    manifest, the files of one `-of-NNNNN` set, which must be complete (BadInputError names what is wrong)."""
    directory = epath.Path(directory)
    manifest = directory / MANIFEST_FILE
    listed = json.loads(manifest.read_text()).get("splits", {}).get(split) if manifest.exists() else None
    if listed is not None:
        expected = [shard_path(directory, split, i, int(listed["shards"])) for i in range(int(listed["shards"]))]
        missing = [p.name for p in expected if not p.exists()]
        if missing:
            raise BadInputError(f"{manifest} lists {len(expected)} {split} shards but {', '.join(missing[:3])}"
                                f"{' ...' if len(missing) > 3 else ''} is missing: rerun `cm3jax tokenize`")
        return expected
    found = sorted(directory.glob(f"{split}-*-of-*.array_record")) if directory.is_dir() else []
    set_sizes = sorted({int(p.name.rsplit("-of-", 1)[1].split(".")[0]) for p in found})
    if len(set_sizes) > 1:
        raise BadInputError(f"{directory} holds {split} shards of {len(set_sizes)} sets (of {set_sizes} shards) and "
                            f"no {MANIFEST_FILE} saying which to read: move the other sets away")
    if found and len(found) != set_sizes[0]:
        raise BadInputError(f"{directory} holds {len(found)} of the {set_sizes[0]} {split} shards of its set: finish "
                            f"`cm3jax tokenize` or point data.token_dir at a complete folder")
    return found


def write_token_shards(records: Iterable[bytes], directory: PathLike, split: str, num_shards: int) -> list[epath.Path]:
    """Writes records round-robin into `num_shards` files; they appear only once all are closed, so a reader never
    sees a half-written split. Returns the paths."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
    paths = [shard_path(directory, split, i, num_shards) for i in range(num_shards)]
    with contextlib.ExitStack() as staged:
        writers = [array_record_module.ArrayRecordWriter(staged.enter_context(staged_file(p)), _WRITER_OPTIONS)
                   for p in paths]
        try:
            for i, record in enumerate(records):
                writers[i % num_shards].write(record)
        finally:
            for writer in writers:
                writer.close()
    return paths


def write_token_shard(records: Iterable[bytes], directory: PathLike, split: str, shard: int, num_shards: int) -> int:
    """Writes one shard (it appears whole when closed); returns the number of records."""
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
    count = 0
    with staged_file(shard_path(directory, split, shard, num_shards)) as local:
        writer = array_record_module.ArrayRecordWriter(local, _WRITER_OPTIONS)
        try:
            for record in records:
                writer.write(record)
                count += 1
        finally:
            writer.close()
    return count


def open_token_shards(directory: PathLike, split: str) -> grain.sources.ArrayRecordDataSource:
    """The split's shards as one random-access source (shards in a bucket are read from a local mirror)."""
    paths = shard_paths(directory, split)
    if not paths:
        raise MissingInputError(
            f"no token shards for split {split!r} in {directory} (expected {split}-00000-of-NNNNN.array_record). "
            f"Run `cm3jax tokenize` first, or point data.token_dir at a folder of token shards.")
    return grain.sources.ArrayRecordDataSource([local_mirror(p) for p in paths])
