"""Image batches for the VQ-GAN trainer: a raw source's images as float [-1, 1] NHWC, shuffled, repeated and split
between processes, with checkpointable grain iterator state.

A record that cannot be read (corrupt image, missing file) stays in the batch as a zero image with `valid` 0, so the
batch shape never changes; the trainer weights it out and `counters["skipped_images"]` counts it.
"""
from __future__ import annotations

import grain
import numpy as np

from cm3jax.data.sources import RawSource, SkipCounts, read_examples


class DecodeImage:
    def __init__(self, source: RawSource, image_size: int):
        self.source = source
        self.image_size = image_size

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        # Captions do not matter here: an empty one must not drop the image.
        counts = SkipCounts()
        examples = list(read_examples(_ImageOnly(self.source), self.image_size, counts, [int(index)]))
        if not examples:
            return {"images": np.zeros((self.image_size, self.image_size, 3), np.float32),
                    "valid": np.float32(0.0)}
        return {"images": examples[0].image.astype(np.float32) / 127.5 - 1.0, "valid": np.float32(1.0)}


class _ImageOnly:
    def __init__(self, source: RawSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def raw(self, index: int):
        image, _, meta = self.source.raw(index)
        return image, "image", meta


class ImageBatches:
    """This process's `rows` images per step; a CheckpointableIterator for the training loop."""

    def __init__(self, source: RawSource, *, image_size: int, rows: tuple[int, int], global_batch_size: int,
                 seed: int = 0, shuffle: bool = True, num_workers: int = 0):
        per_process = rows[1] - rows[0]
        shard, num_shards = rows[0] // per_process, global_batch_size // per_process
        ds = grain.MapDataset.range(len(source))
        if shuffle:
            ds = ds.shuffle(seed=seed)
        ds = ds.repeat(None)[shard::num_shards].map(DecodeImage(source, image_size))
        ds = ds.batch(per_process, drop_remainder=True).to_iter_dataset()
        if num_workers > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
        self._iterator = iter(ds)
        self.counters = {"skipped_images": 0}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        self.counters["skipped_images"] += int(np.sum(batch["valid"] == 0))
        return batch

    def get_state(self) -> dict:
        return {"iterator": self._iterator.get_state(), "counters": dict(self.counters)}

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state["iterator"])
        self.counters = dict(state["counters"])
