"""`captioner shapes --hold-out`: (colour, shape) pairs that no training or validation image shows.

The proof of absence reads the written annotations back, as evaluation will: every
object of every train and val image, and every pair its captions name.
"""

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cli
from training import shapes

# One pair per shape, each colour at most once: the held-out recipe of docs/model.md.
HOLD_OUT = frozenset({("red", "triangle"), ("blue", "circle"), ("green", "square"), ("yellow", "diamond")})
HOLD_OUT_TEXT = "red triangle, blue circle,green square,yellow diamond"
SPLITS = {"train": 40, "val": 12, "test": 40}
SEED = 3
NAMED_PAIR = re.compile(r"\b(red|green|blue|yellow|purple) (circle|square|triangle|diamond)\b")

# world_digest of generate(ROOT, {"train": 8, "val": 4, "test": 4}, seed=3) as the generator
# wrote it before --hold-out existed (commit 3da4497): the option must not move a plain world.
PLAIN_WORLD_DIGEST = "38cb768b479a4ce65b6233b42532d22b05586f7d340e864c4eeece5754ad1750"


def world_digest(root: Path) -> str:
    """One hash of a world: each file's path and its pixels (PNG) or bytes (JSON).

    Pixels rather than PNG bytes, so a zlib other than the one that made the digest
    cannot fail the test while the drawing is unchanged.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        if path.suffix == ".png":
            with Image.open(path) as image:
                digest.update(np.asarray(image).tobytes())
        else:
            digest.update(path.read_bytes())
    return digest.hexdigest()


def image_pairs(instances: Path) -> dict[int, set[tuple[str, str]]]:
    """image id -> the (colour, shape) pairs of its objects, from instances_S.json."""
    data = json.loads(instances.read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    pairs: dict[int, set[tuple[str, str]]] = {image["id"]: set() for image in data["images"]}
    for a in data["annotations"]:
        pairs[a["image_id"]].add((a["color"], names[a["category_id"]]))
    return pairs


def caption_pairs(captions: Path) -> set[tuple[str, str]]:
    """Every (colour, shape) pair any caption of the split names."""
    data = json.loads(captions.read_text())
    return {pair for a in data["annotations"] for pair in NAMED_PAIR.findall(a["caption"])}


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plain")
    shapes.generate(root, SPLITS, seed=SEED, workers=1)
    return root


@pytest.fixture(scope="module")
def held(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("held")
    shapes.generate(root, SPLITS, seed=SEED, workers=1, hold_out=HOLD_OUT)
    return root


# --- the held-out world ----------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val"])
def test_held_out_pairs_are_absent_from_training_and_validation(held, split):
    annotations = held / "annotations"
    recorded = shapes.held_out_pairs(annotations / f"instances_{split}.json")
    assert recorded == HOLD_OUT
    shown = set().union(*image_pairs(annotations / f"instances_{split}.json").values())
    assert shown and shown.isdisjoint(recorded)
    assert caption_pairs(annotations / f"captions_{split}.json").isdisjoint(recorded)
    assert len(list((held / "images" / split).glob("*.png"))) == SPLITS[split]


def test_the_test_split_is_drawn_as_usual_and_records_the_pairs(held, plain):
    instances = held / "annotations" / "instances_test.json"
    assert shapes.held_out_pairs(instances) == HOLD_OUT
    shown = set().union(*image_pairs(instances).values())
    assert shown & HOLD_OUT, "40 test images should show some held-out pair"
    for name in sorted(p.name for p in (plain / "images" / "test").iterdir()):
        assert (held / "images" / "test" / name).read_bytes() == (plain / "images" / "test" / name).read_bytes()
    assert image_pairs(instances) == image_pairs(plain / "annotations" / "instances_test.json")


def test_only_images_that_drew_a_held_out_pair_change(held, plain):
    """The first draw of every image is the plain world's: only the ones holding a held-out pair are redrawn."""
    before = image_pairs(plain / "annotations" / "instances_train.json")
    after = image_pairs(held / "annotations" / "instances_train.json")
    redrawn = {i for i, pairs in before.items() if pairs & HOLD_OUT}
    assert 0 < len(redrawn) < len(before)
    for image_id, pairs in before.items():
        name = shapes.file_name("train", image_id)
        same = (held / "images" / "train" / name).read_bytes() == (plain / "images" / "train" / name).read_bytes()
        assert same == (image_id not in redrawn)
        assert (after[image_id] == pairs) == (image_id not in redrawn)
        assert len(after[image_id]) == len(pairs)  # only the pairs are redrawn: counts are kept


def test_a_held_out_world_keeps_the_object_counts_and_uniform_seen_pairs():
    scenes = [shapes.sample_scene(shapes.image_rng(11, "sample", i), HOLD_OUT)[0] for i in range(2000)]
    counts = Counter(len(s.objects) for s in scenes)
    assert [counts[k] / len(scenes) for k in (1, 2, 3)] == pytest.approx([0.3, 0.4, 0.3], abs=0.03)
    drawn = Counter((o.color, o.shape) for s in scenes for o in s.objects)
    assert set(drawn).isdisjoint(HOLD_OUT) and len(drawn) == 20 - len(HOLD_OUT)
    expected = sum(drawn.values()) / len(drawn)
    assert all(abs(n - expected) < 0.2 * expected for n in drawn.values())


def test_same_seed_and_hold_out_give_byte_identical_files(held, tmp_path):
    shapes.generate(tmp_path, SPLITS, seed=SEED, workers=2, hold_out=set(HOLD_OUT))
    assert world_digest(tmp_path) == world_digest(held)
    manifest = json.loads((tmp_path / "shapes.json").read_text())
    assert manifest["held_out"] == [["red", "triangle"], ["green", "square"], ["blue", "circle"], ["yellow", "diamond"]]


# --- the default is unchanged ------------------------------------------------------


def test_without_a_hold_out_the_files_are_those_of_the_generator_before_the_option(tmp_path):
    shapes.generate(tmp_path / "a", {"train": 8, "val": 4, "test": 4}, seed=SEED, workers=1)
    shapes.generate(tmp_path / "b", {"train": 8, "val": 4, "test": 4}, seed=SEED, workers=1, hold_out=frozenset())
    assert world_digest(tmp_path / "a") == world_digest(tmp_path / "b") == PLAIN_WORLD_DIGEST
    assert shapes.held_out_pairs(tmp_path / "a" / "annotations" / "instances_train.json") == frozenset()
    info = json.loads((tmp_path / "a" / "annotations" / "instances_test.json").read_text())["info"]
    assert "held_out" not in info


def test_a_changed_hold_out_redraws_the_world(tmp_path):
    shapes.generate(tmp_path, {"train": 6, "test": 2}, seed=1, workers=1)
    plain = world_digest(tmp_path)
    shapes.generate(tmp_path, {"train": 6, "test": 2}, seed=1, workers=1, hold_out=HOLD_OUT)
    assert shapes.held_out_pairs(tmp_path / "annotations" / "instances_test.json") == HOLD_OUT
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")}
    shapes.generate(tmp_path, {"train": 6, "test": 2}, seed=1, workers=1, hold_out=HOLD_OUT)  # kept
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")} == stamps
    shapes.generate(tmp_path, {"train": 6, "test": 2}, seed=1, workers=1)  # back to plain: redrawn
    assert world_digest(tmp_path) == plain


# --- the option ------------------------------------------------------------------


def test_the_command_line_writes_a_held_out_world(tmp_path):
    argv = ["shapes", str(tmp_path), "--train", "12", "--val", "4", "--test", "0", "--workers", "1"]
    assert cli.main([*argv, "--hold-out", HOLD_OUT_TEXT]) == 0
    for split in ("train", "val"):
        instances = tmp_path / "annotations" / f"instances_{split}.json"
        assert shapes.held_out_pairs(instances) == HOLD_OUT
        assert set().union(*image_pairs(instances).values()).isdisjoint(HOLD_OUT)


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("red triangle,pink circle", "unknown colour 'pink'"),
        ("red hexagon", "unknown shape 'hexagon'"),
        ("blue circle,red", "got 'red'"),
        ("red big triangle", "got 'red big triangle'"),
        (",".join(f"{c} {s}" for c, s in shapes.PAIRS[:18]), "leave fewer than 3"),
    ],
)
def test_bad_pairs_are_a_usage_error_naming_them(tmp_path, capsys, value, named):
    with pytest.raises(SystemExit) as stop:
        cli.main(["shapes", str(tmp_path / "out"), "--hold-out", value])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "argument --hold-out" in err and named in err, err
    assert not (tmp_path / "out").exists()


def test_parse_hold_out():
    assert shapes.parse_hold_out(HOLD_OUT_TEXT) == HOLD_OUT
    assert shapes.parse_hold_out("Red  Triangle,,") == {("red", "triangle")}
    assert shapes.parse_hold_out("") == frozenset()
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        shapes.parse_hold_out("pink circle")


def test_generate_refuses_unknown_pairs(tmp_path):
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        shapes.generate(tmp_path, {"train": 1}, seed=0, workers=1, hold_out=frozenset({("red", "hexagon")}))
    with pytest.raises(ValueError, match="a \\(color, shape\\) tuple"):
        shapes.generate(tmp_path, {"train": 1}, seed=0, workers=1, hold_out=frozenset({"red triangle"}))
