"""evaluation/shapes_parser.py: every object of a rendered scene read back exactly, and a blurred scene still read."""
import itertools

import numpy as np
import pytest
import scipy.ndimage

from cm3jax.data.embedded.shapes import BACKGROUND, CELLS, COLORS, KINDS, SIZES, Shape, random_scene, render
from cm3jax.evaluation.shapes_parser import parse_scene


@pytest.mark.parametrize("image_size", [24, 32, 64])
def test_every_kind_colour_size_and_cell_is_read_exactly(image_size):
    wrong = []
    for kind, color, size, cell in itertools.product(KINDS, COLORS, SIZES, CELLS):
        scene = (Shape(kind, color, size, cell),)
        if parse_scene(render(scene, image_size)[0]) != scene:
            wrong.append(scene)
    assert wrong == []


def test_random_scenes_are_read_exactly_in_cell_order():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = random_scene(rng)
        assert parse_scene(render(scene, 32)[0]) == tuple(sorted(scene, key=lambda s: CELLS.index(s.cell)))


def test_a_blurred_scene_is_read_like_its_render():
    """What a decoder gives back is softer than the render: colours mix with the background at the edges."""
    rng = np.random.default_rng(1)
    for _ in range(50):
        scene = random_scene(rng)
        image = scipy.ndimage.gaussian_filter(render(scene, 64)[0].astype(np.float32), (1.4, 1.4, 0))
        assert set(parse_scene(np.round(image).astype(np.uint8))) == set(scene)


def test_an_empty_canvas_has_no_shapes_and_a_wrong_shape_is_refused():
    assert parse_scene(np.full((32, 32, 3), BACKGROUND, np.uint8)) == ()
    with pytest.raises(ValueError, match="square RGB"):
        parse_scene(np.zeros((32, 16, 3), np.uint8))


def test_a_changed_object_is_read_as_changed():
    scene = (Shape("circle", "red", "large", "center"), Shape("square", "blue", "small", "top left"))
    for changed in (Shape("circle", "orange", "large", "center"), Shape("triangle", "red", "large", "center"),
                    Shape("circle", "red", "small", "center"), Shape("circle", "red", "large", "right")):
        parsed = parse_scene(render((changed, scene[1]), 64)[0])
        assert set(parsed) == {changed, scene[1]} and set(parsed) != set(scene)


def test_a_small_triangle_with_a_softened_corner_is_still_a_triangle():
    """What the VQ-GAN does to an 8-pixel triangle: its 2-pixel tip and a base corner come back under half-way to
    its colour, the outline's box moves by a pixel, and the triangle centred on that box overlaps less than a circle
    does."""
    for color, cell in itertools.product(COLORS, CELLS):
        scene = (Shape("triangle", color, "small", cell),)
        image, segmentation = render(scene, 48)
        image = image.copy()
        ys, xs = np.nonzero(segmentation[..., 0])
        tip = [(y, xs[ys == y].min()) for y in np.unique(ys)[:2]]
        for y, x in tip + [(ys.max(), xs[ys == ys.max()].min())]:
            image[y, x] = np.round(0.4 * image[y, x] + 0.6 * np.array(BACKGROUND)).astype(np.uint8)
        assert parse_scene(image) == scene
