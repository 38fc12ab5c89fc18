"""Image batches for the VQ-GAN trainer: a raw source's images as float [-1, 1] NHWC, shuffled, repeated and split
between processes, with checkpointable grain iterator state.

A record that cannot be read (corrupt image, missing file) stays in the batch as a zero image with `valid` 0, so the
batch shape never changes; the trainer weights it out and `counters["skipped_images"]` counts it.
"""
from __future__ import annotations

import grain
import numpy as np

from cm3jax.data.batches import CountingBatches
from cm3jax.data.sources import RawSource, decode_image
from cm3jax.models.vqgan import pixels_from_uint8


class DecodeImage:
    def __init__(self, source: RawSource, image_size: int):
        self.source = source
        self.image_size = image_size

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        # Only the image matters here: the caption is not read, so an empty one does not drop the image.
        try:
            image = decode_image(self.source.raw(int(index))[0], self.image_size)
        except Exception:  # noqa: BLE001 - a bad record or image is data, not a bug: counted, never fatal
            return {"images": np.zeros((self.image_size, self.image_size, 3), np.float32), "valid": np.float32(0.0),
                    "skipped_images": np.int64(1)}
        return {"images": pixels_from_uint8(image), "valid": np.float32(1.0),
                "skipped_images": np.int64(0)}


class ImageBatches(CountingBatches):
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
        super().__init__(ds, ("skipped_images",))
