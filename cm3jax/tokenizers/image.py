"""The trained VQ-GAN as an image tokenizer: uint8 images <-> grids of codebook indices.

    tokenizer = ImageTokenizer.load(config, workdir)     # latest checkpoint of DIR/vqgan
    codes = tokenizer.encode(images)                     # uint8 [n, size, size, 3] -> int32 [n, grid, grid]
    images = tokenizer.decode(codes)                     # -> uint8 [n, size, size, 3]

Every stage that reads or draws images (tokenize, retrieval prompts, generation, benchmarks) goes through it. Batches
are split over the mesh's data axis when their size allows; the parameters are copied to every device.
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cm3jax.data.sources import decode_image
from cm3jax.errors import BadInputError
from cm3jax.models.vqgan import VQGAN, VQGANConfig, pixels_from_uint8, uint8_from_pixels
from cm3jax.parallel.mesh import data_parallel_mesh
from cm3jax.storage import PathLike, arrays_digest
from cm3jax.workdir import Workdir


class ImageTokenizer:
    def __init__(self, model_config: VQGANConfig, params: Any, step: int, mesh: Mesh | None = None):
        self.model_config, self.params, self.step = model_config, params, step
        self.mesh = mesh if mesh is not None else data_parallel_mesh(jax.local_devices()[:1])
        model = VQGAN(model_config)
        self._batch = NamedSharding(self.mesh, PartitionSpec("data"))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))
        self._decode = jax.jit(lambda p, c: model.apply({"params": p}, c, method=model.decode))
        self._digest: str | None = None

    @classmethod
    def load(cls, config: ml_collections.ConfigDict, workdir: Workdir | PathLike,
             mesh: Mesh | None = None) -> ImageTokenizer:
        """The latest checkpoint of the run's VQ-GAN (DIR/vqgan); MissingInputError naming `cm3jax vqgan` when
        there is none."""
        from cm3jax.train.loop import restore_latest_state
        from cm3jax.train.vqgan import vqgan_stage_config, vqgan_state_init

        mesh = mesh if mesh is not None else data_parallel_mesh(jax.local_devices()[:1])
        stage = vqgan_stage_config(config)
        state, step = restore_latest_state(vqgan_state_init(stage)[0], stage, mesh, str(Workdir.of(workdir).vqgan),
                                           "`cm3jax vqgan`")
        return cls(VQGANConfig.from_config(config), state.params["vqgan"], step, mesh)

    @property
    def image_size(self) -> int:
        return self.model_config.image_size

    @property
    def grid(self) -> int:
        return self.model_config.grid_size

    def digest(self) -> str:
        """sha256 of the parameters: what the token shards record of the VQ-GAN they were made with."""
        if self._digest is None:
            self._digest = arrays_digest(self.params)
        return self._digest

    def _place(self, array: np.ndarray):
        """Split over the data axis when the batch divides evenly, else one copy on every device."""
        data = self.mesh.shape["data"]
        return jax.device_put(array, self._batch if array.shape[0] % data == 0 else self._replicated)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [n, size, size, 3] -> int32 [n, grid, grid] codes."""
        with jax.set_mesh(self.mesh):
            return np.asarray(jax.device_get(self._encode(self.params, self._place(pixels_from_uint8(images)))))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """[n, grid, grid] (or [n, grid * grid]) codes -> uint8 [n, size, size, 3]."""
        codes = np.asarray(codes, np.int32).reshape(-1, self.grid, self.grid)
        with jax.set_mesh(self.mesh):
            return uint8_from_pixels(jax.device_get(self._decode(self.params, self._place(codes))))

    def read_image(self, image: Any) -> np.ndarray:
        """Any image (encoded bytes, a path, an array) -> uint8 [size, size, 3]; BadInputError when unreadable."""
        try:
            return decode_image(image, self.image_size)
        except Exception as e:  # noqa: BLE001 - any unreadable input becomes one clear error
            raise BadInputError(f"cannot read the image {image if isinstance(image, str) else ''}: {e}") from e

    def encode_image(self, image: Any) -> np.ndarray:
        """One image (bytes / path / array) -> its [grid, grid] codes."""
        return self.encode(self.read_image(image)[None])[0]
