"""Datasets cm3jax builds locally (no network) as real TFDS datasets in array_record format, read back with
`tfds.data_source` like any prepared catalogue dataset (e.g. coco_captions)."""
from __future__ import annotations

import contextlib
import io

import tensorflow_datasets as tfds

from cm3jax.data.embedded.digits import Digits
from cm3jax.data.embedded.shapes import Shapes, ShapesConfig

EMBEDDED_DATASETS = ("digits", "shapes")


def embedded_builder(name: str, data_dir: str, *, shapes_train_size: int = 20000, shapes_image_size: int = 64,
                     seed: int = 0) -> tfds.core.DatasetBuilder:
    if name == "digits":
        return Digits(data_dir=data_dir, file_format="array_record")
    if name == "shapes":
        config = ShapesConfig.make(shapes_train_size, shapes_image_size, seed)
        return Shapes(config=config, data_dir=data_dir, file_format="array_record")
    raise ValueError(f"unknown embedded dataset {name!r}; known: {EMBEDDED_DATASETS}")


def embedded_version(dataset: str) -> str | None:
    """The version this code builds of an embedded dataset (None for other datasets): a workdir's data and tokens
    made from another version are stale."""
    builders = {"digits": Digits, "shapes": Shapes}
    return str(builders[dataset].VERSION) if dataset in builders else None


def build_embedded(name: str, data_dir: str, **options) -> tfds.core.DatasetBuilder:
    """Builds the dataset under data_dir unless it is already there; returns its builder."""
    builder = embedded_builder(name, data_dir, **options)
    # TFDS prints "Downloading and preparing dataset Unknown size ..." for a build that downloads nothing.
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
    if "prepared" in printed.getvalue():
        print(f"data: built the embedded {name} dataset in {builder.data_dir}", flush=True)
    return builder
