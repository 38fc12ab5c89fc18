"""Safetensors files written one tensor at a time, sharded with an index above a size, and read back one at a time.

The format (https://huggingface.co/docs/safetensors) is a little-endian u64 header length, a JSON header naming each
tensor's dtype, shape and byte range, then the bytes. Every shape is known before any value is read (the checkpoint's
metadata), so the header is written first and each tensor is appended as it arrives: host memory holds one tensor,
never the model. `{"format": "pt"}` metadata is what transformers requires to load a file.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Iterable

import numpy as np
from etils import epath

from cm3jax.storage import PathLike

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int32": "I32", "int64": "I64"}
_ALIGNMENT = 8  # the header is padded with spaces so the data starts 8-byte aligned


def safetensors_dtype(dtype: np.dtype) -> str:
    name = np.dtype(dtype).name
    if name not in _DTYPES:
        raise ValueError(f"no safetensors dtype for {name}")
    return _DTYPES[name]


def plan_shards(specs: list[tuple[str, tuple[int, ...], np.dtype]], max_shard_bytes: int) -> list[list[int]]:
    """Consecutive tensors grouped into shards of at most `max_shard_bytes` (a bigger tensor is a shard alone)."""
    shards, current, size = [], [], 0
    for i, (_, shape, dtype) in enumerate(specs):
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _header(specs: list[tuple[str, tuple[int, ...], np.dtype]], metadata: dict[str, str]) -> bytes:
    entries, offset = {"__metadata__": metadata}, 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        entries[name] = {"dtype": safetensors_dtype(dtype), "shape": list(shape),
                         "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    return header + b" " * (-(len(header) + 8) % _ALIGNMENT)


def write_safetensors(folder: PathLike, specs: list[tuple[str, tuple[int, ...], np.dtype]],
                      tensors: Iterable[tuple[str, np.ndarray]], max_shard_bytes: int,
                      metadata: dict[str, str] | None = None) -> list[str]:
    """Writes `tensors` (arriving in the order of `specs`: name, shape, dtype) as model.safetensors, or as
    model-0000i-of-0000n.safetensors with model.safetensors.index.json when they exceed `max_shard_bytes`. Returns the
    files written."""
    metadata = {"format": "pt", **(metadata or {})}
    shards = plan_shards(specs, max_shard_bytes)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    tensors = iter(tensors)
    weight_map, total = {}, 0
    for file_name, shard in zip(names, shards):
        shard_specs = [specs[i] for i in shard]
        with (epath.Path(folder) / file_name).open("wb") as f:
            header = _header(shard_specs, metadata)
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for name, shape, dtype in shard_specs:
                given_name, value = next(tensors)
                value = np.ascontiguousarray(value)
                if given_name != name or tuple(value.shape) != tuple(shape) or value.dtype != np.dtype(dtype):
                    raise ValueError(f"tensor {given_name} {value.dtype}{list(value.shape)} arrived where "
                                     f"{name} {np.dtype(dtype)}{list(shape)} was planned")
                f.write(value.reshape(-1).view(np.uint8))  # the array's own bytes: no copy
                weight_map[name] = file_name
                total += value.nbytes
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (epath.Path(folder) / INDEX_FILE).write_text(json.dumps(index, indent=2))
        names.append(INDEX_FILE)
    return names


class SafetensorsReader:
    """Single tensors of a safetensors folder (model.safetensors, or shards with an index), each read from its byte
    range alone."""

    def __init__(self, folder: PathLike):
        folder = epath.Path(folder)
        if (folder / INDEX_FILE).exists():
            files = sorted(set(json.loads((folder / INDEX_FILE).read_text())["weight_map"].values()))
        elif (folder / SINGLE_FILE).exists():
            files = [SINGLE_FILE]
        else:
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")
        self._entries = {}
        for file_name in files:
            with (folder / file_name).open("rb") as f:
                header_size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(header_size))
            header.pop("__metadata__", None)
            for name, entry in header.items():
                self._entries[name] = (folder / file_name, 8 + header_size, entry)

    def read(self, name: str) -> np.ndarray:
        if name not in self._entries:
            raise KeyError(f"no tensor {name} in the safetensors files")
        path, data_start, entry = self._entries[name]
        start, end = entry["data_offsets"]
        with path.open("rb") as f:
            f.seek(data_start + start)
            data = f.read(end - start)
        return np.frombuffer(data, _numpy_dtype(entry["dtype"])).reshape(entry["shape"])


def numpy_dtype(name: str) -> np.dtype:
    """'float32', 'bfloat16', ... as a numpy dtype (bfloat16 from ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _numpy_dtype(code: str) -> np.dtype:
    names = {code: name for name, code in _DTYPES.items()}
    if code not in names:
        raise ValueError(f"safetensors dtype {code} is not read here (only {sorted(names)})")
    return numpy_dtype(names[code])
