"""evaluation/scorers.py: each scorer against hand-built cases; a wrong answer must score lower than a right one."""
import numpy as np
import pytest

from cm3jax.data.embedded.shapes import CELLS, Shape, caption, random_scene, render
from cm3jax.evaluation import scorers
from cm3jax.evaluation.shapes_parser import parse_objects

RED_CIRCLE = Shape("circle", "red", "small", "top left")
BLUE_SQUARE = Shape("square", "blue", "large", "bottom")


def test_every_generated_caption_reads_back_as_its_scene_in_reading_order():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = random_scene(rng)
        parsed = scorers.parse_caption(caption(scene))
        assert set(parsed) == set(scene) and len(parsed) == len(scene)
        assert [CELLS.index(s.cell) for s in parsed] == sorted(CELLS.index(s.cell) for s in scene)


def test_captions_that_do_not_name_one_object_per_cell_are_unreadable():
    assert scorers.parse_caption("A small red circle in the top left.") == (RED_CIRCLE,)
    for text in ("", "a red circle in the top left", "a small red circle in the top left and",
                 "a small red circle in the top left and a small red circle at the bottom",
                 "a small red circle in the top left, a large blue square in the top left",
                 "a small red hexagon in the top left"):
        assert scorers.parse_caption(text) is None, text


def test_a_caption_with_one_wrong_colour_is_not_scene_exact():
    reference = (RED_CIRCLE, BLUE_SQUARE)
    wrong = scorers.parse_caption("a small red circle in the top left and a large green square at the bottom")
    scores = scorers.scene_scores(wrong, reference)
    assert scores == {"exact": 0.0, "count": 1.0, "cells": 1.0, "kind": 1.0, "color": 0.5, "size": 1.0}
    assert scorers.scene_scores(tuple(reversed(reference)), reference)["exact"] == 1.0  # a scene is a set


def test_scene_scores_count_missing_extra_and_unreadable_objects():
    reference = (RED_CIRCLE, BLUE_SQUARE)
    missing = scorers.scene_scores((RED_CIRCLE,), reference)
    assert missing == {"exact": 0.0, "count": 0.0, "cells": 0.5, "kind": 0.5, "color": 0.5, "size": 0.5}
    extra = scorers.scene_scores(reference + (Shape("triangle", "green", "small", "center"),), reference)
    assert extra["exact"] == 0.0 and extra["cells"] == pytest.approx(2 / 3) and extra["kind"] == 1.0
    assert set(scorers.scene_scores(None, reference).values()) == {0.0}


def test_vqa_is_exact_match_for_one_answer_and_vqav2_for_several():
    assert scorers.vqa_accuracy(" Red.", ["red"]) == 1.0 and scorers.vqa_accuracy("blue", ["red"]) == 0.0
    answers = ["two", "two", "three", "two", "2"]
    assert scorers.vqa_accuracy("two", answers) == 1.0
    assert scorers.vqa_accuracy("three", answers) == pytest.approx(1 / 3)
    assert scorers.vqa_accuracy("four", answers) == 0.0
    with pytest.raises(ValueError):
        scorers.vqa_accuracy("red", [])


def test_box_iou():
    assert scorers.box_iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert scorers.box_iou((0, 0, 1, 1), (0, 0.5, 1, 1.5)) == pytest.approx(1 / 3)
    assert scorers.box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0


def test_an_object_one_cell_off_fails_grounding():
    from cm3jax.data.embedded.shapes import shape_box

    def requested(shape):
        return shape.color, shape.kind, tuple(shape_box(shape, 48) / 48)

    drawn = parse_objects(render((RED_CIRCLE, BLUE_SQUARE), 48)[0])
    assert scorers.grounding_scores(drawn, [requested(RED_CIRCLE), requested(BLUE_SQUARE)]) == \
        {"objects": 1.0, "all": 1.0}
    one_cell_off = Shape("circle", "red", "small", "top")
    assert scorers.grounding_scores(drawn, [requested(one_cell_off), requested(BLUE_SQUARE)]) == \
        {"objects": 0.5, "all": 0.0}
    assert scorers.grounding_scores(drawn, [requested(BLUE_SQUARE)])["all"] == 0.0  # an object not asked for


def test_a_small_triangle_whose_tip_is_softened_is_still_in_its_box_and_a_wrong_size_is_not():
    """At 24x24 a small triangle's tip is one pixel: a reconstruction that softens it shortens the outline by two
    rows, and the box of the outline alone (IoU 0.35 with the requested box) missed every such object."""
    from cm3jax.data.embedded.shapes import BACKGROUND, shape_box

    triangle = Shape("triangle", "green", "small", "center")
    image = render((triangle,), 24)[0].copy()
    box = shape_box(triangle, 24)
    tip_rows = slice(int(box[0]), int(box[0]) + 2)
    image[tip_rows] = (image[tip_rows] + 3 * np.array(BACKGROUND)) // 4
    drawn = parse_objects(image)
    assert [o.shape for o in drawn] == [triangle]
    requested = [(triangle.color, triangle.kind, tuple(box / 24))]
    assert scorers.grounding_scores(drawn, requested) == {"objects": 1.0, "all": 1.0}
    large = Shape("triangle", "green", "large", "center")
    assert scorers.grounding_scores(drawn, [(large.color, large.kind, tuple(shape_box(large, 24) / 24))]) == \
        {"objects": 0.0, "all": 0.0}


def test_cider_d_is_pycocoevalcaps_score_and_ranks_captions():
    from pycocoevalcap.cider.cider import Cider

    references = {"1": ["a red circle on the left", "a small red circle at the left"],
                  "2": ["two blue squares", "a pair of blue squares"],
                  "3": ["a yellow triangle at the top", "one yellow triangle at the top"]}
    right = {"1": "A red circle, on the left.", "2": "two blue squares", "3": "a yellow triangle at the top"}
    wrong = {"1": "a green square at the bottom", "2": "a red circle", "3": "two blue squares"}
    score, per_item = scorers.cider_d(right, references)
    expected, expected_items = Cider().compute_score(
        {k: v for k, v in references.items()},
        {"1": ["a red circle on the left"], "2": ["two blue squares"], "3": ["a yellow triangle at the top"]})
    assert score == pytest.approx(expected) and list(per_item.values()) == pytest.approx(list(expected_items))
    assert scorers.cider_d(wrong, references)[0] < 0.2 * score
    with pytest.raises(ValueError):
        scorers.cider_d({"1": "x"}, references)
