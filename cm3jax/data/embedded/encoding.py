"""Images are handed to TFDS as encoded PNG bytes: encoding numpy arrays itself would need TensorFlow."""
from __future__ import annotations

import io

import numpy as np
import PIL.Image


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] or [H, W, 1] -> PNG bytes."""
    image = np.asarray(image, np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()
