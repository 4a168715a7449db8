"""Caption splits in the MS COCO file layout: the Shapes world, COCO 2014/2017 and Karpathy's splits.

    from training.coco import load_split
    split = load_split(Path("data/shapes"), "train")                      # Shapes world
    split = load_split(Path("data/coco"), "val2014")                      # COCO 2014 (or "val" if one year is there)
    split = load_split(Path("data/coco"), "test", Path("data/coco/dataset_coco.json"))  # Karpathy test

Layouts tried for a split S under ROOT, in this order (the first whose files exist wins,
but `train` or `val` with both COCO years present is an error: name the year):

    ROOT/annotations/captions_S.json      + ROOT/images/S/    (the Shapes world)
    ROOT/annotations/captions_S.json      + ROOT/S/           (COCO, S = train2014, val2017, ...)
    ROOT/annotations/captions_S2014.json  + ROOT/S2014/       (COCO, S = train or val)
    ROOT/annotations/captions_S2017.json  + ROOT/S2017/

A Karpathy file (`dataset_coco.json`) instead names each image's folder, file and
raw sentences; its `restval` images join `train`. Images come sorted by image id.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

COCO_YEARS = ("2014", "2017")
KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


@dataclass(frozen=True)
class CaptionSplit:
    name: str
    image_ids: list[int]  # sorted
    image_paths: list[Path]  # image_paths[i] shows image_ids[i]
    captions: list[list[str]]  # raw reference captions of image_ids[i]
    instances: Path | None = None  # the Shapes world's drawn truth (instances_S.json), for its truth metrics
    skipped: dict[str, str] = field(default_factory=dict)  # path -> why: images left out as unusable

    def __len__(self) -> int:
        return len(self.image_ids)

    def references(self) -> dict[int, list[str]]:
        """image id -> its raw reference captions."""
        return dict(zip(self.image_ids, self.captions))

    def first(self, count: int) -> CaptionSplit:
        """The first `count` images (lowest ids): a quick look at a large split."""
        return CaptionSplit(
            self.name,
            self.image_ids[:count],
            self.image_paths[:count],
            self.captions[:count],
            self.instances,
            self.skipped,
        )

    def without(self, bad: Mapping[Path, str]) -> CaptionSplit:
        """This split less the images at the paths of `bad` (path -> why), which `skipped` records."""
        keep = [i for i, path in enumerate(self.image_paths) if path not in bad]
        return CaptionSplit(
            self.name,
            [self.image_ids[i] for i in keep],
            [self.image_paths[i] for i in keep],
            [self.captions[i] for i in keep],
            self.instances,
            {**self.skipped, **{str(path): why for path, why in bad.items()}},
        )


def load_split(root: Path, split: str, karpathy: Path | None = None) -> CaptionSplit:
    """The images and reference captions of `split` under `root` (see the module docstring for layouts)."""
    root = Path(root)
    if karpathy is not None:
        return load_karpathy_split(root, split, Path(karpathy))
    annotations, images = find_layout(root, split)
    instances = root / "annotations" / f"instances_{split}.json"
    is_shapes = images == root / "images" / split and instances.is_file()
    return load_coco_captions(split, annotations, images, instances if is_shapes else None)


def find_layout(root: Path, split: str) -> tuple[Path, Path]:
    """(captions file, image folder) of the first layout present; FileNotFoundError lists all tried."""
    captions = root / "annotations" / f"captions_{split}.json"
    named = [(captions, root / "images" / split), (captions, root / split)]
    by_year = [
        (root / "annotations" / f"captions_{split}{year}.json", root / f"{split}{year}")
        for year in COCO_YEARS
        if split in ("train", "val")
    ]
    found = [(a, i) for a, i in named + by_year if a.is_file() and i.is_dir()]
    if len(found) > 1 and found[0] in by_year:
        raise ValueError(
            f"both COCO {' and '.join(COCO_YEARS)} are under {root}: name the split {split}2014 or {split}2017"
        )
    if found:
        return found[0]
    tried = "\n".join(f"  {a} with images in {i}/" for a, i in named + by_year)
    raise FileNotFoundError(f"no caption split {split!r} under {root}; looked for:\n{tried}")


def load_coco_captions(name: str, annotations: Path, images: Path, instances: Path | None = None) -> CaptionSplit:
    """A COCO captions file read with pycocotools; images without a caption are left out."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = COCO(str(annotations))
    image_ids = sorted(i for i in coco.imgs if coco.imgToAnns[i])
    captions = [[a["caption"] for a in sorted(coco.imgToAnns[i], key=lambda a: a["id"])] for i in image_ids]
    paths = [images / coco.imgs[i]["file_name"] for i in image_ids]
    return CaptionSplit(name, image_ids, paths, captions, instances)


def load_karpathy_split(root: Path, split: str, karpathy: Path) -> CaptionSplit:
    """One of Karpathy's train (with restval) / val / test splits; images at ROOT/<filepath>/<filename>."""
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"a Karpathy split is one of {sorted(KARPATHY_SPLITS)}, got {split!r}")
    if not karpathy.is_file():
        raise FileNotFoundError(f"no Karpathy split file at {karpathy}")
    entries = json.loads(karpathy.read_text(encoding="utf-8"))["images"]
    chosen = sorted((e for e in entries if e["split"] in KARPATHY_SPLITS[split]), key=lambda e: e["cocoid"])
    folders = {root / e["filepath"] for e in chosen}
    missing = sorted(str(f) for f in folders if not f.is_dir())
    if missing:
        raise FileNotFoundError(f"image folders named by {karpathy} are missing: {', '.join(missing)}")
    return CaptionSplit(
        split,
        [e["cocoid"] for e in chosen],
        [root / e["filepath"] / e["filename"] for e in chosen],
        [[s["raw"] for s in e["sentences"]] for e in chosen],
    )
