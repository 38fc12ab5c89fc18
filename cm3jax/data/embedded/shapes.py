"""`shapes`: procedural scenes of 1-3 shapes with exact ground truth for every SFT task.

Each scene places shapes (kind, colour, size) in distinct cells of a 3x3 grid, no two with the same kind and colour, so
every phrase ("the red circle") names one object. An example holds the image, its caption, per-object labels and
boxes, a segmentation map (0 background, i for object i), one edit pair (recolour / move / add / remove, with the
instruction, the edited image and its caption) and question-answer pairs. Scene i of a split depends only on
(seed, split, i).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import PIL.Image
import PIL.ImageDraw
import tensorflow_datasets as tfds

from cm3jax.data.embedded.encoding import png_bytes

KINDS = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
       "purple": (140, 60, 190), "orange": (245, 130, 30)}
SIZES = ("small", "large")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
EDITS = ("recolour", "move", "add", "remove")
NUMBER_WORDS = ("zero", "one", "two", "three")
BACKGROUND = (245, 245, 240)
HALF_EXTENT = {"small": 0.25, "large": 0.42}  # of a cell: shapes in distinct cells never touch
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    size: str
    cell: str

    def phrase(self) -> str:
        return f"{self.size} {self.color} {self.kind}"

    def name(self) -> str:
        return f"{self.color} {self.kind}"


Scene = tuple[Shape, ...]


def _new_shape(rng: np.random.Generator, scene: Scene) -> Shape:
    """A shape in a free cell with a (kind, colour) not yet in the scene."""
    taken = {(s.kind, s.color) for s in scene}
    free = [c for c in CELLS if c not in {s.cell for s in scene}]
    while True:
        kind, color = KINDS[rng.integers(len(KINDS))], COLORS[rng.integers(len(COLORS))]
        if (kind, color) not in taken:
            return Shape(kind, color, SIZES[rng.integers(len(SIZES))], free[rng.integers(len(free))])


def random_scene(rng: np.random.Generator) -> Scene:
    scene: Scene = ()
    for _ in range(int(rng.integers(1, 4))):
        scene += (_new_shape(rng, scene),)
    return scene


def shape_box(shape: Shape, image_size: int) -> np.ndarray:
    """(ymin, xmin, ymax, xmax) in pixels, as drawn."""
    cell = image_size / 3
    row, col = divmod(CELLS.index(shape.cell), 3)
    cy, cx, h = (row + 0.5) * cell, (col + 0.5) * cell, HALF_EXTENT[shape.size] * cell
    return np.array([cy - h, cx - h, cy + h, cx + h], np.float32)


def render(scene: Scene, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (uint8 [S, S, 3] image, uint8 [S, S, 1] segmentation with object i+1 where shape i is drawn)."""
    image = PIL.Image.new("RGB", (image_size, image_size), BACKGROUND)
    segmentation = PIL.Image.new("L", (image_size, image_size), 0)
    for index, shape in enumerate(scene):
        box = shape_box(shape, image_size)
        draw_shape(PIL.ImageDraw.Draw(image), shape.kind, box, RGB[shape.color])
        draw_shape(PIL.ImageDraw.Draw(segmentation), shape.kind, box, index + 1)
    return np.asarray(image), np.asarray(segmentation)[..., None]


def draw_shape(canvas: PIL.ImageDraw.ImageDraw, kind: str, box: np.ndarray, fill) -> None:
    """Draws a shape of `kind` filling `box` (ymin, xmin, ymax, xmax in pixels); the triangle points up."""
    y0, x0, y1, x1 = np.asarray(box, np.float64).tolist()
    if kind == "circle":
        canvas.ellipse((x0, y0, x1, y1), fill=fill)
    elif kind == "square":
        canvas.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        canvas.polygon(((x0 + x1) / 2, y0, x0, y1, x1, y1), fill=fill)


def where_phrase(cell: str) -> str:
    return {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
            "center": "in the center"}.get(cell, f"in the {cell}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    """Names the shapes in reading order (by cell, left to right, top to bottom), so one image has one caption."""
    parts = [f"a {s.phrase()} {where_phrase(s.cell)}" for s in sorted(scene, key=lambda s: CELLS.index(s.cell))]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def random_edit(scene: Scene, rng: np.random.Generator) -> tuple[str, str, Scene]:
    """-> (edit kind, instruction, edited scene)."""
    free = [c for c in CELLS if c not in {s.cell for s in scene}]
    kinds = ["recolour", "move"] + (["add"] if len(scene) < 3 else []) + (["remove"] if len(scene) > 1 else [])
    kind = kinds[rng.integers(len(kinds))]
    i = int(rng.integers(len(scene)))
    target = scene[i]
    if kind == "add":
        added = _new_shape(rng, scene)
        return kind, f"add a {added.phrase()} {where_phrase(added.cell)}", scene + (added,)
    if kind == "remove":
        return kind, f"remove the {target.name()}", scene[:i] + scene[i + 1:]
    if kind == "move":
        cell = free[rng.integers(len(free))]
        moved = dataclasses.replace(target, cell=cell)
        return kind, f"move the {target.name()} to the {cell}", scene[:i] + (moved,) + scene[i + 1:]
    taken = {(s.kind, s.color) for s in scene}
    colors = [c for c in COLORS if (target.kind, c) not in taken]
    recoloured = dataclasses.replace(target, color=colors[rng.integers(len(colors))])
    return kind, f"make the {target.name()} {recoloured.color}", scene[:i] + (recoloured,) + scene[i + 1:]


def questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Question-answer pairs whose answers follow from the scene exactly."""
    shape = scene[rng.integers(len(scene))]
    present = {(s.kind, s.color) for s in scene}
    kind, color = KINDS[rng.integers(len(KINDS))], COLORS[rng.integers(len(COLORS))]
    return [
        ("how many shapes are there?", NUMBER_WORDS[len(scene)]),
        (f"what color is the {shape.kind} {where_phrase(shape.cell)}?", shape.color),
        (f"what shape is {where_phrase(shape.cell)}?", shape.kind),
        (f"where is the {shape.name()}?", shape.cell),
        (f"is there {_article(color)} {color} {kind}?", "yes" if (kind, color) in present else "no"),
    ]


def scene_example(seed: int, split: str, index: int, image_size: int) -> dict:
    """The TFDS example of scene `index` (images as PNG bytes)."""
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    scene = random_scene(rng)
    image, segmentation = render(scene, image_size)
    edit_kind, instruction, edited = random_edit(scene, rng)
    edited_image, _ = render(edited, image_size)
    return {
        "image": png_bytes(image),
        "caption": caption(scene),
        "objects": {
            "kind": [s.kind for s in scene],
            "color": [s.color for s in scene],
            "size": [s.size for s in scene],
            "position": [s.cell for s in scene],
            "bbox": np.stack([shape_box(s, image_size) / image_size for s in scene]),
        },
        "segmentation": png_bytes(segmentation),
        "edit": {"kind": edit_kind, "instruction": instruction, "image": png_bytes(edited_image),
                 "caption": caption(edited)},
        "vqa": [{"question": q, "answer": a} for q, a in questions(scene, rng)],
    }


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    num_train: int = 20000
    image_size: int = 64
    seed: int = 0

    @classmethod
    def make(cls, num_train: int = 20000, image_size: int = 64, seed: int = 0) -> ShapesConfig:
        return cls(name=f"train{num_train}_size{image_size}_seed{seed}", num_train=num_train, image_size=image_size,
                   seed=seed)

    @property
    def split_sizes(self) -> dict[str, int]:
        held_out = min(1000, max(self.num_train // 10, 10))
        return {"train": self.num_train, "validation": held_out, "test": held_out}


class Shapes(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "1-3 shapes, caption, boxes, segmentation, edit pair, VQA.",
                     "1.1.0": "Captions name the shapes in reading order."}
    BUILDER_CONFIGS = [ShapesConfig.make()]

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        label = lambda names: tfds.features.ClassLabel(names=names)  # noqa: E731
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3)),
                "caption": tfds.features.Text(),
                "objects": tfds.features.Sequence({
                    "kind": label(KINDS), "color": label(COLORS), "size": label(SIZES), "position": label(CELLS),
                    "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),  # ymin, xmin, ymax, xmax in [0, 1]
                }),
                "segmentation": tfds.features.Image(shape=(size, size, 1)),
                "edit": tfds.features.FeaturesDict({
                    "kind": label(EDITS), "instruction": tfds.features.Text(),
                    "image": tfds.features.Image(shape=(size, size, 3)), "caption": tfds.features.Text(),
                }),
                "vqa": tfds.features.Sequence({"question": tfds.features.Text(), "answer": tfds.features.Text()}),
            }),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, n) for split, n in self.builder_config.split_sizes.items()}

    def _generate_examples(self, split: str, count: int):
        c = self.builder_config
        for index in range(count):
            yield index, scene_example(c.seed, split, index, c.image_size)
