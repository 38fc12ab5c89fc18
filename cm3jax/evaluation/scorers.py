"""Scores of one prediction against its reference, for every evaluation task.

Shapes scenes are compared object by object (a scene is a set: no object twice, at most one per cell), captions are
read back into scenes, VQA answers are matched as VQAv2 does, boxes by IoU, and free captions by CIDEr-D
(pycocoevalcap's implementation).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from cm3jax.data.embedded.shapes import CELLS, COLORS, KINDS, SIZES, Scene, Shape, where_phrase

_CELL_OF_PHRASE = {where_phrase(cell): cell for cell in CELLS}
_OBJECT = re.compile(rf"an? ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(KINDS)}) "
                     rf"({'|'.join(map(re.escape, _CELL_OF_PHRASE))})")
_SEPARATOR = re.compile(r",\s*(?:and\s+)?|\s+and\s+")


def parse_caption(text: str) -> Scene | None:
    """A shapes caption ("a small red circle in the top left and a large blue square at the bottom") -> its scene;
    None when any part of it does not name one object in one cell, or two parts name the same cell or object."""
    text = " ".join(text.lower().split()).rstrip(".")
    if not text:
        return None
    scene = []
    for part in _SEPARATOR.split(text):
        match = _OBJECT.fullmatch(part.strip())
        if match is None:
            return None
        size, color, kind, where = match.groups()
        scene.append(Shape(kind=kind, color=color, size=size, cell=_CELL_OF_PHRASE[where]))
    if len({s.cell for s in scene}) < len(scene) or len({(s.kind, s.color) for s in scene}) < len(scene):
        return None
    return tuple(scene)


def scene_scores(predicted: Scene | None, reference: Scene) -> dict[str, float]:
    """exact: the same objects (as sets); count: as many objects; cells: IoU of the occupied cells; kind / color /
    size: the share of reference objects whose cell holds a predicted object with that attribute right. A scene
    that could not be read (None) scores 0 everywhere."""
    if predicted is None:
        return {"exact": 0.0, "count": 0.0, "cells": 0.0, "kind": 0.0, "color": 0.0, "size": 0.0}
    at_cell = {s.cell: s for s in predicted}
    ref_cells, pred_cells = {s.cell for s in reference}, set(at_cell)
    scores = {"exact": float(set(predicted) == set(reference)),
              "count": float(len(predicted) == len(reference)),
              "cells": len(ref_cells & pred_cells) / len(ref_cells | pred_cells) if ref_cells | pred_cells else 1.0}
    for attribute in ("kind", "color", "size"):
        right = sum(s.cell in at_cell and getattr(at_cell[s.cell], attribute) == getattr(s, attribute)
                    for s in reference)
        scores[attribute] = right / len(reference) if reference else float(not predicted)
    return scores


def normalize_answer(answer: str) -> str:
    """Lower case, one space between words, no punctuation at the ends (VQA answers are short phrases)."""
    return " ".join(answer.lower().split()).strip(" .,!?;:'\"")


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """Exact match with the one reference; with several, VQAv2's min(matches / 3, 1)."""
    if not references:
        raise ValueError("a VQA item needs at least one reference answer")
    matches = sum(normalize_answer(prediction) == normalize_answer(r) for r in references)
    return float(matches > 0) if len(references) == 1 else min(matches / 3.0, 1.0)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (ymin, xmin, ymax, xmax) boxes."""
    height = min(a[2], b[2]) - max(a[0], b[0])
    width = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(height, 0.0) * max(width, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_scores(parsed: Sequence, requested: Sequence[tuple[str, str, Sequence[float]]],
                     min_iou: float = 0.5) -> dict[str, float]:
    """`parsed`: the image's objects (evaluation.shapes_parser.ParsedObject); `requested`: (color, kind, box) of
    each object the prompt placed. objects: the share of requested objects drawn with that colour and kind at
    IoU >= min_iou with their box; all: 1 when every one is and nothing else is drawn."""
    placed = sum(any(o.shape.color == color and o.shape.kind == kind and box_iou(o.box, box) >= min_iou
                     for o in parsed) for color, kind, box in requested)
    share = placed / len(requested) if requested else float(not parsed)
    return {"objects": share, "all": float(share == 1.0 and len(parsed) == len(requested))}


def cider_d(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> tuple[float, dict]:
    """CIDEr-D (x10, as COCO reports it) of one caption per key against all of that key's references, by
    pycocoevalcap; words are lower-cased and split from punctuation first, as its PTB tokenizer does.
    -> (corpus score, {key: score})."""
    from pycocoevalcap.cider.cider import Cider

    if set(predictions) != set(references):
        raise ValueError("CIDEr-D needs references for exactly the predicted keys")
    keys = sorted(predictions)
    if any(not references[k] for k in keys):
        raise ValueError("CIDEr-D needs at least one reference per caption")
    corpus, per_item = Cider().compute_score({k: [_ptb_words(r) for r in references[k]] for k in keys},
                                             {k: [_ptb_words(predictions[k])] for k in keys})
    return float(corpus), {k: float(v) for k, v in zip(keys, per_item)}


def _ptb_words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))
