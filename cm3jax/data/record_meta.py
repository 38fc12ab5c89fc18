"""What a record keeps besides its image and caption: the source's other fields (objects and their boxes, question
-answer pairs, an edit pair, a segmentation map, every reference caption), so evaluation and SFT can use them.

A TFDS example's fields become plain values: text as str, class labels as their names (`label` at the top level
stays the class index), tensors as lists, sequences of features as dicts of lists. Its other images become
`MetaImage`s: `read_examples` decodes them at the record's image size (a one-channel image is a label map: resized
nearest-neighbour and drawn with LABEL_MAP_COLORS), and the tokens stage stores each as the unified ids of its
VQ-GAN codes (int32 little-endian bytes, as document segments are; `meta_image_ids` reads them back).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image

BACKGROUND_LABEL_COLOR = (245, 245, 240)
# Label i > 0 is drawn in colour (i - 1) % len: saturated colours far from each other and from the background.
LABEL_MAP_COLORS = ((40, 80, 220), (220, 40, 40), (40, 170, 60), (235, 200, 30), (140, 60, 190), (245, 130, 30))


@dataclasses.dataclass(frozen=True)
class MetaImage:
    """An image field of a record other than its main image: undecoded (bytes / path / array) until read."""
    value: Any
    label_map: bool = False


def tfds_meta(example: dict, features, skip: set[str]) -> dict[str, Any]:
    """The fields of a TFDS example other than `skip` (the top-level keys of its image and caption), as plain
    values described by its FeaturesDict."""
    return {key: _plain(example[key], features[key], top_level=key)
            for key in features.keys() if key not in skip and key in example}


def _plain(value: Any, feature, top_level: str = "") -> Any:
    import tensorflow_datasets as tfds

    f = tfds.features
    if isinstance(feature, f.FeaturesDict):
        return {key: _plain(value[key], feature[key]) for key in feature.keys() if key in value}
    if isinstance(feature, f.Sequence):
        inner = feature.feature
        if isinstance(inner, f.FeaturesDict):
            return {key: [_plain(v, inner[key]) for v in value[key]] for key in inner.keys() if key in value}
        return [_plain(v, inner) for v in value]
    if isinstance(feature, f.Image):
        array = np.asarray(value)
        return MetaImage(array, label_map=array.ndim == 3 and array.shape[-1] == 1)
    if isinstance(feature, f.ClassLabel) and top_level != "label":
        return feature.int2str(int(value))
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def meta_texts(meta: Any) -> list[str]:
    """Every non-empty text in a record's meta, at any depth (class names, questions, answers, instructions)."""
    if isinstance(meta, dict):
        return [text for value in meta.values() for text in meta_texts(value)]
    if isinstance(meta, list):
        return [text for value in meta for text in meta_texts(value)]
    return [" ".join(meta.split())] if isinstance(meta, str) and meta.strip() else []


def map_meta_images(meta: Any, fn: Callable[[Any], Any]) -> Any:
    """`meta` with fn applied to every MetaImage or uint8 image array in it (at any depth)."""
    if isinstance(meta, dict):
        return {key: map_meta_images(value, fn) for key, value in meta.items()}
    if isinstance(meta, list):
        return [map_meta_images(value, fn) for value in meta]
    if isinstance(meta, MetaImage) or (isinstance(meta, np.ndarray) and meta.dtype == np.uint8 and meta.ndim == 3):
        return fn(meta)
    return meta


def decode_meta_image(image: MetaImage, size: int) -> np.ndarray:
    """-> uint8 [size, size, 3]; a label map is drawn in LABEL_MAP_COLORS. Raises on unreadable data."""
    from cm3jax.data.sources import decode_image, load_image, resize_center_crop

    if not image.label_map:
        return decode_image(image.value, size)
    return label_map_to_rgb(resize_center_crop(load_image(image.value).convert("L"), size, PIL.Image.NEAREST))


def label_map_to_rgb(labels: np.ndarray) -> np.ndarray:
    """uint [H, W] labels (0: background) -> uint8 [H, W, 3]."""
    palette = np.array((BACKGROUND_LABEL_COLOR,) + LABEL_MAP_COLORS, np.uint8)
    labels = np.asarray(labels, np.int64)
    return palette[np.where(labels > 0, 1 + (labels - 1) % len(LABEL_MAP_COLORS), 0)]


def meta_image_ids(value: bytes) -> np.ndarray:
    """The unified image-token ids the tokens stage stored for a MetaImage."""
    return np.frombuffer(value, "<i4").astype(np.int32)
