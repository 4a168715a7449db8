"""Fixtures for the training loop's tests: a tiny Shapes world and the tiny (random, real) encoder.

The tiny encoder reads 64 px images and gives an 8 x 8 grid of 32 channels, so a
whole training run on 24 images takes about a second. Nothing is mocked: the
runs below are `training.train.train` itself, on real PNG files.
"""

import json
import shutil
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from PIL import Image

from captioner.config import ModelConfig
from training.shapes import generate
from training.train import TrainConfig

SMALL_MODEL = ModelConfig(encoder="tiny", embed_dim=32, region_dim=32, hidden_dim=64, attention_dim=32, dropout=0.0)


@pytest.fixture
def one_thread(monkeypatch, tmp_path):
    """One torch thread (the machine has 2 busy cores, where extra OpenMP threads are 100x slower)
    and a private CAPTIONER_HOME, so nothing is written to ~/.cache. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("CAPTIONER_HOME", str(tmp_path / "captioner-home"))
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """A tiny Shapes world: 24 train and 8 val images, 5 captions each; plus `one`, a split of
    the first 4 train images with one caption each (a set a model can learn by heart)."""
    root = tmp_path_factory.mktemp("shapes")
    generate(root, {"train": 24, "val": 8}, seed=0, workers=1)
    add_one_caption_split(root, "train", "one", 4)
    return root


def add_one_caption_split(root: Path, source: str, name: str, count: int) -> None:
    """ROOT/annotations/captions_<name>.json + ROOT/images/<name>/: the first `count` images of
    `source`, each with only its first caption (no instances file: no truth metrics)."""
    data = json.loads((root / "annotations" / f"captions_{source}.json").read_text())
    images = sorted(data["images"], key=lambda i: i["id"])[:count]
    kept = {i["id"] for i in images}
    first = {}
    for a in sorted(data["annotations"], key=lambda a: a["id"]):
        if a["image_id"] in kept:
            first.setdefault(a["image_id"], a)
    (root / "annotations" / f"captions_{name}.json").write_text(
        json.dumps({**data, "images": images, "annotations": list(first.values())})
    )
    folder = root / "images" / name
    folder.mkdir(parents=True, exist_ok=True)
    for image in images:
        shutil.copy2(root / "images" / source / image["file_name"], folder / image["file_name"])


def coco_layout(shapes_root: Path, root: Path) -> Path:
    """The tiny Shapes world in MS COCO 2017's own layout, as real data comes: JPEGs in ROOT/train2017/
    and ROOT/val2017/, captions in ROOT/annotations/captions_{train,val}2017.json (no instances file)."""
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        data = json.loads((shapes_root / "annotations" / f"captions_{split}.json").read_text())
        folder = root / f"{split}2017"
        folder.mkdir()
        for image in data["images"]:
            name = Path(image["file_name"]).with_suffix(".jpg").name
            Image.open(shapes_root / "images" / split / image["file_name"]).convert("RGB").save(
                folder / name, quality=90
            )
            image["file_name"] = name
        (root / "annotations" / f"captions_{split}2017.json").write_text(json.dumps(data))
    return root


class DirtyData(NamedTuple):
    root: Path
    missing: Path  # a listed image deleted from disk
    corrupt: Path  # a listed JPEG cut short inside its header


@pytest.fixture(scope="session")
def dirty_coco(shapes_root, tmp_path_factory) -> DirtyData:
    """The tiny Shapes world in the COCO layout with two bad training images of 24: the 3rd deleted,
    the 5th cut to its first 30 bytes (Pillow: "Truncated File Read" reading its header)."""
    root = coco_layout(shapes_root, tmp_path_factory.mktemp("dirty-coco"))
    data = json.loads((root / "annotations" / "captions_train2017.json").read_text())
    names = [i["file_name"] for i in sorted(data["images"], key=lambda i: i["id"])]
    missing, corrupt = root / "train2017" / names[2], root / "train2017" / names[4]
    missing.unlink()
    corrupt.write_bytes(corrupt.read_bytes()[:30])
    return DirtyData(root, missing, corrupt)


def train_config(data: Path, out: Path, **overrides) -> TrainConfig:
    """Quick, quiet, single-threaded settings; the feature cache goes beside the run."""
    fields = dict(
        data=str(data),
        out=str(out),
        epochs=2,
        batch_size=8,
        captions_per_image=5,
        lr=0.01,
        warmup_steps=0,
        threads=1,
        workers=0,
        progress=False,
        patience=100,
        cache_dir=str(Path(out).parent / "features"),
    )
    return TrainConfig(**{**fields, **overrides})


def small_model(**overrides) -> ModelConfig:
    return ModelConfig(**{**SMALL_MODEL.model_dump(), **overrides})
