"""Truth metrics of the Shapes world on hand-made cases with known answers."""

import json
import math

import numpy as np
import pytest
from pycocotools.coco import COCO

from training import shapes
from training.shapes import Scene, ShapeObject
from training.shapes_truth import (
    RelationPhrase,
    load_truth,
    mentions,
    pointing_hit,
    relation_phrases,
    score_captions,
)

# Centres: red circle (40, 40), blue square (160, 70): the circle is left of the square.
RED_CIRCLE = ShapeObject("circle", "red", "small", (20, 20, 40, 40))
BLUE_SQUARE = ShapeObject("square", "blue", "large", (120, 30, 80, 80))
GREEN_TRIANGLE = ShapeObject("triangle", "green", "small", (60, 150, 40, 40))
TWO = Scene("gray", (RED_CIRCLE, BLUE_SQUARE))
THREE = Scene("dark", (RED_CIRCLE, BLUE_SQUARE, GREEN_TRIANGLE))


def cap(text: str, attention=None) -> dict:
    return {"tokens": text.split(), "attention": attention}


def peaks(tokens: list[str], size: tuple[int, int], cells: dict[int, tuple[int, int]]) -> np.ndarray:
    """(T, h, w) attention, uniform except a peak at cells[t] = (row, col) for the given tokens."""
    grids = np.full((len(tokens), *size), 1.0)
    for t, (row, col) in cells.items():
        grids[t, row, col] = 5.0
    return grids


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    shapes.generate(out, {"val": 30}, seed=7, workers=1)
    captions = json.loads((out / "annotations" / "captions_val.json").read_text())["annotations"]
    by_image: dict[int, list[str]] = {}
    for a in captions:
        by_image.setdefault(a["image_id"], []).append(a["caption"])
    return out / "annotations" / "instances_val.json", by_image


def test_load_truth_from_a_path_or_a_coco(generated):
    path, _ = generated
    truth = load_truth(path)
    assert truth == load_truth(COCO(str(path)))
    assert sorted(truth) == list(range(1, 31))
    instances = json.loads(path.read_text())
    first = [a for a in instances["annotations"] if a["image_id"] == 1]
    expected = [(a["color"], a["size"], a["bbox"]) for a in first]
    assert [(o.color, o.size, list(o.bbox)) for o in truth[1].objects] == expected
    assert truth[1].background == instances["images"][0]["background"]


def test_generator_captions_are_perfect(generated):
    path, by_image = generated
    truth = load_truth(path)
    relations = 0
    for k in range(5):  # one scoring per caption slot: predictions hold one caption per image
        scores = score_captions(truth, {i: cap(texts[k]) for i, texts in by_image.items()})
        assert (scores.exact_object_set, scores.object_precision, scores.object_recall) == (1.0, 1.0, 1.0)
        assert scores.relation_count == 0 or scores.relation_accuracy == 1.0
        assert scores.images == 30 and scores.pointing_count == 0 and math.isnan(scores.pointing_accuracy)
        relations += scores.relation_count
    assert relations > 0


def test_oracle_attention_wins_the_pointing_game(generated):
    path, by_image = generated
    truth = load_truth(path)
    predictions = {}
    for image_id, texts in by_image.items():
        tokens = texts[0].split()
        objects = {(o.color, o.shape): o for o in truth[image_id].objects}
        cells = {}
        for m in mentions(tokens):
            x, y, w, h = objects[m.pair].bbox
            cells[m.index] = (int((y + h / 2) // 32), int((x + w / 2) // 32))
        predictions[image_id] = cap(texts[0], peaks(tokens, (7, 7), cells).tolist())
    scores = score_captions(truth, predictions)
    assert scores.pointing_accuracy == 1.0 and scores.pointing_count > 0


def test_parsing_mentions_and_relation_phrases():
    tokens = [
        "a",
        "big",
        "red",
        "circle",
        "to",
        "the",
        "left",
        "of",
        "a",
        "little",
        "blue",
        "square",
        "and",
        "a",
        "green",
        "triangle",
    ]
    assert [(m.index, m.pair) for m in mentions(tokens)] == [
        (3, ("red", "circle")),
        (11, ("blue", "square")),
        (15, ("green", "triangle")),
    ]
    assert relation_phrases(tokens) == [RelationPhrase(("red", "circle"), "to the left of", ("blue", "square"))]
    # the article is part of the pattern
    assert relation_phrases(["a", "red", "circle", "above", "blue", "square"]) == []
    assert relation_phrases(["a", "red", "circle", "below", "a", "big"]) == []


def test_wrong_color_false_relation_and_missing_object():
    truth = {1: TWO, 2: TWO, 3: TWO, 4: TWO, 5: THREE}
    predictions = {
        1: cap("a red circle to the left of a big blue square"),  # all true
        2: cap("a green circle to the left of a blue square"),  # wrong color: relation not considered
        3: cap("a red circle to the right of a blue square"),  # false relation, right objects
        4: cap("a red circle"),  # missing object
        5: cap("there are three shapes on a dark background"),  # a right count, no names
    }
    scores = score_captions(truth, predictions)
    assert scores.exact_object_set == pytest.approx(3 / 5)
    # true positives 2 + 1 + 2 + 1 + 3, predicted 2 + 2 + 2 + 1 + 3, relevant 2 + 2 + 2 + 2 + 3
    assert scores.object_precision == pytest.approx(9 / 10)
    assert scores.object_recall == pytest.approx(9 / 11)
    assert (scores.relation_accuracy, scores.relation_count) == (0.5, 2)


def test_counts_extra_objects_and_repeats():
    truth = {1: TWO, 2: TWO, 3: THREE}
    predictions = {
        1: cap("there are three shapes on a gray background"),  # wrong count: 3 false predictions
        2: cap("a red circle and a blue square and a green triangle"),  # an object too many
        3: cap("three shapes a red circle a blue square and a red circle"),  # a repeat, one missed
    }
    scores = score_captions(truth, predictions)
    assert scores.exact_object_set == 0.0
    # true positives 0 + 2 + 2, predicted 3 + 3 + 2 (unique pairs), relevant 2 + 2 + 3
    assert scores.object_precision == pytest.approx(4 / 8)
    assert scores.object_recall == pytest.approx(4 / 7)
    assert math.isnan(scores.relation_accuracy) and scores.relation_count == 0


def test_a_stated_count_must_be_right_for_an_exact_set():
    scores = score_captions({1: TWO}, {1: cap("three shapes a red circle a blue square")})
    assert scores.exact_object_set == 0.0 and scores.object_recall == 1.0


def test_relating_an_object_to_itself_is_false():
    scores = score_captions({1: TWO}, {1: cap("a red circle above a red circle")})
    assert (scores.relation_accuracy, scores.relation_count) == (0.0, 1)


@pytest.mark.parametrize(
    ("size", "cell", "hit"),
    [
        # 7x7: cells of 32 px. The circle spans x, y in [20, 60], grown by 16: [4, 76].
        ((7, 7), (1, 1), True),  # centre (48, 48)
        ((7, 7), (0, 0), True),  # centre (16, 16): outside the box, inside the grown box
        ((7, 7), (2, 1), False),  # centre y 80 > 76
        ((7, 7), (1, 6), False),
        # 14x14: cells of 16 px, box grown by 8: [12, 68].
        ((14, 14), (2, 2), True),  # centre (40, 40)
        ((14, 14), (3, 3), True),  # centre (56, 56)
        ((14, 14), (0, 1), False),  # centre y 8 < 12
        ((14, 14), (4, 4), False),  # centre (72, 72) > 68
        # 2x4: cells 112 high and 56 wide; grown box x in [-8, 88], y in [-36, 116].
        ((2, 4), (0, 1), True),  # centre (84, 56)
        ((2, 4), (0, 2), False),  # centre x 140
        ((2, 4), (1, 0), False),  # centre y 168
    ],
)
def test_pointing_hit(size, cell, hit):
    grid = np.zeros(size)
    grid[cell] = 1.0
    assert pointing_hit(grid, RED_CIRCLE.bbox) is hit


@pytest.mark.parametrize(
    ("size", "circle_cell", "square_cell"),
    [((7, 7), (1, 1), (5, 5)), ((14, 14), (2, 2), (12, 12))],
)
def test_pointing_game_over_captions(size, circle_cell, square_cell):
    """The circle's peak hits, the square's peak lands below its box; unknown objects are skipped."""
    text = "a red circle to the left of a blue square and a green diamond"
    tokens = text.split()
    grids = peaks(tokens, size, {2: circle_cell, 9: square_cell, 13: (0, 0)})
    scores = score_captions({1: TWO}, {1: cap(text, grids.tolist())})
    assert (scores.pointing_accuracy, scores.pointing_count) == (0.5, 2)


def test_pointing_game_attention_checks():
    tokens = ["a", "red", "circle"]
    extra = peaks(tokens + ["<end>"], (7, 7), {2: (1, 1)})  # a grid for the end token is ignored
    assert score_captions({1: TWO}, {1: cap("a red circle", extra)}).pointing_accuracy == 1.0
    with pytest.raises(ValueError):
        score_captions({1: TWO}, {1: cap("a red circle", extra[:2])})
    no_attention = score_captions({1: TWO}, {1: cap("a red circle")})
    assert no_attention.pointing_count == 0 and math.isnan(no_attention.pointing_accuracy)
    empty = score_captions({1: TWO}, {1: {"tokens": [], "attention": []}})  # a caption that is only <end>
    assert empty.pointing_count == 0 and empty.exact_object_set == 0.0


def test_unknown_image_id_is_an_error():
    with pytest.raises(KeyError):
        score_captions({1: TWO}, {2: cap("a red circle")})
