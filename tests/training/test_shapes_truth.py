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
    score_by_objects,
    score_captions,
    score_held_out,
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
        # every caption that names objects names them all; `there are three shapes ...` names none
        assert scores.exact_object_set == scores.informative_rate
        assert scores.count_or_exact == scores.object_precision == 1.0
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
    assert scores.exact_object_set == pytest.approx(2 / 5)  # 1 and 3: a count names nothing
    assert scores.count_or_exact == pytest.approx(3 / 5)  # the lenient rule lets 5 pass
    assert scores.informative_rate == pytest.approx(4 / 5)
    # true positives 2 + 1 + 2 + 1 + 0, predicted 2 + 2 + 2 + 1 + 0, relevant 2 + 2 + 2 + 2 + 3
    assert scores.object_precision == pytest.approx(6 / 7)
    assert scores.object_recall == pytest.approx(6 / 11)
    assert (scores.relation_accuracy, scores.relation_count) == (0.5, 2)


def test_counts_extra_objects_and_repeats():
    truth = {1: TWO, 2: TWO, 3: THREE}
    predictions = {
        1: cap("there are three shapes on a gray background"),  # a wrong count, and no names
        2: cap("a red circle and a blue square and a green triangle"),  # an object too many
        3: cap("three shapes a red circle a blue square and a red circle"),  # a repeat, one missed
    }
    scores = score_captions(truth, predictions)
    assert scores.exact_object_set == 0.0 and scores.count_or_exact == 0.0
    # true positives 0 + 2 + 2, predicted 0 + 3 + 2 (unique pairs), relevant 2 + 2 + 3
    assert scores.object_precision == pytest.approx(4 / 5)
    assert scores.object_recall == pytest.approx(4 / 7)
    assert math.isnan(scores.relation_accuracy) and scores.relation_count == 0


@pytest.mark.parametrize(
    ("text", "exact"),
    [
        ("there are three shapes on a dark background", False),  # the right count, no names
        ("three shapes a red circle a blue square", False),  # one object missing
        ("a red circle a blue square a green triangle and a red square", False),  # one too many
        ("a red circle and a blue circle and a green triangle", False),  # one colour or shape wrong
        ("a red circle a blue square and a green triangle", True),
        ("", False),
    ],
)
def test_exact_object_set_requires_naming_exactly_the_objects(text, exact):
    scores = score_captions({1: THREE}, {1: cap(text)})
    assert scores.exact_object_set == float(exact)
    assert scores.informative_rate == float("circle" in text or "square" in text)


def test_two_objects_named_in_any_template_are_exact():
    for text in ("a red circle to the left of a blue square", "two shapes a big red circle and a little blue square"):
        assert score_captions({1: TWO}, {1: cap(text)}).exact_object_set == 1.0


def test_count_or_exact_is_the_lenient_rule():
    truth = {1: THREE, 2: TWO, 3: TWO}
    predictions = {
        1: cap("there are three shapes on a dark background"),  # passes only the lenient rule
        2: cap("there are three shapes on a gray background"),  # the wrong count fails both
        3: cap("a red circle and a blue square"),  # passes both
    }
    scores = score_captions(truth, predictions)
    assert (scores.exact_object_set, scores.count_or_exact) == (pytest.approx(1 / 3), pytest.approx(2 / 3))


def test_scores_by_number_of_objects():
    truth = {1: TWO, 2: THREE, 3: THREE, 4: Scene("white", (GREEN_TRIANGLE,))}
    predictions = {
        1: cap("a red circle and a blue square"),
        2: cap("there are three shapes on a dark background"),
        3: cap("a red circle a blue square and a green triangle"),
        4: cap("a small green triangle"),
    }
    groups = score_by_objects(truth, predictions)
    assert sorted(groups) == [1, 2, 3]
    assert [groups[n].images for n in (1, 2, 3)] == [1, 1, 2]
    assert groups[3].exact_object_set == 0.5 and groups[3].informative_rate == 0.5
    assert groups[1].exact_object_set == groups[2].exact_object_set == 1.0


def test_held_out_recall_on_a_hand_made_example():
    held_out = frozenset({("green", "triangle"), ("blue", "square")})
    truth = {1: TWO, 2: THREE, 3: Scene("white", (RED_CIRCLE,)), 4: Scene("gray", (GREEN_TRIANGLE,))}
    predictions = {
        1: cap("a red circle to the left of a blue square"),  # its one held-out pair named: exact
        2: cap("a red circle a blue circle and a green triangle"),  # 1 of 2 held-out pairs, not exact
        3: cap("a blue square"),  # no held-out pair in the image: the claim is not recall
        4: cap("a green diamond"),  # shape swapped for a seen pair: missed
    }
    scores = score_held_out(truth, predictions, held_out)
    assert scores.images_with == 3
    assert scores.held_out_recall == pytest.approx(2 / 4)  # pairs present: 1 + 2 + 1; named: 1 + 1 + 0
    assert scores.exact_with == pytest.approx(1 / 3)
    assert scores.exact_without == 0.0


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
    """The circle's peak hits, the square's peak lands below its box; a named object that is not in
    the image is a miss."""
    text = "a red circle to the left of a blue square and a green diamond"
    tokens = text.split()
    grids = peaks(tokens, size, {2: circle_cell, 9: square_cell, 13: (0, 0)})
    scores = score_captions({1: TWO}, {1: cap(text, grids.tolist())})
    assert (scores.pointing_accuracy, scores.pointing_count) == (pytest.approx(1 / 3), 3)


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
