"""The trained VQ-GAN as an image tokenizer: uint8 images <-> grids of codebook indices.

    tokenizer = ImageTokenizer.load(config, workdir)     # latest checkpoint of DIR/vqgan
    tokenizer.save(folder)                               # parameters and model config only
    tokenizer = ImageTokenizer.from_exported(folder)     # the same tokenizer, without the training run
    codes = tokenizer.encode(images)                     # uint8 [n, size, size, 3] -> int32 [n, grid, grid]
    images = tokenizer.decode(codes)                     # -> uint8 [n, size, size, 3]

Every stage that reads or draws images (tokenize, retrieval prompts, generation, benchmarks) goes through it. Batches
are split over the mesh's data axis when their size allows; the parameters are copied to every device.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cm3jax.data.sources import decode_image
from cm3jax.errors import BadInputError, DamagedCheckpointError, MissingInputError
from cm3jax.models.vqgan import VQGAN, VQGANConfig, pixels_from_uint8, uint8_from_pixels
from cm3jax.parallel.mesh import data_parallel_mesh
from cm3jax.storage import PathLike, absolute_path, arrays_digest, atomic_write_text
from cm3jax.workdir import Workdir

EXPORTED_CONFIG = "image_tokenizer.json"  # what marks a folder written by ImageTokenizer.save


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
        there is none. Only the VQ-GAN's parameters are read (not the discriminator, not the optimizer state)."""
        from cm3jax.parallel.sharding import logical_axis_rules
        from cm3jax.train.checkpoint import Checkpointer
        from cm3jax.train.loop import abstract_state_and_shardings
        from cm3jax.train.vqgan import vqgan_stage_config, vqgan_state_init

        mesh = mesh if mesh is not None else data_parallel_mesh(jax.local_devices()[:1])
        stage = vqgan_stage_config(config)
        abstract, shardings = abstract_state_and_shardings(vqgan_state_init(stage)[0], mesh,
                                                           logical_axis_rules(stage))
        checkpointer = Checkpointer(Workdir.of(workdir).vqgan.checkpoints, keep=1, create=False)
        try:
            step = checkpointer.latest_step()
            if step is None:
                raise MissingInputError(f"no checkpoint under {checkpointer.directory}: run `cm3jax vqgan` first")
            params = checkpointer.restore_params(step, {"vqgan": abstract.params["vqgan"]},
                                                 {"vqgan": shardings.params["vqgan"]})
        finally:
            checkpointer.close()
        return cls(VQGANConfig.from_config(config), params["vqgan"], step, mesh)

    def save(self, folder: PathLike) -> epath.Path:
        """Writes the parameters (no discriminator, no optimizer state) as an orbax checkpoint and the model config,
        step and parameter digest as EXPORTED_CONFIG; `from_exported` reads them back. Every process takes part in
        the orbax write; process 0 writes EXPORTED_CONFIG (other processes may return before it is there)."""
        folder = absolute_path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with ocp.StandardCheckpointer() as checkpointer:
            # Host copies: every process holds the whole VQ-GAN; orbax writes numpy arrays from the primary process.
            checkpointer.save(folder / "params", jax.device_get(self.params), force=True)
        if jax.process_index() == 0:
            atomic_write_text(folder / EXPORTED_CONFIG, json.dumps(
                {"model": dataclasses.asdict(self.model_config), "step": self.step, "params_sha256": self.digest()},
                indent=1))
        return folder

    @classmethod
    def from_exported(cls, folder: PathLike, mesh: Mesh | None = None) -> ImageTokenizer:
        """The tokenizer `save` wrote to `folder`, on `mesh` (default: one local device), checked against the
        digest saved with it."""
        folder = absolute_path(folder)
        if not (folder / EXPORTED_CONFIG).exists():
            raise MissingInputError(f"{folder} holds no exported image tokenizer (no {EXPORTED_CONFIG})")
        saved = json.loads((folder / EXPORTED_CONFIG).read_text())
        model_config = VQGANConfig(**{**saved["model"],
                                      "channel_multipliers": tuple(saved["model"]["channel_multipliers"])})
        mesh = mesh if mesh is not None else data_parallel_mesh(jax.local_devices()[:1])
        replicated = NamedSharding(mesh, PartitionSpec())
        size = model_config.image_size
        shapes = jax.eval_shape(lambda: VQGAN(model_config).init(jax.random.key(0),
                                                                 jnp.zeros((1, size, size, 3)))["params"])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), shapes)
        try:
            with ocp.StandardCheckpointer() as checkpointer:
                params = checkpointer.restore(folder / "params", target)
        except Exception as e:  # orbax and tensorstore raise many kinds for unreadable files
            raise DamagedCheckpointError(f"cannot read the image tokenizer's parameters in {folder}: {e}") from e
        tokenizer = cls(model_config, params, int(saved["step"]), mesh)
        if tokenizer.digest() != saved["params_sha256"]:
            raise DamagedCheckpointError(f"the image tokenizer's parameters in {folder} are not the ones saved "
                                         f"there (sha256 {tokenizer.digest()[:12]}, saved "
                                         f"{saved['params_sha256'][:12]})")
        return tokenizer

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
