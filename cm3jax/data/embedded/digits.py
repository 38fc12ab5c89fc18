"""`digits`: the 1,797 real handwritten digits that scikit-learn ships (8x8, 17 grey levels), upsampled to 32x32 RGB
ink-on-paper images, each with a caption from one of several templates and its label. Fixed split: 1,397 train,
200 validation, 200 test."""
from __future__ import annotations

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from cm3jax.data.embedded.encoding import png_bytes

IMAGE_SIZE = 32
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten {name}",
    "the digit {digit} written in ink",
    "a picture of the number {name}",
    "handwritten digit {digit}",
    "a scanned {name} written by hand",
)
SPLIT_SIZES = {"train": 1397, "validation": 200, "test": 200}
_SPLIT_SEED = 20230901


def digit_image(pixels_8x8: np.ndarray) -> np.ndarray:
    """Grey levels 0..16 (16 = ink) -> 32x32x3 uint8, dark ink on white, bicubic upsampling."""
    ink = (np.asarray(pixels_8x8, np.float32) / 16.0 * 255.0).astype(np.uint8)
    small = PIL.Image.fromarray(255 - ink, mode="L")
    return np.asarray(small.resize((IMAGE_SIZE, IMAGE_SIZE), PIL.Image.BICUBIC).convert("RGB"))


def digit_caption(label: int, index: int) -> str:
    template = TEMPLATES[np.random.default_rng([_SPLIT_SEED, index]).integers(len(TEMPLATES))]
    return template.format(name=NAMES[label], digit=label)


def split_indices() -> dict[str, np.ndarray]:
    order = np.random.default_rng(_SPLIT_SEED).permutation(sum(SPLIT_SIZES.values()))
    bounds = np.cumsum([0] + list(SPLIT_SIZES.values()))
    return {name: np.sort(order[a:b]) for name, a, b in zip(SPLIT_SIZES, bounds[:-1], bounds[1:])}


class Digits(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "scikit-learn digits, 32x32 RGB, five caption templates."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
                "caption": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=NAMES),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {name: self._generate_examples(indices) for name, indices in split_indices().items()}

    def _generate_examples(self, indices):
        from sklearn.datasets import load_digits  # the data files ship inside scikit-learn: no download

        digits = load_digits()
        for i in indices:
            label = int(digits.target[i])
            yield int(i), {"image": png_bytes(digit_image(digits.images[i])), "caption": digit_caption(label, int(i)),
                           "label": label}
