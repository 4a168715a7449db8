"""The COCO caption metrics on hand-made cases with known scores, and `captioner evaluate` end to end.

METEOR is a Java process that loads for several seconds, so the tests that run
Java are marked slow and share one `CocoScorer` (`coco_scores` is one scoring by
a fresh one); only the CLI test starts its own.
"""

import json
import math
import subprocess
import sys

import pytest
import torch
from pycocotools.coco import COCO

from captioner.decoding import DecodeOptions
from captioner.predictor import Predictor
from cli import main as cli_main
from training import shapes
from training.caption_metrics import CocoScorer, cider, spice_available
from training.coco import load_split
from training.evaluate import caption_and_score, format_scores, score_predictions, truth_scores
from training.shapes_truth import load_truth

COCO_NAMES = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
TRUTH_NAMES = [
    "exact_object_set",
    "informative_rate",
    "count_or_exact",
    "object_precision",
    "object_recall",
    "relation_accuracy",
    "relation_count",
    "pointing_accuracy",
    "pointing_count",
]
BY_OBJECTS = ("_1_object", "_2_objects", "_3_objects")


def assert_shapes_score_names(scores: dict) -> None:
    """The COCO metrics, the truth metrics overall, then each again per number of objects."""
    head = COCO_NAMES + TRUTH_NAMES
    assert list(scores)[: len(head)] == head
    rest = list(scores)[len(head) :]
    assert rest and all(any(n == t + s for t in TRUTH_NAMES for s in BY_OBJECTS) for n in rest), rest


# Raw references: case and punctuation that both tokenizers drop.
REFERENCES = {
    1: ["A red circle above a blue square.", "a red circle and a blue square"],
    2: ["A big green triangle, on a dark background!", "there is a green triangle"],
}
EXACT = {1: "a red circle above a blue square", 2: "a big green triangle on a dark background"}
WRONG = {1: "zebra giraffe elephant umbrella", 2: "one two six"}


@pytest.fixture(scope="module")
def scorer():
    with CocoScorer() as shared:
        yield shared


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    shapes.generate(root, {"val": 5}, seed=2, workers=1)
    return root


@pytest.mark.slow
def test_a_caption_equal_to_a_reference_scores_one(scorer):
    scores = scorer.score(REFERENCES, EXACT)
    assert list(scores) == COCO_NAMES
    for name in ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L"]:
        assert scores[name] == pytest.approx(1.0, abs=1e-6), name
    # Both tokenizers split these captions alike, so the Java-free CIDEr is the official one.
    assert scores["CIDEr"] == pytest.approx(cider(REFERENCES, EXACT), abs=1e-9)
    assert scores["CIDEr"] > 1.0


HAND_REFERENCES = {1: ["a red circle"], 2: ["a blue square"]}
HAND_PREDICTIONS = {1: "a red square", 2: "a blue square"}


def test_cider_of_a_tiny_case_computed_by_hand():
    """Two images, one reference each; document frequencies come from the references.

    "a" is in both references: idf 0. Every other n-gram has idf log(2/1), and an
    n-gram no reference has counts df 1 as well. Image 2 matches exactly: cosine 1
    for 1-, 2- and 3-grams, no 4-grams: 10 * 3/4 = 7.5. Image 1 ("a red square" vs
    "a red circle") shares one of two weighted unigrams and one of two bigrams:
    10 * (1/2 + 1/2 + 0 + 0) / 4 = 2.5. CIDEr is the mean: 5.0.
    """
    assert cider(HAND_REFERENCES, HAND_PREDICTIONS) == pytest.approx(5.0)


@pytest.mark.slow
def test_the_official_cider_of_the_hand_case(scorer):
    assert scorer.score(HAND_REFERENCES, HAND_PREDICTIONS)["CIDEr"] == pytest.approx(5.0)


def test_the_fast_cider_tokenizes_like_the_vocabulary():
    assert cider(
        {1: ["A RED, circle."], 2: ["a blue square"]}, {1: "a red circle", 2: "a blue square"}
    ) == pytest.approx(cider({1: ["a red circle"], 2: ["a blue square"]}, {1: "a red circle", 2: "a blue square"}))


def test_scoring_needs_references_for_every_prediction():
    with pytest.raises(ValueError, match="no predictions"):
        cider(REFERENCES, {})
    with CocoScorer() as unstarted, pytest.raises(ValueError, match=r"\[3\]"):  # checked before Java starts
        unstarted.score(REFERENCES, {**EXACT, 3: "a red circle"})


@pytest.mark.slow
def test_wrong_captions_score_near_zero(scorer):
    scores = scorer.score(REFERENCES, WRONG)
    assert list(scores) == COCO_NAMES
    assert all(0.0 <= value < 1e-6 for value in scores.values()), scores


def test_spice_is_skipped_with_a_warning_rather_than_downloaded():
    if spice_available():
        pytest.skip("SPICE's models are installed here: it would run rather than be skipped")
    with pytest.warns(UserWarning, match="SPICE skipped"), CocoScorer(spice=True) as without_spice:
        assert without_spice.spice is False


@pytest.mark.slow
def test_evaluate_a_shapes_split_end_to_end(tiny_checkpoint, shapes_root, scorer, tmp_path):
    split = load_split(shapes_root, "val")
    predictor = Predictor.from_checkpoint(tiny_checkpoint)
    options = DecodeOptions(method="greedy", max_length=6)
    results, scores = caption_and_score(predictor, split, options, batch_size=2, out_dir=tmp_path, scorer=scorer)

    # one result per image, in id order, each the caption of that very image (batches of 2, 2, 1)
    assert [r["image_id"] for r in results] == split.image_ids
    alone = predictor.caption(split.image_paths, options)
    assert [r["caption"] for r in results] == [a["captions"][0]["text"] for a in alone]

    written = tmp_path / "results_val.json"
    assert json.loads(written.read_text()) == results
    coco = COCO(str(shapes_root / "annotations" / "captions_val.json"))
    assert sorted(coco.loadRes(str(written)).getImgIds()) == split.image_ids

    assert_shapes_score_names(scores)
    assert all(scores[name] >= 0.0 for name in COCO_NAMES)
    assert isinstance(scores["pointing_count"], int) and isinstance(scores["relation_count"], int)
    saved = json.loads((tmp_path / "scores_val.json").read_text(), parse_constant=pytest.fail)  # no NaN in JSON
    assert list(saved) == list(scores)
    assert all(saved[n] == scores[n] or (saved[n] is None and math.isnan(scores[n])) for n in scores)


@pytest.mark.slow
def test_score_predictions_takes_decoded_tokens_and_adds_the_truth(shapes_root, scorer):
    """The training loop's path: captions it decoded itself, here the first reference of each image."""
    split = load_split(shapes_root, "val")
    captions = {i: {"tokens": refs[0].split(), "attention": None} for i, refs in split.references().items()}
    scores = score_predictions(split, captions, scorer)
    assert scores["BLEU-4"] > 0.9 and scores["ROUGE-L"] > 0.9  # each caption is one of its references
    assert scores["object_precision"] == 1.0  # the Shapes references name only objects that are there
    assert scores["pointing_count"] == 0 and math.isnan(scores["pointing_accuracy"])  # no attention given


def test_format_scores_aligns_names_and_keeps_counts_whole():
    table = format_scores({"CIDEr": 0.51234, "relation_count": 3, "pointing_accuracy": math.nan})
    assert table.splitlines() == ["CIDEr              0.5123", "relation_count     3", "pointing_accuracy  nan"]


@pytest.mark.slow
def test_evaluate_command_writes_results_and_scores(tiny_checkpoint, shapes_root, tmp_path, capsys):
    out = tmp_path / "eval"
    code = cli_main(
        [
            "evaluate",
            str(tiny_checkpoint),
            "--data",
            str(shapes_root),
            "--split",
            "val",
            "--limit",
            "3",
            "--method",
            "beam",
            "--beam-size",
            "2",
            "--max-length",
            "5",
            "--batch-size",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    results = json.loads((out / "results_val.json").read_text())
    assert [r["image_id"] for r in results] == [1, 2, 3]
    scores = json.loads((out / "scores_val.json").read_text())
    assert_shapes_score_names(scores)
    printed = capsys.readouterr().out
    assert "3 images" in printed and all(name in printed for name in COCO_NAMES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_evaluate_on_a_device_this_machine_lacks_exits_2(tiny_checkpoint, shapes_root, tmp_path, capsys):
    code = cli_main(
        ["evaluate", str(tiny_checkpoint), "--data", str(shapes_root), "--device", "cuda:1", "--out", str(tmp_path)]
    )
    assert code == 2
    assert "device cuda:1: no CUDA GPU is available here" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "flag,value", [("--batch-size", "0"), ("--workers", "0"), ("--limit", "0"), ("--limit", "2.5")]
)
def test_a_refused_number_is_a_usage_error_naming_its_flag(tiny_checkpoint, shapes_root, tmp_path, capsys, flag, value):
    code = cli_main(["evaluate", str(tiny_checkpoint), "--data", str(shapes_root), "--out", str(tmp_path), flag, value])
    assert code == 2
    assert capsys.readouterr().err.startswith(f"captioner evaluate: error: {flag}: ")
    assert not list(tmp_path.iterdir())


def test_importing_evaluation_loads_no_coco_tools():
    code = (
        "import sys, training.evaluate, training.coco, training.caption_metrics; "
        "print(sorted(m for m in sys.modules if m.startswith(('pycocotools', 'pycocoevalcap', 'training.shapes'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_a_held_out_world_reports_the_recall_of_its_pairs(tmp_path, shapes_root):
    held = frozenset({("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "diamond")})
    shapes.generate(tmp_path, {"test": 30}, seed=3, workers=1, hold_out=held)
    split = load_split(tmp_path, "test")
    scenes = load_truth(split.instances)

    def naming(keep) -> dict[int, dict]:
        """Captions naming each image's objects that `keep` keeps."""
        texts = {i: " and ".join(f"a {o.color} {o.shape}" for o in s.objects if keep(o)) for i, s in scenes.items()}
        return {i: {"tokens": text.split(), "attention": None} for i, text in texts.items()}

    holding = sum(any((o.color, o.shape) in held for o in s.objects) for s in scenes.values())
    everything = truth_scores(split, naming(lambda o: True))
    assert 0 < everything["held_out_images"] == holding < 30
    assert everything["held_out_recall"] == everything["exact_object_set_with_held_out"] == 1.0
    seen_only = truth_scores(split, naming(lambda o: (o.color, o.shape) not in held))
    assert seen_only["held_out_recall"] == seen_only["exact_object_set_with_held_out"] == 0.0
    assert seen_only["exact_object_set_without_held_out"] == 1.0
    assert math.isnan(truth_scores(split, {})["held_out_recall"])  # nothing predicted
    assert "held_out_recall" not in truth_scores(load_split(shapes_root, "val"), {})  # a plain world
