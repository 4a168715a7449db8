"""benchmarks/independent_shapes.py draws the contract's world, readable by the project's own loaders.

Everything is checked from the written files, through training.coco.load_split and
training.shapes_truth.load_truth, as `captioner evaluate --split independent` reads them.
"""

import ast
import importlib.util
import itertools
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.coco import load_split
from training.shapes import relation
from training.shapes_truth import load_truth

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "independent_shapes.py"
IMAGES = 12
PALETTE = {
    "red": (220, 50, 50),
    "green": (50, 170, 70),
    "blue": (50, 90, 220),
    "yellow": (235, 205, 40),
    "purple": (150, 70, 190),
}
BACKGROUNDS = {"white": (240, 240, 240), "gray": (170, 170, 170), "dark": (80, 80, 80), "black": (20, 20, 20)}
NP = r"(?:(?:small|little|large|big) )?(red|green|blue|yellow|purple) (circle|square|triangle|diamond)"
REL = r"(to the left of|to the right of|above|below)"


def load_script():
    """The script as a module; registered first, as its dataclasses look their module up while being made."""
    spec = importlib.util.spec_from_file_location("independent_shapes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("independent")
    assert load_script().main([str(root), "--images", str(IMAGES), "--seed", "4"]) == 0
    return root


@pytest.fixture(scope="module")
def split(world):
    return load_split(world, "independent")


@pytest.fixture(scope="module")
def scenes(split):
    return load_truth(split.instances)


def test_the_split_loads_as_a_shapes_split_with_its_truth(world, split, scenes):
    assert split.instances == world / "annotations" / "instances_independent.json"
    assert split.image_ids == list(range(1, IMAGES + 1)) and sorted(scenes) == split.image_ids
    assert all(len(captions) == 5 for captions in split.captions)
    for path in split.image_paths:
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (224, 224))
    assert {len(scene.objects) for scene in scenes.values()} == {1, 2, 3}  # seed 4 draws every count


def test_each_object_shows_its_colour_at_its_centre_and_the_background_shows_around(split, scenes):
    for image_id, path in zip(split.image_ids, split.image_paths):
        pixels = np.asarray(Image.open(path), dtype=np.float64)  # (224, 224, 3)
        scene = scenes[image_id]
        margin = pixels[:8].reshape(-1, 3)  # no box reaches into the top 8 rows
        assert np.abs(margin.mean(axis=0) - BACKGROUNDS[scene.background]).max() < 3
        assert 6 < margin.std(axis=0).mean() < 10  # sigma 8 noise
        for obj in scene.objects:
            x, y, s, _ = obj.bbox
            centre = pixels[y + s // 2 - 1 : y + s // 2 + 2, x + s // 2 - 1 : x + s // 2 + 2]  # (3, 3, 3)
            mean = centre.reshape(-1, 3).mean(axis=0)
            assert np.abs(mean - PALETTE[obj.color]).max() <= 20 + 4 * 8 / 3, (image_id, obj)
            nearest = min(PALETTE, key=lambda name: np.abs(mean - PALETTE[name]).sum())
            assert nearest == obj.color


def check_layout(objects: list[tuple[str, str, str, tuple]]) -> None:
    """objects: (color, shape, size, [x, y, w, h]) of one image, against the contract's placement rules."""
    assert 1 <= len(objects) <= 3 and len({(c, s) for c, s, _, _ in objects}) == len(objects)
    for _, _, size, (x, y, w, h) in objects:
        lo, hi = (36, 48) if size == "small" else (72, 96)
        assert w == h and lo <= w <= hi
        assert 8 <= x <= 216 - w and 8 <= y <= 216 - h
    for (*_, (ax, ay, aw, _)), (*_, (bx, by, bw, _)) in itertools.combinations(objects, 2):
        apart_x = ax + aw + 4 <= bx - 4 or bx + bw + 4 <= ax - 4  # boxes grown by 4 px
        apart_y = ay + aw + 4 <= by - 4 or by + bw + 4 <= ay - 4
        assert apart_x or apart_y
        dx, dy = (bx + bw / 2) - (ax + aw / 2), (by + bw / 2) - (ay + aw / 2)
        assert abs(abs(dx) - abs(dy)) >= 24


def test_layout_rules_hold_in_the_files(scenes):
    for scene in scenes.values():
        check_layout([(o.color, o.shape, o.size, o.bbox) for o in scene.objects])


def test_many_pictures_keep_the_rules_and_the_contract_s_frequencies():
    script = load_script()
    rng = np.random.default_rng(0)
    pictures = [script.pick_picture(rng) for _ in range(800)]
    for picture in pictures:
        check_layout([(t.color, t.shape, t.size, (t.x, t.y, t.side, t.side)) for t in picture.things])
    counts = Counter(len(p.things) for p in pictures)
    assert [counts[n] / len(pictures) for n in (1, 2, 3)] == pytest.approx([0.3, 0.4, 0.3], abs=0.05)
    things = [t for p in pictures for t in p.things]
    for attribute, values in (("color", PALETTE), ("shape", ("circle", "square", "triangle", "diamond"))):
        seen = Counter(getattr(t, attribute) for t in things)
        assert [seen[v] / len(things) for v in values] == pytest.approx([1 / len(values)] * len(values), abs=0.04)
    assert Counter(p.background for p in pictures).keys() == BACKGROUNDS.keys()


def test_captions_name_the_objects_and_their_true_relations(split, scenes):
    for image_id, captions in split.references().items():
        scene = scenes[image_id]
        objects = {(o.color, o.shape): o for o in scene.objects}
        for text in captions:
            named = re.findall(NP, text)
            if text.startswith("there are three shapes on a"):
                assert len(objects) == 3 and not named and text.endswith(f"{scene.background} background")
            else:
                assert sorted(named) == sorted(objects), text
            for m in re.finditer(f"{NP} {REL} a {NP}", text):
                subject, obj = objects[m[1], m[2]], objects[m[4], m[5]]
                assert relation(subject.bbox, obj.bbox) == m[3], text


def test_same_seed_same_files_and_no_code_from_the_generator(world, tmp_path):
    load_script().render_split(tmp_path, IMAGES, 4)
    for path in sorted(p for p in world.rglob("*") if p.is_file()):
        assert (tmp_path / path.relative_to(world)).read_bytes() == path.read_bytes(), path
    imported = {
        alias.name if isinstance(node, ast.Import) else f"{node.module}.{alias.name}"
        for node in ast.walk(ast.parse(SCRIPT.read_text()))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert not any(name.split(".")[0] in ("training", "captioner") for name in imported), imported
    assert "PIL.Image" in imported and "PIL.ImageDraw" not in imported


def test_more_images_add_pictures_after_the_same_ones(world, tmp_path):
    """A figure on 2000 pictures covers the 300 an older run scored: a larger count is a superset."""
    load_script().render_split(tmp_path, IMAGES + 2, 4)
    for path in sorted((world / "images" / "independent").iterdir()):
        assert (tmp_path / "images" / "independent" / path.name).read_bytes() == path.read_bytes(), path.name
    assert len(list((tmp_path / "images" / "independent").iterdir())) == IMAGES + 2
