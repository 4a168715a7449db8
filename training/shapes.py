"""The Shapes world: a procedurally drawn captioning data set in the MS COCO layout.

Every caption and every attention map can be checked against the drawn truth,
so the COCO training path can be trained, tested and scored on a laptop CPU.
/work/shared/SHAPES.md is the contract; this module implements version 1 of it.

    captioner shapes data/shapes --train 3000 --val 300 --test 300 --seed 0

writes, for each split S with at least one image:

    data/shapes/images/S/shapes_S_000000000001.png ...
    data/shapes/annotations/captions_S.json     (COCO captions)
    data/shapes/annotations/instances_S.json    (COCO instances, one category per shape)
    data/shapes/shapes.json                     (manifest: version, seed, held-out pairs if any, split sizes)

A split the manifest lists with the same version, seed, hold-out and size, whose
files are all present, is left alone, so running the command twice is instant.

    captioner shapes data/shapes-held --hold-out "red triangle,blue circle"

draws a world in which no training or validation image (every split but `test`)
holds a red triangle or a blue circle, to measure whether a model names colour and
shape pairs it never saw together. The test split is drawn as usual. The held-out
pairs are recorded in every split's annotation `info` (`"held_out": [[color, shape],
...]`), where `held_out_pairs` reads them back.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import string
import zlib
from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from runtime.files import write_text

VERSION = 1
IMAGE_SIZE = 224
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
# The order is the COCO category order: category id = index + 1.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Inclusive range of the box side s for each size class.
SIZE_SIDES: dict[str, tuple[int, int]] = {"small": (36, 48), "large": (72, 96)}
SIZE_WORDS: dict[str, tuple[str, str]] = {"small": ("small", "little"), "large": ("large", "big")}
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
FUNCTION_WORDS: tuple[str, ...] = (
    "a", "there", "is", "are", "picture", "of", "single", "two", "three", "shapes",
    "and", "on", "background", "to", "the", "left", "right", "above", "below",
)  # fmt: skip
VOCABULARY: tuple[str, ...] = (
    FUNCTION_WORDS
    + tuple(w for words in SIZE_WORDS.values() for w in words)
    + tuple(COLORS)
    + SHAPES
    + tuple(BACKGROUNDS)
)

OBJECT_COUNTS = (1, 2, 3)
OBJECT_COUNT_PROBS = (0.3, 0.4, 0.3)
NOISE_SIGMA = 8.0
COLOR_JITTER = 20
MARGIN = 8  # boxes lie inside [MARGIN, IMAGE_SIZE - MARGIN]
GAP = 4  # boxes grown by GAP on every side must not intersect
MIN_AXIS_DIFFERENCE = 24  # ||dx| - |dy|| for every pair, so relations are never ambiguous
LAYOUT_BATCH = 256  # candidate layouts drawn per numpy call while rejecting

# {A}, {B}, {C}: a random order of the objects; {L}, {M}, {R}: ordered left to right
# by box centre x; {rel}: REL(A, B); {bg}: the background's name.
TEMPLATES: dict[int, tuple[str, ...]] = {
    1: (
        "a {A}",
        "there is a {A}",
        "a {A} on a {bg} background",
        "a picture of a {A}",
        "a single {A}",
    ),
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
CAPTIONS_PER_IMAGE = 5

Pair = tuple[str, str]  # (color, shape)
PAIRS: tuple[Pair, ...] = tuple((c, s) for c in COLORS for s in SHAPES)  # pair index p = color * 4 + shape
MAX_OBJECTS = max(OBJECT_COUNTS)
# The one split a hold-out leaves as it is: the held-out pairs are what it is there to test.
HOLD_OUT_KEPT_SPLIT = "test"


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object; bbox is COCO [x, y, w, h] in pixels with w == h == s."""

    shape: str
    color: str
    size: str
    bbox: tuple[float, float, float, float]


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ShapeObject, ...]


@dataclass(frozen=True)
class DrawnImage:
    """What a worker hands back for the annotation files."""

    scene: Scene
    areas: tuple[int, ...]  # pixel count of each object, in scene.objects order
    captions: tuple[str, ...]


def relation(a_bbox: tuple[float, ...], b_bbox: tuple[float, ...]) -> str:
    """The relation of A to B (one of RELATIONS) from two COCO [x, y, w, h] boxes."""
    dx = (b_bbox[0] + b_bbox[2] / 2) - (a_bbox[0] + a_bbox[2] / 2)
    dy = (b_bbox[1] + b_bbox[3] / 2) - (a_bbox[1] + a_bbox[3] / 2)
    if abs(dx) > abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Each image's own random stream, so any number of workers draws the same data.

    The split enters through a CRC of its name rather than its position, so a split
    is the same whichever other splits are generated with it.
    """
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def file_name(split: str, image_id: int) -> str:
    return f"shapes_{split}_{image_id:012d}.png"


# --- drawing ---------------------------------------------------------------------


def sample_layout(rng: np.random.Generator, sizes: list[str]) -> list[tuple[int, int, int]]:
    """Box (x0, y0, s) per object, redrawn until the placement rules hold.

    The layout is each box's side within its size class plus its position: three
    large objects cannot always be placed with their first sides (three 96 px boxes
    never fit), so the sides are redrawn with the positions, never the size class.
    """
    lo = np.array([SIZE_SIDES[size][0] for size in sizes])
    hi = np.array([SIZE_SIDES[size][1] for size in sizes])
    while True:
        side = rng.integers(lo, hi + 1, size=(LAYOUT_BATCH, len(sizes)))  # (K, n)
        x0 = rng.integers(MARGIN, IMAGE_SIZE - MARGIN - side + 1)  # (K, n)
        y0 = rng.integers(MARGIN, IMAGE_SIZE - MARGIN - side + 1)  # (K, n)
        ok = np.ones(LAYOUT_BATCH, dtype=bool)
        far = side + 2 * GAP  # a grown box ends this far after its own start
        for i, j in itertools.combinations(range(len(sizes)), 2):
            apart_x = (x0[:, i] + far[:, i] <= x0[:, j]) | (x0[:, j] + far[:, j] <= x0[:, i])
            apart_y = (y0[:, i] + far[:, i] <= y0[:, j]) | (y0[:, j] + far[:, j] <= y0[:, i])
            # Twice the centre differences, to stay in integers.
            dx2 = 2 * (x0[:, j] - x0[:, i]) + side[:, j] - side[:, i]
            dy2 = 2 * (y0[:, j] - y0[:, i]) + side[:, j] - side[:, i]
            ok &= (apart_x | apart_y) & (np.abs(np.abs(dx2) - np.abs(dy2)) >= 2 * MIN_AXIS_DIFFERENCE)
        if ok.any():
            k = int(np.argmax(ok))  # the first valid candidate: plain rejection sampling
            return [(int(x0[k, n]), int(y0[k, n]), int(side[k, n])) for n in range(len(sizes))]


def sample_pairs(rng: np.random.Generator, count: int, hold_out: frozenset[Pair] = frozenset()) -> list[Pair]:
    """`count` distinct (color, shape) pairs, uniform among those not held out.

    Only the pairs are redrawn while one is held out, not the whole scene, so a held-out
    world keeps the contract's 0.3 / 0.4 / 0.3 object counts (rejecting whole scenes
    would thin out the three-object images, which hold a held-out pair most often).
    The first draw takes the same random numbers as a world without a hold-out, so an
    image whose first draw holds no held-out pair comes out byte-identical to it.
    """
    while True:
        drawn = [PAIRS[int(p)] for p in rng.choice(len(PAIRS), size=count, replace=False)]
        if hold_out.isdisjoint(drawn):
            return drawn


def sample_scene(rng: np.random.Generator, hold_out: frozenset[Pair] = frozenset()) -> tuple[Scene, list[RGB]]:
    """A random scene, free of the `hold_out` pairs, and the jittered paint color of each of its objects."""
    count = int(rng.choice(OBJECT_COUNTS, p=OBJECT_COUNT_PROBS))
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    # Distinct (color, shape) pairs: uniform marginals, never two alike.
    pairs = sample_pairs(rng, count, hold_out)
    colors = [color for color, _ in pairs]
    shapes = [shape for _, shape in pairs]
    sizes = [list(SIZE_SIDES)[int(rng.integers(2))] for _ in range(count)]
    jitters = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=(count, 3))
    painted = [np.add(COLORS[color], jitter) for color, jitter in zip(colors, jitters)]
    paints = [(int(r), int(g), int(b)) for r, g, b in painted]
    boxes = sample_layout(rng, sizes)
    objects = tuple(
        ShapeObject(shape, color, size, (x0, y0, s, s))
        for shape, color, size, (x0, y0, s) in zip(shapes, colors, sizes, boxes)
    )
    return Scene(background, objects), paints


def shape_mask(shape: str, side: int) -> np.ndarray:
    """(s, s) bool: the pixels whose centres lie inside the shape drawn in an s-box.

    Sampling pixel centres keeps every shape exactly inside its box and makes the
    pixel count track the true area (the contract's continuous geometry). Offsets
    are integers (half pixels), so the masks are exact on every platform.
    """
    offset = 2 * np.arange(side) + 1 - side  # pixel centre minus box centre, in half pixels
    col, row = offset[None, :], offset[:, None]  # col grows right, row grows down
    if shape == "circle":
        return col**2 + row**2 <= side**2
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "triangle":  # apex at the top middle, base along the bottom edge
        return np.broadcast_to(row + side >= 2 * np.abs(col), (side, side))
    if shape == "diamond":
        # Centres exactly on an edge (even sides) count on the left half only, so the
        # pixel count matches the true area.
        edge = np.abs(col) + np.abs(row)
        return (edge < side) | ((edge == side) & (col < 0))
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, paints: list[RGB], rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, ...]]:
    """(224, 224, 3) uint8 image and each object's pixel count."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    image[:] = BACKGROUNDS[scene.background]
    areas = []
    for obj, paint in zip(scene.objects, paints):
        x0, y0, s, _ = (int(v) for v in obj.bbox)
        mask = shape_mask(obj.shape, s)
        image[y0 : y0 + s, x0 : x0 + s][mask] = paint
        areas.append(int(mask.sum()))
    image += NOISE_SIGMA * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), tuple(areas)


# --- captions --------------------------------------------------------------------


def noun_phrase(obj: ShapeObject, rng: np.random.Generator) -> str:
    """`SIZE COLOR SHAPE` or `COLOR SHAPE` with probability 0.5 each."""
    if rng.random() < 0.5:
        return f"{SIZE_WORDS[obj.size][int(rng.integers(2))]} {obj.color} {obj.shape}"
    return f"{obj.color} {obj.shape}"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One caption: its own template, object order and noun phrases."""
    objects = scene.objects
    order = [objects[int(i)] for i in rng.permutation(len(objects))]
    templates = TEMPLATES[len(objects)]
    template = templates[int(rng.integers(len(templates)))]
    by_x = sorted(objects, key=lambda o: (o.bbox[0] + o.bbox[2] / 2, o.bbox[1] + o.bbox[3] / 2))
    roles = dict(zip("ABC", order))
    if len(objects) == 3:
        roles.update(zip("LMR", by_x))
    words: dict[str, str] = {"bg": scene.background}
    for _, field, _, _ in string.Formatter().parse(template):
        if field == "rel":
            words[field] = relation(roles["A"].bbox, roles["B"].bbox)
        elif field in roles:
            words[field] = noun_phrase(roles[field], rng)
    return template.format(**words)


def draw_image(
    seed: int, split: str, index: int, hold_out: frozenset[Pair] = frozenset()
) -> tuple[np.ndarray, DrawnImage]:
    """Image number `index` (from 1) of a split: pixels, truth and captions.

    `hold_out` applies as given: `split_hold_out` decides which splits get it.
    """
    rng = image_rng(seed, split, index)
    scene, paints = sample_scene(rng, hold_out)
    captions = tuple(caption(scene, rng) for _ in range(CAPTIONS_PER_IMAGE))
    pixels, areas = render(scene, paints, rng)
    return pixels, DrawnImage(scene, areas, captions)


# --- held-out pairs ---------------------------------------------------------------


def check_hold_out(hold_out: Set[Pair]) -> frozenset[Pair]:
    """`hold_out` as a frozenset, once every pair is a known (color, shape) and enough pairs are left.

    Three-object scenes need three distinct pairs that are not held out, or drawing
    one would never end.
    """
    for pair in sorted(hold_out, key=repr):  # a fixed order: the same error for the same value
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise ValueError(f"a held-out pair is a (color, shape) tuple, got {pair!r}")
        color, shape = pair
        if color not in COLORS:
            raise ValueError(
                f"unknown colour {color!r} in held-out pair '{color} {shape}'; colours: {', '.join(COLORS)}"
            )
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r} in held-out pair '{color} {shape}'; shapes: {', '.join(SHAPES)}")
    if len(PAIRS) - len(hold_out) < MAX_OBJECTS:
        raise ValueError(
            f"{len(hold_out)} held-out pairs leave fewer than {MAX_OBJECTS} of the {len(PAIRS)} to draw from"
        )
    return frozenset(hold_out)


def parse_hold_out(text: str) -> frozenset[Pair]:
    """The pairs of a `--hold-out` value, "red triangle,blue circle" (blank items ignored).

    Raises ValueError naming the first word that is not a colour or shape, or an item
    that is not two words.
    """
    pairs = []
    for item in text.split(","):
        words = item.split()
        if not words:
            continue
        if len(words) != 2:
            raise ValueError(f"a held-out pair is two words, COLOR SHAPE (e.g. 'red triangle'), got {item.strip()!r}")
        pairs.append((words[0].lower(), words[1].lower()))
    return check_hold_out(frozenset(pairs))


def hold_out_argument(text: str) -> frozenset[Pair]:
    """argparse type for `--hold-out`: a bad value is a usage error (exit 2) saying what is wrong."""
    try:
        return parse_hold_out(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def add_hold_out_argument(parser: argparse.ArgumentParser) -> None:
    """`--hold-out`, for every command that draws a world (`captioner shapes`, `captioner demo`)."""
    parser.add_argument(
        "--hold-out",
        type=hold_out_argument,
        default=frozenset(),
        metavar="PAIRS",
        help='comma-separated COLOR SHAPE pairs, e.g. "red triangle,blue circle", that no training or '
        "validation image may contain; the test split is drawn as usual (default: none)",
    )


def sorted_pairs(pairs: frozenset[Pair]) -> list[list[str]]:
    """Pairs in the contract's order (colour, then shape), as JSON lists: one spelling, one set of bytes."""
    return [list(pair) for pair in PAIRS if pair in pairs]


def split_hold_out(split: str, hold_out: frozenset[Pair]) -> frozenset[Pair]:
    """The pairs a split's images must not contain: all of them, except in the test split."""
    return frozenset() if split == HOLD_OUT_KEPT_SPLIT else hold_out


def held_out_pairs(instances: str | Path) -> frozenset[Pair]:
    """The held-out (color, shape) pairs recorded in a split's `instances_S.json` (none for a plain world).

    Every split records them, the test split included, so evaluation can tell the
    images that show a pair training never did.
    """
    info = json.loads(Path(instances).read_text(encoding="utf-8")).get("info", {})
    return frozenset((color, shape) for color, shape in info.get("held_out", []))


# --- files -----------------------------------------------------------------------


def _write_image(job: tuple[Path, int, str, int, frozenset[Pair]]) -> DrawnImage:
    """Worker: draw one image, save its PNG, hand back its annotations."""
    folder, seed, split, index, hold_out = job
    pixels, drawn = draw_image(seed, split, index, hold_out)
    # PIL writes no timestamps into PNGs, so equal pixels give equal bytes.
    Image.fromarray(pixels, "RGB").save(folder / file_name(split, index), format="PNG", compress_level=6)
    return drawn


def _write_json(path: Path, data: dict) -> None:
    """Fixed formatting (insertion key order, compact separators), written atomically."""
    write_text(path, json.dumps(data, separators=(",", ":")) + "\n")


def coco_files(
    split: str, seed: int, drawn: list[DrawnImage], hold_out: frozenset[Pair] = frozenset()
) -> tuple[dict, dict]:
    """The captions and instances JSON of a split, image ids 1..n in `drawn` order.

    `hold_out` is the world's, recorded in `info` of both files (only when there is
    one, so a plain world's files stay as they were).
    """
    info: dict = {"description": f"The Shapes world v{VERSION}, split {split}, seed {seed}", "version": str(VERSION)}
    if hold_out:
        info["held_out"] = sorted_pairs(hold_out)
    images = [
        {"id": i, "file_name": file_name(split, i), "width": IMAGE_SIZE, "height": IMAGE_SIZE}
        for i in range(1, len(drawn) + 1)
    ]
    captions: list[dict] = []
    objects: list[dict] = []
    for image_id, d in enumerate(drawn, start=1):
        for text in d.captions:
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": text})
        for obj, area in zip(d.scene.objects, d.areas):
            objects.append(
                {
                    "id": len(objects) + 1,
                    "image_id": image_id,
                    "category_id": SHAPES.index(obj.shape) + 1,
                    "bbox": list(obj.bbox),
                    "area": area,
                    "iscrowd": 0,
                    "color": obj.color,
                    "size": obj.size,
                }
            )
    captions_json = {"info": info, "licenses": [], "images": images, "annotations": captions}
    instances_json = {
        "info": info,
        "licenses": [],
        "images": [{**img, "background": d.scene.background} for img, d in zip(images, drawn)],
        "annotations": objects,
        "categories": [{"id": n + 1, "name": shape, "supercategory": "shape"} for n, shape in enumerate(SHAPES)],
    }
    return captions_json, instances_json


def _read_manifest(out_dir: Path, seed: int, hold_out: frozenset[Pair]) -> dict[str, int]:
    """Split sizes the manifest vouches for, or none if it is missing or for other parameters."""
    try:
        manifest = json.loads((out_dir / "shapes.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    same = manifest.get("version") == VERSION and manifest.get("seed") == seed
    if not same or manifest.get("held_out", []) != sorted_pairs(hold_out):
        return {}
    return dict(manifest.get("splits", {}))


def _write_manifest(out_dir: Path, seed: int, splits: dict[str, int], hold_out: frozenset[Pair]) -> None:
    """shapes.json; `held_out` only in a held-out world's, so a plain world's manifest is as it was."""
    manifest: dict = {"version": VERSION, "seed": seed}
    if hold_out:
        manifest["held_out"] = sorted_pairs(hold_out)
    manifest["splits"] = dict(sorted(splits.items()))
    _write_json(out_dir / "shapes.json", manifest)


def _split_complete(out_dir: Path, split: str, count: int) -> bool:
    folder = out_dir / "images" / split
    annotations = [out_dir / "annotations" / f"{kind}_{split}.json" for kind in ("captions", "instances")]
    if not all(path.is_file() for path in annotations):
        return False
    present = set(os.listdir(folder)) if folder.is_dir() else set()
    return all(file_name(split, i) in present for i in range(1, count + 1))


def default_workers() -> int:
    return min(2, os.cpu_count() or 1)


def generate(
    out_dir: Path,
    splits: dict[str, int],
    seed: int,
    workers: int = default_workers(),
    *,
    hold_out: Set[Pair] = frozenset(),
) -> None:
    """Write each split of `splits` (name -> image count) with `seed`; splits of 0 images are skipped.

    No image of a split other than `test` contains a `hold_out` (color, shape) pair;
    with none held out the files are those of a plain world, byte for byte. Object
    `area` in the instances is the drawn pixel count, which is exact because objects
    never overlap. A split already complete for this version, seed, hold-out and size
    is kept; any other is redrawn from scratch (its old PNGs are deleted first).
    """
    if seed < 0 or any(count < 0 for count in splits.values()):
        raise ValueError(f"seed and split sizes must be >= 0, got seed {seed} and {splits}")
    held_out = check_hold_out(hold_out)
    out_dir = Path(out_dir)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    done = _read_manifest(out_dir, seed, held_out)
    done = {s: n for s, n in done.items() if _split_complete(out_dir, s, n)}
    for split, count in splits.items():
        if count == 0:
            continue
        if done.get(split) == count:
            print(f"shapes {split}: {count} images already up to date in {out_dir}")
            continue
        done.pop(split, None)
        _write_manifest(out_dir, seed, done, held_out)  # an interrupted split must not look complete
        folder = out_dir / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"shapes_{split}_*.png"):
            stale.unlink()
        excluded = split_hold_out(split, held_out)
        jobs = [(folder, seed, split, i, excluded) for i in range(1, count + 1)]
        progress = dict(total=count, desc=f"shapes {split}", unit="img")
        if workers <= 1:
            drawn = [_write_image(job) for job in tqdm(jobs, **progress)]
        else:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:  # spawn: safe next to torch threads
                drawn = list(tqdm(pool.imap(_write_image, jobs, chunksize=16), **progress))
        captions_json, instances_json = coco_files(split, seed, drawn, held_out)
        _write_json(out_dir / "annotations" / f"captions_{split}.json", captions_json)
        _write_json(out_dir / "annotations" / f"instances_{split}.json", instances_json)
        done[split] = count
        _write_manifest(out_dir, seed, done, held_out)


# --- command line ----------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="data set root (images/, annotations/, shapes.json)")
    for split, default in (("train", 3000), ("val", 300), ("test", 300)):
        parser.add_argument(
            f"--{split}", type=int, default=default, metavar="N", help=f"{split} images, 0 to skip (default {default})"
        )
    parser.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files (default 0)")
    parser.add_argument(
        "--workers", type=int, default=default_workers(), help="drawing processes (default %(default)s)"
    )
    add_hold_out_argument(parser)


def main(args: argparse.Namespace) -> int:
    splits = {"train": args.train, "val": args.val, "test": args.test}
    generate(args.out, splits, args.seed, args.workers, hold_out=args.hold_out)
    return 0
