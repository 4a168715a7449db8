"""Score generated captions against the drawn truth of the Shapes world.

The COCO caption metrics only compare words with the reference captions; these
check what a caption claims against what is in the picture (shared/SHAPES.md,
"Scoring"). Only named (colour, shape) pairs count as claims about objects:

- exact object set: the caption names exactly the image's (color, shape) objects;
  a caption that only counts them (`there are three shapes ...`) is never exact;
- informative rate: the caption names at least one object;
- object precision / recall over (color, shape) mentions;
- relation accuracy of `COLOR SHAPE REL a [SIZE] COLOR SHAPE` phrases;
- pointing game: the attention that emitted a shape word peaks on that object.

`count_or_exact` keeps the lenient rule, under which a right count with no names
passed as exact: a generic caption scores well on it, so it is never a headline.

A caption is a dict `{"tokens": [str, ...], "attention": (T, h, w) grids or None}`;
`attention[t]` is the grid over the whole image (rows top to bottom) used to emit
`tokens[t]`. Grids past the last token (say, for the end token) are ignored.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from pycocotools.coco import COCO

from training.shapes import COLORS, IMAGE_SIZE, RELATIONS, SHAPES, SIZE_WORDS, Scene, ShapeObject, relation

Pair = tuple[str, str]  # (color, shape): names one object, as no two objects share both
COUNT_WORDS = {"two": 2, "three": 3}
SIZE_TOKENS = frozenset(w for words in SIZE_WORDS.values() for w in words)


class Caption(TypedDict):
    tokens: list[str]
    attention: Any  # (T, h, w) nested lists or array, T >= len(tokens); or None


@dataclass(frozen=True)
class Mention:
    """A color word immediately followed by a shape word; `index` is the shape word's."""

    index: int
    pair: Pair


@dataclass(frozen=True)
class RelationPhrase:
    subject: Pair
    relation: str
    object: Pair


@dataclass(frozen=True)
class TruthScores:
    """Fractions in [0, 1], NaN when nothing was there to score, and their counts."""

    images: int
    exact_object_set: float
    informative_rate: float  # names at least one object
    count_or_exact: float  # exact, or names nothing but states the right count: lenient, not a headline
    object_precision: float
    object_recall: float
    relation_accuracy: float
    relation_count: int  # phrases whose two objects are both in their image
    pointing_accuracy: float
    pointing_count: int  # shape words scored by the pointing game


def load_truth(instances: COCO | str | Path) -> dict[int, Scene]:
    """image id -> Scene, from a Shapes `instances_S.json` (path or loaded COCO)."""
    coco = instances if isinstance(instances, COCO) else COCO(str(instances))
    truth = {}
    for image_id, image in coco.imgs.items():
        objects = tuple(
            ShapeObject(coco.cats[a["category_id"]]["name"], a["color"], a["size"], tuple(a["bbox"]))
            for a in coco.imgToAnns[image_id]
        )
        truth[image_id] = Scene(image["background"], objects)
    return truth


def mentions(tokens: list[str]) -> list[Mention]:
    """Every COLOR SHAPE bigram, in caption order (repeats kept)."""
    return [
        Mention(i + 1, (tokens[i], tokens[i + 1]))
        for i in range(len(tokens) - 1)
        if tokens[i] in COLORS and tokens[i + 1] in SHAPES
    ]


def stated_count(tokens: list[str]) -> int | None:
    """The n of a `two shapes` / `three shapes` in the caption, if any."""
    for word, following in itertools.pairwise(tokens):
        if word in COUNT_WORDS and following == "shapes":
            return COUNT_WORDS[word]
    return None


def relation_phrases(tokens: list[str]) -> list[RelationPhrase]:
    """Every `COLOR SHAPE REL a [SIZE] COLOR SHAPE` in the caption."""
    phrases = []
    for m in mentions(tokens):
        for rel in RELATIONS:
            words = rel.split()
            start = m.index + 1
            if tokens[start : start + len(words)] != words:
                continue
            rest = tokens[start + len(words) :]
            if rest[:1] != ["a"]:
                continue
            rest = rest[2:] if rest[1:2] and rest[1] in SIZE_TOKENS else rest[1:]
            if len(rest) >= 2 and rest[0] in COLORS and rest[1] in SHAPES:
                phrases.append(RelationPhrase(m.pair, rel, (rest[0], rest[1])))
    return phrases


def _pairs(scene: Scene) -> dict[Pair, ShapeObject]:
    return {(o.color, o.shape): o for o in scene.objects}


def is_exact(tokens: list[str], scene: Scene) -> bool:
    """The caption names exactly the image's (color, shape) objects, and a count it states is right.

    Naming is required: `there are three shapes ...` names nothing and is never exact.
    """
    named = {m.pair for m in mentions(tokens)}
    count = stated_count(tokens)
    return bool(named) and named == set(_pairs(scene)) and count in (None, len(scene.objects))


def is_count_or_exact(tokens: list[str], scene: Scene) -> bool:
    """The lenient rule: exact, or naming nothing while stating the image's number of objects."""
    if mentions(tokens):
        return is_exact(tokens, scene)
    return stated_count(tokens) == len(scene.objects)


def object_matches(tokens: list[str], scene: Scene) -> tuple[int, int, int]:
    """(true positives, predicted, relevant) for one caption: predicted are the caption's unique
    named (color, shape) pairs, relevant the image's objects. A count names nothing."""
    truth = set(_pairs(scene))
    named = {m.pair for m in mentions(tokens)}
    return len(named & truth), len(named), len(truth)


def relation_hits(tokens: list[str], scene: Scene) -> tuple[int, int]:
    """(true, considered) relation phrases whose two objects are in the image.

    A phrase relating an object to itself is considered and false.
    """
    objects = _pairs(scene)
    true = considered = 0
    for p in relation_phrases(tokens):
        if p.subject in objects and p.object in objects:
            considered += 1
            a, b = objects[p.subject], objects[p.object]
            true += a is not b and relation(a.bbox, b.bbox) == p.relation
    return true, considered


def pointing_hit(grid: np.ndarray, bbox: tuple[float, ...]) -> bool:
    """Whether the (h, w) grid's maximum cell has its centre in the box grown by half a cell.

    Ties go to the first maximum in row-major order.
    """
    h, w = grid.shape
    cell_h, cell_w = IMAGE_SIZE / h, IMAGE_SIZE / w
    row, col = (int(i) for i in np.unravel_index(int(np.argmax(grid)), (h, w)))
    cy, cx = (row + 0.5) * cell_h, (col + 0.5) * cell_w
    x, y, bw, bh = bbox
    return x - cell_w / 2 <= cx <= x + bw + cell_w / 2 and y - cell_h / 2 <= cy <= y + bh + cell_h / 2


def pointing_hits(caption: Caption, scene: Scene) -> tuple[int, int]:
    """(hits, scored) over every named pair's shape word; a pair that is not in the image is a miss."""
    tokens = caption["tokens"]
    if caption["attention"] is None or not tokens:  # an empty caption's attention is [] of no shape
        return 0, 0
    attention = np.asarray(caption["attention"], dtype=np.float64)  # (T, h, w)
    if attention.ndim != 3 or attention.shape[0] < len(tokens):
        raise ValueError(f"attention of shape {attention.shape} for {len(tokens)} tokens: need (T >= tokens, h, w)")
    objects = _pairs(scene)
    named = mentions(tokens)
    hits = sum(m.pair in objects and pointing_hit(attention[m.index], objects[m.pair].bbox) for m in named)
    return hits, len(named)


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


def score_captions(truth: Mapping[int, Scene], predictions: Mapping[int, Caption]) -> TruthScores:
    """The truth metrics over the predicted images, pooled over the split.

    - exact_object_set: the fraction of images whose caption `is_exact`;
    - informative_rate: the fraction whose caption names at least one object;
    - count_or_exact: the fraction `is_count_or_exact` (the lenient rule);
    - object_precision / object_recall: micro-averaged, the summed true positives
      over the summed predicted (unique pairs per caption) or relevant (the
      image's objects) counts of `object_matches`;
    - relation_accuracy: true over considered phrases of `relation_hits`;
    - pointing_accuracy: hits over scored shape words of `pointing_hits`.

    Every predicted image id must be in `truth` (KeyError otherwise); truth images
    without a prediction are not scored.
    """
    exact = informative = lenient = tp = predicted = relevant = rel_true = rel_count = hits = pointed = 0
    for image_id, cap in predictions.items():
        scene = truth[image_id]
        tokens = list(cap["tokens"])
        exact += is_exact(tokens, scene)
        informative += bool(mentions(tokens))
        lenient += is_count_or_exact(tokens, scene)
        t, p, r = object_matches(tokens, scene)
        tp, predicted, relevant = tp + t, predicted + p, relevant + r
        t, n = relation_hits(tokens, scene)
        rel_true, rel_count = rel_true + t, rel_count + n
        t, n = pointing_hits(cap, scene)
        hits, pointed = hits + t, pointed + n
    return TruthScores(
        images=len(predictions),
        exact_object_set=_ratio(exact, len(predictions)),
        informative_rate=_ratio(informative, len(predictions)),
        count_or_exact=_ratio(lenient, len(predictions)),
        object_precision=_ratio(tp, predicted),
        object_recall=_ratio(tp, relevant),
        relation_accuracy=_ratio(rel_true, rel_count),
        relation_count=rel_count,
        pointing_accuracy=_ratio(hits, pointed),
        pointing_count=pointed,
    )


def score_by_objects(truth: Mapping[int, Scene], predictions: Mapping[int, Caption]) -> dict[int, TruthScores]:
    """`score_captions` of the images with 1, 2, ... objects apart: number of objects -> scores."""
    groups: dict[int, dict[int, Caption]] = {}
    for image_id, cap in predictions.items():
        groups.setdefault(len(truth[image_id].objects), {})[image_id] = cap
    return {n: score_captions(truth, groups[n]) for n in sorted(groups)}


@dataclass(frozen=True)
class HeldOutScores:
    """How a model trained without some (color, shape) pairs names them in pictures that hold them."""

    images_with: int  # test images holding at least one held-out pair
    held_out_recall: float  # of those pairs in those images, the fraction the caption names
    exact_with: float  # exact object set on those images
    exact_without: float  # and on the others


def score_held_out(
    truth: Mapping[int, Scene], predictions: Mapping[int, Caption], held_out: frozenset[Pair]
) -> HeldOutScores:
    """Recall of the held-out pairs in the captions of the images that hold them, and the exact
    object set with and without them. A pair counts as named only with both its colour and shape."""
    named = present = 0
    exact: dict[bool, list[bool]] = {True: [], False: []}
    for image_id, cap in predictions.items():
        scene = truth[image_id]
        tokens = list(cap["tokens"])
        in_image = set(_pairs(scene)) & held_out
        said = {m.pair for m in mentions(tokens)}
        present, named = present + len(in_image), named + len(in_image & said)
        exact[bool(in_image)].append(is_exact(tokens, scene))
    return HeldOutScores(
        images_with=len(exact[True]),
        held_out_recall=_ratio(named, present),
        exact_with=_ratio(sum(exact[True]), len(exact[True])),
        exact_without=_ratio(sum(exact[False]), len(exact[False])),
    )
