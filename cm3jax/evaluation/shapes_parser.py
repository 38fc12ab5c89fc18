"""Reads a `shapes` image back into its objects (kind, colour, size, cell), with no learning.

Scenes are drawn on a plain background in a 3x3 grid, at most one shape per cell, from a fixed palette
(`data/embedded/shapes.py`), so each cell is read on its own:
- the shape is the largest patch of pixels far from the background; a patch thinner than a third of the cell (what
  a blurred neighbour leaves at the cell's edge) or smaller than a few pixels is no shape;
- its colour is the palette colour that, mixed with the background, comes nearest to the median of the patch's
  most saturated half;
- its outline is where the pixels are at least half-way from the background to that colour, and its kind and size
  are those of the drawn shape (`draw_shape`, centred on the outline's box or up to a pixel off it) that overlaps the
  outline best (IoU). The pixel of play matters for small shapes: a decoder that softens one corner of an 8-pixel
  triangle moves its box by a pixel, and the centred triangle then overlaps less than a circle does.
The same reader scores generated images and VQ-GAN reconstructions, which are blurred and slightly off in colour.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import PIL.Image
import PIL.ImageDraw
import scipy.ndimage

from cm3jax.data.embedded.shapes import (
    BACKGROUND,
    CELLS,
    COLORS,
    HALF_EXTENT,
    KINDS,
    RGB,
    SIZES,
    Scene,
    Shape,
    draw_shape,
)

_BACKGROUND = np.array(BACKGROUND, np.float32)
_PALETTE = np.array([RGB[c] for c in COLORS], np.float32)
# Every palette colour is over 200 (RGB distance) from the background; a pixel 60 away is at least a quarter shape.
_FOREGROUND_DISTANCE = 60.0
_MIN_THICKNESS = 1 / 3  # of a cell, in both directions (a small shape spans 1/2)
_MIN_PIXELS = 4
_CENTER_OFFSETS = (-1, 0, 1)  # pixels a template may sit off the centre of the outline's box


@dataclasses.dataclass(frozen=True)
class ParsedObject:
    shape: Shape
    # (ymin, xmin, ymax, xmax), as fractions of the image, of the drawn shape that fits the outline best: the box the
    # dataset draws a shape in (`shape_box`). The outline's own extent is a pixel wider than that box (the drawing
    # includes its last row and column) and loses a small triangle's one-pixel tip to any blur.
    box: tuple[float, float, float, float]


def parse_scene(image: np.ndarray) -> Scene:
    """uint8 [S, S, 3] -> the shapes it shows, in cell order."""
    return tuple(o.shape for o in parse_objects(image))


def parse_objects(image: np.ndarray) -> list[ParsedObject]:
    """uint8 [S, S, 3] -> the shapes it shows with their boxes, in cell order."""
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"expected a square RGB image, got shape {image.shape}")
    size = image.shape[0]
    contrast = np.linalg.norm(image - _BACKGROUND, axis=-1)
    found = []
    for index, cell in enumerate(CELLS):
        row, col = divmod(index, 3)
        rows = slice(round(row * size / 3), round((row + 1) * size / 3))
        cols = slice(round(col * size / 3), round((col + 1) * size / 3))
        parsed = _read_cell(image, contrast, rows, cols, cell)
        if parsed is not None:
            found.append(parsed)
    return found


def _read_cell(image: np.ndarray, contrast: np.ndarray, rows: slice, cols: slice, cell: str) -> ParsedObject | None:
    patch = _largest_component(contrast[rows, cols] > _FOREGROUND_DISTANCE)
    if not _is_shape(patch):
        return None
    pixels, strength = image[rows, cols][patch], contrast[rows, cols][patch]
    color_index = _nearest_color(np.median(pixels[strength >= np.median(strength)], axis=0))
    half_way = 0.5 * float(np.linalg.norm(_PALETTE[color_index] - _BACKGROUND))
    outline = _largest_component(contrast[rows, cols] > half_way)
    if not _is_shape(outline):
        return None
    kind, size, box = _best_template(outline, image.shape[0], rows.start, cols.start)
    return ParsedObject(Shape(kind=kind, color=COLORS[color_index], size=size, cell=cell),
                        tuple(float(v) / image.shape[0] for v in box))


def _nearest_color(pixel: np.ndarray) -> int:
    """The palette colour that, mixed with the background, comes closest to `pixel` (a blurred small shape is
    such a mix: a half-way red must not read as orange)."""
    directions = _PALETTE - _BACKGROUND
    share = np.clip(directions @ (pixel - _BACKGROUND) / (directions ** 2).sum(-1), 0.0, 1.0)
    return int(np.argmin(np.linalg.norm(pixel - _BACKGROUND - share[:, None] * directions, axis=-1)))


def _is_shape(mask: np.ndarray) -> bool:
    if mask.sum() < _MIN_PIXELS:
        return False
    ys, xs = np.nonzero(mask)
    thinnest = min(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
    return thinnest >= _MIN_THICKNESS * max(mask.shape)


def _best_template(outline: np.ndarray, image_size: int, top: int, left: int) -> tuple[str, str, np.ndarray]:
    """(kind, size, box in pixels) of the drawn shape, centred where the outline's box is or a pixel off it, that
    overlaps the outline most."""
    ys, xs = np.nonzero(outline)
    center_y = top + (ys.min() + ys.max() + 1) / 2
    center_x = left + (xs.min() + xs.max() + 1) / 2
    best, best_iou = None, -1.0
    for kind, size, dy, dx in itertools.product(KINDS, SIZES, _CENTER_OFFSETS, _CENTER_OFFSETS):
        half = HALF_EXTENT[size] * image_size / 3
        y, x = center_y + dy, center_x + dx
        box = np.array([y - half, x - half, y + half, x + half])
        canvas = PIL.Image.new("L", (image_size, image_size), 0)
        draw_shape(PIL.ImageDraw.Draw(canvas), kind, box, 1)
        template = np.asarray(canvas, bool)[top:top + outline.shape[0], left:left + outline.shape[1]]
        iou = (template & outline).sum() / max((template | outline).sum(), 1)
        if iou > best_iou:
            best, best_iou = (kind, size, box), iou
    return best


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = scipy.ndimage.label(mask)
    if count <= 1:
        return mask
    return labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
