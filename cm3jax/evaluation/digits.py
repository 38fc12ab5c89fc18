"""Scoring generated digits and captions of the embedded `digits` data with a classifier independent of the LM."""
from __future__ import annotations

import functools
import re

import numpy as np


@functools.cache
def digit_classifier():
    """Logistic regression on scikit-learn's 8x8 digits of our train split (ink levels 0..16): it reads a 32x32
    digit through `ink_8x8` and never saw a held-out digit or the VQ-GAN. Fitted once per process (every task and
    guidance setting of an eval reads with the same one)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from cm3jax.data.embedded.digits import split_indices

    digits = load_digits()
    train = split_indices()["train"]
    return LogisticRegression(max_iter=5000).fit(digits.data[train], digits.target[train])


def ink_8x8(images: np.ndarray) -> np.ndarray:
    """[n, S, S, 3] uint8 ink-on-paper images (S a multiple of 8) -> [n, 64] ink levels 0..16 (block means)."""
    grey = images.astype(np.float32).mean(axis=-1)
    n, size = grey.shape[0], grey.shape[1]
    blocks = grey.reshape(n, 8, size // 8, 8, size // 8).mean(axis=(2, 4))
    return ((255.0 - blocks) / 255.0 * 16.0).reshape(n, 64)


def caption_digit(caption: str) -> int:
    """The digit a caption names (word or numeral), -1 when it names none or several."""
    from cm3jax.data.embedded.digits import NAMES

    found = {NAMES.index(w) for w in re.findall(r"[a-z]+", caption.lower()) if w in NAMES}
    found |= {int(d) for d in re.findall(r"\b\d\b", caption)}
    return found.pop() if len(found) == 1 else -1
