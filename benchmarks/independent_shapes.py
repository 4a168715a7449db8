"""Shapes-world images from a second, independent renderer: a check that a model reads pictures, not one drawing code.

    .venv/bin/python benchmarks/independent_shapes.py data/independent                # 2000 images, seed 12345
    .venv/bin/python benchmarks/independent_shapes.py data/independent --images 50 --seed 7
    .venv/bin/captioner evaluate MODEL --data data/independent --split independent

A model trained on training/shapes.py's images could lean on quirks of that code (its
random streams, its rasteriser's edge rule, its placement sampler) that the contract,
/work/shared/SHAPES.md, does not promise. This script draws the same world from the
contract alone: it does not import training.shapes, rasterises by testing pixel
centres with numpy (no PIL.ImageDraw), places objects with its own rejection sampler
and uses another default seed. It writes one split, `independent`, in the COCO layout
that `captioner evaluate` and training.shapes_truth.load_truth read:

    DIR/images/independent/independent_000000000001.png ...
    DIR/annotations/captions_independent.json    (five captions per image)
    DIR/annotations/instances_independent.json   (categories circle, square, triangle, diamond)

The same seed and image count give byte-identical files; a larger count adds images after them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# --- the contract, written out again -----------------------------------------------

CANVAS = 224
RGB = tuple[int, int, int]
BACKGROUNDS: dict[str, RGB] = {
    "white": (240, 240, 240),
    "gray": (170, 170, 170),
    "dark": (80, 80, 80),
    "black": (20, 20, 20),
}
COLORS: dict[str, RGB] = {
    "red": (220, 50, 50),
    "green": (50, 170, 70),
    "blue": (50, 90, 220),
    "yellow": (235, 205, 40),
    "purple": (150, 70, 190),
}
CATEGORIES = ("circle", "square", "triangle", "diamond")  # COCO category id = position + 1
SIDE_RANGES: dict[str, tuple[int, int]] = {"small": (36, 48), "large": (72, 96)}  # inclusive
SIZE_WORDS: dict[str, tuple[str, str]] = {"small": ("small", "little"), "large": ("large", "big")}
COUNT_CHOICES = (1, 2, 3)
COUNT_WEIGHTS = (0.3, 0.4, 0.3)
JITTER = 20  # per channel, uniform integer in [-JITTER, JITTER]
NOISE_SIGMA = 8.0
BORDER = 8  # every box lies inside [BORDER, CANVAS - BORDER]
GAP = 4  # boxes grown by GAP on every side do not intersect
AXIS_MARGIN = 24  # ||dx| - |dy|| of box centres, for every pair
CAPTIONS_PER_IMAGE = 5

SPLIT = "independent"
# Enough pictures that one wrong relation phrase moves relation accuracy by well under 0.01 (a few
# hundred hold too few phrases for a 0.97 target or a 0.01 band; RESULTS.md gives the counts).
DEFAULT_IMAGES = 2000
DEFAULT_SEED = 12345  # not the Shapes world's 0, nor the demo's

# {A} {B} {C}: the objects in a random order; {L} {M} {R}: left to right by box centre x;
# {rel}: the relation of A to B; {bg}: the background's name.
TEMPLATES: dict[int, tuple[str, ...]] = {
    1: ("a {A}", "there is a {A}", "a {A} on a {bg} background", "a picture of a {A}", "a single {A}"),
    2: (
        "a {A} {rel} a {B}",
        "a {A} and a {B}",
        "there is a {A} {rel} a {B}",
        "two shapes a {A} and a {B}",
        "a {A} {rel} a {B} on a {bg} background",
    ),
    3: (
        "three shapes a {L} a {M} and a {R}",
        "a {L} a {M} and a {R}",
        "a {A} {rel} a {B} and a {C}",
        "there are three shapes on a {bg} background",
        "a {A} and a {B} and a {C}",
    ),
}


@dataclass(frozen=True)
class Thing:
    """One object: what it is, where its box [x, y, x + side, y + side] lies, and its jittered paint."""

    shape: str
    color: str
    size: str
    x: int
    y: int
    side: int
    paint: RGB

    def centre(self) -> tuple[float, float]:
        return self.x + self.side / 2, self.y + self.side / 2


@dataclass(frozen=True)
class Picture:
    background: str
    things: tuple[Thing, ...]


# --- what is in a picture ------------------------------------------------------------


def pick_kinds(rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    """`count` (color, shape) kinds, each uniform among the kinds not yet taken: no two alike."""
    left = [(color, shape) for color in COLORS for shape in CATEGORIES]
    return [left.pop(int(rng.integers(len(left)))) for _ in range(count)]


def boxes_fit(boxes: list[tuple[int, int, int]]) -> bool:
    """The contract's placement rules for boxes (x, y, side); the border is kept by how they are drawn."""
    for (ax, ay, a_side), (bx, by, b_side) in itertools.combinations(boxes, 2):
        apart = (
            ax + a_side + 2 * GAP <= bx
            or bx + b_side + 2 * GAP <= ax
            or ay + a_side + 2 * GAP <= by
            or by + b_side + 2 * GAP <= ay
        )
        dx = (bx + b_side / 2) - (ax + a_side / 2)
        dy = (by + b_side / 2) - (ay + a_side / 2)
        if not apart or abs(abs(dx) - abs(dy)) < AXIS_MARGIN:
            return False
    return True


def pick_boxes(rng: np.random.Generator, sizes: list[str]) -> list[tuple[int, int, int]]:
    """Boxes (x, y, side), the whole layout drawn again until it fits.

    The sides are part of the layout: three large boxes of the largest side cannot be
    placed at all, so keeping a failed layout's sides could loop for ever.
    """
    while True:
        boxes = []
        for size in sizes:
            lo, hi = SIDE_RANGES[size]
            side = int(rng.integers(lo, hi + 1))
            x = int(rng.integers(BORDER, CANVAS - BORDER - side + 1))
            y = int(rng.integers(BORDER, CANVAS - BORDER - side + 1))
            boxes.append((x, y, side))
        if boxes_fit(boxes):
            return boxes


def jittered(rng: np.random.Generator, color: str) -> RGB:
    """The color's paint for one object: each channel moved by its own uniform integer in [-20, 20]."""
    red, green, blue = (int(v) for v in np.add(COLORS[color], rng.integers(-JITTER, JITTER + 1, size=3)))
    return red, green, blue


def pick_picture(rng: np.random.Generator) -> Picture:
    """A random picture by the contract: count, background, kinds, sizes, paints, then the layout."""
    count = int(rng.choice(COUNT_CHOICES, p=COUNT_WEIGHTS))
    background = str(rng.choice(list(BACKGROUNDS)))
    kinds = pick_kinds(rng, count)
    sizes = [str(rng.choice(list(SIDE_RANGES))) for _ in range(count)]
    paints = [jittered(rng, color) for color, _ in kinds]
    boxes = pick_boxes(rng, sizes)
    things = tuple(
        Thing(shape, color, size, x, y, side, paint)
        for (color, shape), size, paint, (x, y, side) in zip(kinds, sizes, paints, boxes)
    )
    return Picture(background, things)


# --- pixels ----------------------------------------------------------------------------


def pixel_centres() -> tuple[np.ndarray, np.ndarray]:
    """(224, 224) x and y of every pixel's centre: pixel (row r, column c) covers [c, c+1] x [r, r+1]."""
    ys, xs = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float64) + 0.5  # each (224, 224)
    return xs, ys


def inside_convex(xs: np.ndarray, ys: np.ndarray, corners: list[tuple[float, float]]) -> np.ndarray:
    """(224, 224) bool: centres on the inner side of every edge of a convex polygon (edges count as inside).

    The sign of each edge's cross product with the point tells the side; requiring
    one sign for all edges works for either winding of the corners.
    """
    sides = np.stack(
        [
            (qx - px) * (ys - py) - (qy - py) * (xs - px)
            for (px, py), (qx, qy) in zip(corners, corners[1:] + corners[:1])
        ]
    )  # (edges, 224, 224)
    return np.asarray((sides >= 0).all(axis=0) | (sides <= 0).all(axis=0))


def coverage(thing: Thing, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(224, 224) bool: the pixels whose centres the object covers, its edges included.

    Edges count as inside, so a diamond of even side also gets the s pixels whose
    centres lie on its outline (2 to 5% over the continuous area), where
    training.shapes takes half of them: one of the incidental differences a model
    should not notice.
    """
    x0, y0, s = thing.x, thing.y, thing.side
    cx, cy = thing.centre()
    if thing.shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= (s / 2) ** 2
    if thing.shape == "square":
        return (xs > x0) & (xs < x0 + s) & (ys > y0) & (ys < y0 + s)
    if thing.shape == "triangle":
        return inside_convex(xs, ys, [(cx, y0), (x0, y0 + s), (x0 + s, y0 + s)])
    if thing.shape == "diamond":
        return inside_convex(xs, ys, [(cx, y0), (x0 + s, cy), (cx, y0 + s), (x0, cy)])
    raise ValueError(f"unknown shape {thing.shape!r}")


def paint(picture: Picture, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """(224, 224, 3) uint8 pixels, and each object's covered pixel count (its COCO `area`)."""
    xs, ys = pixel_centres()
    canvas = np.empty((CANVAS, CANVAS, 3), dtype=np.float64)  # (224, 224, 3)
    canvas[:, :] = BACKGROUNDS[picture.background]
    areas = []
    for thing in picture.things:
        covered = coverage(thing, xs, ys)  # (224, 224)
        canvas[covered] = thing.paint
        areas.append(int(covered.sum()))
    canvas += rng.normal(0.0, NOISE_SIGMA, size=canvas.shape)  # (224, 224, 3), on the finished image
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8), areas


# --- captions ------------------------------------------------------------------------


def relation(a: Thing, b: Thing) -> str:
    """Where A is with respect to B, from their box centres."""
    (ax, ay), (bx, by) = a.centre(), b.centre()
    dx, dy = bx - ax, by - ay
    if abs(dx) > abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def noun_phrase(rng: np.random.Generator, thing: Thing) -> str:
    """`SIZE COLOR SHAPE` half the time, else `COLOR SHAPE`."""
    words = [thing.color, thing.shape]
    if rng.random() < 0.5:
        words.insert(0, SIZE_WORDS[thing.size][int(rng.integers(2))])
    return " ".join(words)


def describe(rng: np.random.Generator, picture: Picture) -> str:
    """One caption: a template of its own, a random object order, fresh noun phrases."""
    things = picture.things
    template = TEMPLATES[len(things)][int(rng.integers(CAPTIONS_PER_IMAGE))]
    shuffled = [things[int(i)] for i in rng.permutation(len(things))]
    left_to_right = sorted(things, key=lambda t: t.centre()[0])
    roles = dict(zip("ABC", shuffled))
    if len(things) == 3:
        roles.update(zip("LMR", left_to_right))
    fill = {"bg": picture.background}
    if len(things) > 1:
        fill["rel"] = relation(roles["A"], roles["B"])
    for role, thing in roles.items():
        if "{" + role + "}" in template:
            fill[role] = noun_phrase(rng, thing)
    return template.format(**fill)


# --- files -----------------------------------------------------------------------------


def image_name(image_id: int) -> str:
    return f"{SPLIT}_{image_id:012d}.png"


def annotation_files(
    pictures: list[Picture], areas: list[list[int]], captions: list[list[str]], seed: int
) -> tuple[dict, dict]:
    """(captions JSON, instances JSON) in the COCO formats, image ids 1..n in order."""
    info = {"description": f"The Shapes world v1 by benchmarks/independent_shapes.py, seed {seed}", "version": "1"}
    images = [
        {"id": i, "file_name": image_name(i), "width": CANVAS, "height": CANVAS} for i in range(1, len(pictures) + 1)
    ]
    caption_rows: list[dict] = []
    object_rows: list[dict] = []
    for image_id, (picture, counts, texts) in enumerate(zip(pictures, areas, captions), start=1):
        for text in texts:
            caption_rows.append({"id": len(caption_rows) + 1, "image_id": image_id, "caption": text})
        for thing, area in zip(picture.things, counts):
            object_rows.append(
                {
                    "id": len(object_rows) + 1,
                    "image_id": image_id,
                    "category_id": CATEGORIES.index(thing.shape) + 1,
                    "bbox": [thing.x, thing.y, thing.side, thing.side],
                    "area": area,
                    "iscrowd": 0,
                    "color": thing.color,
                    "size": thing.size,
                }
            )
    captions_json = {"info": info, "licenses": [], "images": images, "annotations": caption_rows}
    instances_json = {
        "info": info,
        "licenses": [],
        "images": [{**image, "background": p.background} for image, p in zip(images, pictures)],
        "annotations": object_rows,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CATEGORIES)],
    }
    return captions_json, instances_json


def render_split(root: Path, count: int = DEFAULT_IMAGES, seed: int = DEFAULT_SEED) -> None:
    """Draw `count` images with one random stream from `seed`, and write the split under `root`.

    Images are drawn in order from a single stream, so the first n images of a larger
    run are the n images of a smaller one.
    """
    if count < 1 or seed < 0:
        raise ValueError(f"need at least one image and a seed >= 0, got {count} images and seed {seed}")
    folder = Path(root) / "images" / SPLIT
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"{SPLIT}_*.png"):
        stale.unlink()
    rng = np.random.default_rng(seed)
    pictures, areas, captions = [], [], []
    for image_id in range(1, count + 1):
        picture = pick_picture(rng)
        captions.append([describe(rng, picture) for _ in range(CAPTIONS_PER_IMAGE)])
        pixels, counts = paint(picture, rng)
        Image.fromarray(pixels, "RGB").save(folder / image_name(image_id), format="PNG")
        pictures.append(picture)
        areas.append(counts)
    annotations = Path(root) / "annotations"
    annotations.mkdir(parents=True, exist_ok=True)
    captions_json, instances_json = annotation_files(pictures, areas, captions, seed)
    for kind, data in (("captions", captions_json), ("instances", instances_json)):
        (annotations / f"{kind}_{SPLIT}.json").write_text(json.dumps(data, separators=(",", ":")) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="data set root: images/independent/ and annotations/ go there")
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="how many (default %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="same seed, same files (default %(default)s)")
    args = parser.parse_args(argv)
    if args.images < 1 or args.seed < 0:
        parser.error("--images must be at least 1 and --seed at least 0")
    render_split(args.out, args.images, args.seed)
    print(f"wrote {args.images} images to {args.out / 'images' / SPLIT} and their annotations", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
