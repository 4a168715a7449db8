"""The Shapes world generator against its contract (/work/shared/SHAPES.md)."""

import hashlib
import itertools
import json
import math
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

import cli
from training import shapes

REPO = Path(__file__).resolve().parents[2]
SPLITS = {"train": 20, "val": 6}
SEED = 3

# Written out from the contract rather than imported, so the tests check the module.
DOC_VOCABULARY = set(
    [
        "a",
        "there",
        "is",
        "are",
        "picture",
        "of",
        "single",
        "two",
        "three",
        "shapes",
        "and",
        "on",
        "background",
        "to",
        "the",
        "left",
        "right",
        "above",
        "below",
        "small",
        "little",
        "large",
        "big",
        "red",
        "green",
        "blue",
        "yellow",
        "purple",
        "circle",
        "square",
        "triangle",
        "diamond",
        "white",
        "gray",
        "dark",
        "black",
    ]
)
DOC_BACKGROUNDS = {
    "white": (240, 240, 240),
    "gray": (170, 170, 170),
    "dark": (80, 80, 80),
    "black": (20, 20, 20),
}
DOC_COLORS = {
    "red": (220, 50, 50),
    "green": (50, 170, 70),
    "blue": (50, 90, 220),
    "yellow": (235, 205, 40),
    "purple": (150, 70, 190),
}
NP = r"(?:(?:small|little|large|big) )?(?:red|green|blue|yellow|purple) (?:circle|square|triangle|diamond)"
REL = r"(?:to the left of|to the right of|above|below)"
BG = r"(?:white|gray|dark|black)"
DOC_TEMPLATES = {
    1: ["a NP", "there is a NP", "a NP on a BG background", "a picture of a NP", "a single NP"],
    2: [
        "a NP REL a NP",
        "a NP and a NP",
        "there is a NP REL a NP",
        "two shapes a NP and a NP",
        "a NP REL a NP on a BG background",
    ],
    3: [
        "three shapes a NP a NP and a NP",
        "a NP a NP and a NP",
        "a NP REL a NP and a NP",
        "there are three shapes on a BG background",
        "a NP and a NP and a NP",
    ],
}
TEMPLATE_RE = {
    n: [re.compile(t.replace("NP", NP).replace("REL", REL).replace("BG", BG)) for t in ts]
    for n, ts in DOC_TEMPLATES.items()
}
PAIR_RE = re.compile(r"(?:(small|little|large|big) )?(red|green|blue|yellow|purple) (circle|square|triangle|diamond)")


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    shapes.generate(out, SPLITS, seed=SEED, workers=1)
    return out


@pytest.fixture(scope="module")
def images(dataset) -> list[dict]:
    """Every train and val image with its objects (named shapes added) and captions."""
    rows = []
    for split in SPLITS:
        inst = json.loads((dataset / "annotations" / f"instances_{split}.json").read_text())
        caps = json.loads((dataset / "annotations" / f"captions_{split}.json").read_text())
        names = {c["id"]: c["name"] for c in inst["categories"]}
        for img in inst["images"]:
            rows.append(
                {
                    "split": split,
                    **img,
                    "objects": [
                        {**a, "shape": names[a["category_id"]]}
                        for a in inst["annotations"]
                        if a["image_id"] == img["id"]
                    ],
                    "captions": [a["caption"] for a in caps["annotations"] if a["image_id"] == img["id"]],
                }
            )
    return rows


def sampled_scenes(n: int) -> list[shapes.Scene]:
    return [shapes.sample_scene(shapes.image_rng(11, "sample", i))[0] for i in range(n)]


# --- determinism and files -------------------------------------------------------


def test_same_seed_gives_byte_identical_files_with_any_worker_count(dataset, tmp_path):
    shapes.generate(tmp_path, SPLITS, seed=SEED, workers=2)
    assert file_hashes(tmp_path) == file_hashes(dataset)


def test_different_seed_gives_different_data(dataset, tmp_path):
    shapes.generate(tmp_path, {"train": SPLITS["train"]}, seed=SEED + 1, workers=1)
    ours, theirs = file_hashes(tmp_path), file_hashes(dataset)
    assert ours["annotations/captions_train.json"] != theirs["annotations/captions_train.json"]
    pngs = [k for k in ours if k.endswith(".png")]
    assert sum(ours[k] != theirs[k] for k in pngs) == len(pngs)


def test_split_does_not_depend_on_the_other_splits(dataset, tmp_path):
    shapes.generate(tmp_path, {"val": SPLITS["val"]}, seed=SEED, workers=1)
    ours, theirs = file_hashes(tmp_path), file_hashes(dataset)
    assert all(ours[k] == theirs[k] for k in ours if k != "shapes.json")


def test_layout_and_images(dataset):
    manifest = json.loads((dataset / "shapes.json").read_text())
    assert manifest == {"version": 1, "seed": SEED, "splits": {"train": 20, "val": 6}}
    for split, n in SPLITS.items():
        names = sorted(p.name for p in (dataset / "images" / split).iterdir())
        assert names == [f"shapes_{split}_{i:012d}.png" for i in range(1, n + 1)]
        with Image.open(dataset / "images" / split / names[0]) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (224, 224))


def test_pycocotools_loads_both_files(dataset):
    caps = COCO(str(dataset / "annotations" / "captions_train.json"))
    inst = COCO(str(dataset / "annotations" / "instances_train.json"))
    assert sorted(caps.getImgIds()) == list(range(1, 21)) == sorted(inst.getImgIds())
    assert all(len(caps.getAnnIds(imgIds=[i])) == 5 for i in caps.getImgIds())
    first = {"id": 1, "file_name": "shapes_train_000000000001.png", "width": 224, "height": 224}
    assert caps.loadImgs([1])[0] == first
    assert inst.loadCats(inst.getCatIds()) == [
        {"id": i + 1, "name": name, "supercategory": "shape"}
        for i, name in enumerate(["circle", "square", "triangle", "diamond"])
    ]
    assert all(img["background"] in DOC_BACKGROUNDS for img in inst.loadImgs(inst.getImgIds()))
    for ann in inst.loadAnns(inst.getAnnIds()):
        assert set(ann) == {"id", "image_id", "category_id", "bbox", "area", "iscrowd", "color", "size"}
        assert ann["iscrowd"] == 0 and ann["color"] in DOC_COLORS and ann["size"] in ("small", "large")


def test_module_constants_match_the_contract():
    assert set(shapes.VOCABULARY) == DOC_VOCABULARY and len(shapes.VOCABULARY) == len(DOC_VOCABULARY)
    assert shapes.BACKGROUNDS == DOC_BACKGROUNDS and shapes.COLORS == DOC_COLORS


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ((10, 10, 40, 40), (100, 30, 40, 40), "to the left of"),
        ((100, 30, 40, 40), (10, 10, 40, 40), "to the right of"),
        ((10, 10, 40, 40), (30, 100, 40, 40), "above"),
        ((30, 100, 40, 40), (10, 10, 40, 40), "below"),
        ((10, 10, 40, 40), (50, 50, 40, 40), "above"),  # |dx| == |dy| is not "more horizontal"
    ],
)
def test_relation(a, b, expected):
    assert shapes.relation(a, b) == expected


# --- captions agree with the truth -----------------------------------------------


def test_every_caption_follows_a_documented_template(images):
    for img in images:
        assert len(img["captions"]) == 5
        for text in img["captions"]:
            assert set(text.split()) <= DOC_VOCABULARY
            assert " ".join(text.split()) == text
            assert any(r.fullmatch(text) for r in TEMPLATE_RE[len(img["objects"])]), text


def test_captions_name_the_image_objects_and_true_relations(images):
    for img in images:
        objects = {(o["color"], o["shape"]): o for o in img["objects"]}
        n = len(objects)
        for text in img["captions"]:
            found = PAIR_RE.findall(text)
            if text.startswith("there are three shapes on a"):
                assert n == 3 and found == []
            else:  # every other template names each object exactly once
                assert sorted((c, s) for _, c, s in found) == sorted(objects), text
            for size_word, color, shape in found:
                if size_word:
                    expected = ("small", "little") if objects[color, shape]["size"] == "small" else ("large", "big")
                    assert size_word in expected, text
            for m in re.finditer(f"({NP}) ({REL}) a ({NP})", text):
                (_, *a), (_, *b) = PAIR_RE.fullmatch(m[1]).groups(), PAIR_RE.fullmatch(m[3]).groups()
                assert shapes.relation(objects[tuple(a)]["bbox"], objects[tuple(b)]["bbox"]) == m[2], text
            if "background" in text:
                assert text.endswith(f"on a {img['background']} background")
            assert ("single" in text) <= (n == 1) and ("two shapes" in text) <= (n == 2)
            assert ("three shapes" in text) <= (n == 3)
            if re.fullmatch(f"(?:three shapes )?a {NP} a {NP} and a {NP}", text):  # NP(L) NP(M) NP(R)
                xs = [objects[c, s]["bbox"][0] + objects[c, s]["bbox"][2] / 2 for _, c, s in found]
                assert xs == sorted(xs), text


# --- placement and sampling ------------------------------------------------------


def check_placement(objects: list[tuple[str, str, str, tuple]]) -> None:
    """objects: (color, shape, size, bbox) per object of one image."""
    assert 1 <= len(objects) <= 3
    assert len({(c, s) for c, s, _, _ in objects}) == len(objects)
    for _, _, size, (x, y, w, h) in objects:
        lo, hi = (36, 48) if size == "small" else (72, 96)
        assert w == h and lo <= w <= hi
        assert x >= 8 and x + w <= 216 and y >= 8 and y + h <= 216
    for (*_, (ax, ay, aw, ah)), (*_, (bx, by, bw, bh)) in itertools.combinations(objects, 2):
        overlap_x = ax - 4 < bx + bw + 4 and bx - 4 < ax + aw + 4
        overlap_y = ay - 4 < by + bh + 4 and by - 4 < ay + ah + 4
        assert not (overlap_x and overlap_y)
        dx, dy = (bx + bw / 2) - (ax + aw / 2), (by + bh / 2) - (ay + ah / 2)
        assert abs(abs(dx) - abs(dy)) >= 24


def test_placement_rules_hold_in_the_files(images):
    for img in images:
        check_placement([(o["color"], o["shape"], o["size"], o["bbox"]) for o in img["objects"]])


def test_placement_rules_hold_for_many_scenes():
    for scene in sampled_scenes(600):
        check_placement([(o.color, o.shape, o.size, o.bbox) for o in scene.objects])


def test_scene_distribution_follows_the_contract():
    scenes = sampled_scenes(3000)
    counts = Counter(len(s.objects) for s in scenes)
    objects = [o for s in scenes for o in s.objects]
    assert [counts[k] / len(scenes) for k in (1, 2, 3)] == pytest.approx([0.3, 0.4, 0.3], abs=0.03)
    for attr, values in (("shape", shapes.SHAPES), ("color", DOC_COLORS), ("size", ("small", "large"))):
        freq = Counter(getattr(o, attr) for o in objects)
        assert [freq[v] / len(objects) for v in values] == pytest.approx([1 / len(values)] * len(values), abs=0.03)
    backgrounds = Counter(s.background for s in scenes)
    assert [backgrounds[b] / len(scenes) for b in DOC_BACKGROUNDS] == pytest.approx([0.25] * 4, abs=0.03)


def test_three_large_objects_are_placed():
    rng = np.random.default_rng(0)
    for _ in range(20):
        boxes = shapes.sample_layout(rng, ["large"] * 3)
        check_placement([(str(i), "circle", "large", (x, y, s, s)) for i, (x, y, s) in enumerate(boxes)])


# --- pixels ----------------------------------------------------------------------


def patch_mean(pixels: np.ndarray, x: int, y: int, r: int) -> np.ndarray:
    return pixels[y - r : y + r + 1, x - r : x + r + 1].reshape(-1, 3).mean(axis=0)


def test_pixels_show_the_objects_on_their_background(dataset, images):
    for img in images:
        pixels = np.asarray(Image.open(dataset / "images" / img["split"] / img["file_name"]), dtype=np.float64)
        background = np.array(DOC_BACKGROUNDS[img["background"]])
        # The 8 px margin holds no object: background plus sigma-8 noise.
        strip = pixels[:8].reshape(-1, 3)
        assert np.abs(strip.mean(axis=0) - background).max() < 2
        assert 6 < strip.std(axis=0).mean() < 10
        for o in img["objects"]:
            x, y, s, _ = o["bbox"]
            color = np.array(DOC_COLORS[o["color"]])
            # Every shape covers its box centre; a 5x5 mean leaves noise of sigma 1.6.
            assert np.abs(patch_mean(pixels, x + s // 2, y + s // 2, 2) - color).max() <= 20 + 8
            corner = patch_mean(pixels, x + 2, y + 2, 1)  # only the square fills its corners
            target = color if o["shape"] == "square" else background
            assert np.abs(corner - target).max() <= (20 if o["shape"] == "square" else 0) + 12


def test_area_is_the_drawn_pixel_count_close_to_the_true_area(images):
    true_area = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}
    for o in (o for img in images for o in img["objects"]):
        side = o["bbox"][2]
        assert isinstance(o["area"], int)
        assert o["area"] == pytest.approx(true_area[o["shape"]] * side**2, rel=0.015)


# --- reruns and the command line --------------------------------------------------


def test_second_run_skips_complete_splits(tmp_path):
    shapes.generate(tmp_path, {"train": 4, "val": 2}, seed=1, workers=1)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")}
    shapes.generate(tmp_path, {"train": 4, "val": 2}, seed=1, workers=1)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")} == stamps


def test_changed_or_broken_splits_are_regenerated(tmp_path):
    shapes.generate(tmp_path, {"train": 4, "val": 2}, seed=1, workers=1)
    reference = file_hashes(tmp_path)
    (tmp_path / "images" / "train" / "shapes_train_000000000002.png").unlink()
    shapes.generate(tmp_path, {"train": 3, "val": 2}, seed=1, workers=1)  # smaller: old PNGs go
    assert sorted(p.name for p in (tmp_path / "images" / "train").iterdir()) == [
        f"shapes_train_{i:012d}.png" for i in (1, 2, 3)
    ]
    assert json.loads((tmp_path / "shapes.json").read_text())["splits"] == {"train": 3, "val": 2}
    shapes.generate(tmp_path, {"train": 4, "val": 2}, seed=1, workers=1)
    assert file_hashes(tmp_path) == reference
    shapes.generate(tmp_path, {"train": 4}, seed=2, workers=1)  # a new seed owns the manifest
    assert json.loads((tmp_path / "shapes.json").read_text()) == {"version": 1, "seed": 2, "splits": {"train": 4}}


def test_cli_in_process_and_in_a_subprocess_agree(tmp_path):
    argv = ["shapes", "--train", "3", "--val", "2", "--test", "1", "--seed", "5"]
    assert cli.main([argv[0], str(tmp_path / "a"), *argv[1:], "--workers", "1"]) == 0
    subprocess.run(
        [sys.executable, "-m", "cli", argv[0], str(tmp_path / "b"), *argv[1:]],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    a, b = file_hashes(tmp_path / "a"), file_hashes(tmp_path / "b")
    assert a == b and len([k for k in a if k.endswith(".png")]) == 6
    assert json.loads((tmp_path / "a" / "shapes.json").read_text())["splits"] == {"test": 1, "train": 3, "val": 2}
