"""Bad images are found before the long work: each named by its path, with a count; training and
evaluation stop with exit 2 (no traceback), or leave them out when asked and say so.

The data is real: the tiny Shapes world re-saved in MS COCO's layout as JPEGs, one of them deleted
and one cut short (tests/training/conftest.py, `dirty_coco`).
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli
from captioner.checkpoint import load_checkpoint
from captioner.images import ImageError, ImageLimits, ImagePreset
from training.coco import load_split
from training.features import ImageFiles
from training.image_check import find_bad_images, usable_split

pytestmark = pytest.mark.usefixtures("one_thread")

BIN = Path(sys.executable).parent
HEADER = "cannot read the image header: Truncated File Read"
TINY = ["--encoder", "tiny", "--embed-dim", "16", "--region-dim", "16", "--hidden-dim", "32", "--attention-dim", "16"]


def jpeg(size: int = 64) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def train_args(data: Path, tmp_path: Path) -> list[str]:
    return [
        "train",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--threads",
        "1",
        "--workers",
        "0",
        "--no-progress",
        "--cache-dir",
        str(tmp_path / "features"),
        *TINY,
    ]


def test_each_bad_image_is_found_with_why(tmp_path):
    files = {
        "good.jpg": jpeg(10),
        "empty.jpg": b"",
        "text.jpg": b"not a picture at all",
        "cut.jpg": jpeg()[:30],
        "large.png": None,
    }
    for name, data in files.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    Image.new("RGB", (20, 10)).save(tmp_path / "large.png")
    paths = [tmp_path / n for n in ["good.jpg", "gone.jpg", "empty.jpg", "text.jpg", "cut.jpg", "large.png"]]
    bad = find_bad_images(paths, ImageLimits(max_pixels=150, formats=("JPEG", "PNG")), threads=3)
    assert bad == {
        tmp_path / "gone.jpg": "missing",
        tmp_path / "empty.jpg": "empty file",
        tmp_path / "text.jpg": "not an image Pillow can identify",
        tmp_path / "cut.jpg": HEADER,
        tmp_path / "large.png": "20x10 is over the limit of 150 pixels",
    }
    assert list(bad) == paths[1:]  # in the split's order
    assert find_bad_images([tmp_path / "large.png"], ImageLimits(formats=("JPEG",))) == {
        tmp_path / "large.png": "PNG images are not accepted; use one of JPEG"
    }


def test_a_split_without_its_bad_images_keeps_the_rest_in_order(dirty_coco):
    split = load_split(dirty_coco.root, "train")
    bad = find_bad_images(split.image_paths)
    assert bad == {dirty_coco.missing: "missing", dirty_coco.corrupt: HEADER}
    kept = usable_split(split, bad, skip=True)
    assert kept.image_ids == [i for i in split.image_ids if i not in (3, 5)]
    assert kept.captions == [c for i, c in zip(split.image_ids, split.captions) if i not in (3, 5)]
    assert kept.skipped == {str(dirty_coco.missing): "missing", str(dirty_coco.corrupt): HEADER}
    assert usable_split(kept, {}, skip=False) is kept


def test_training_on_bad_images_stops_before_any_work_naming_each(dirty_coco, tmp_path, capsys):
    assert cli.main(train_args(dirty_coco.root, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "captioner train: error: 2 of 24 images of split 'train' cannot be used:",
        f"  {dirty_coco.missing}: missing",
        f"  {dirty_coco.corrupt}: {HEADER}",
        "fix or remove them, or leave them out with --skip-bad-images",
    ]
    assert not (tmp_path / "features").exists()  # no feature cache was started
    assert not (tmp_path / "run" / "last.pt").exists()


def test_captioner_train_on_bad_images_exits_2_without_a_traceback(dirty_coco, tmp_path):
    done = subprocess.run(
        [str(BIN / "captioner"), *train_args(dirty_coco.root, tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"{dirty_coco.corrupt}: {HEADER}" in done.stderr and f"{dirty_coco.missing}: missing" in done.stderr


def test_skip_bad_images_trains_without_them_and_the_card_lists_them(dirty_coco, tmp_path, capsys):
    assert cli.main([*train_args(dirty_coco.root, tmp_path), "--skip-bad-images"]) == 0
    out = capsys.readouterr().out
    assert f"left out 2 bad images of split 'train':\n  {dirty_coco.missing}: missing\n" in out
    _, card = load_checkpoint(tmp_path / "run" / "best.safetensors")
    data = card["training_data"]
    assert data["train_images"] == 22
    assert data["skipped_images"] == {
        "train": {"count": 2, "images": {str(dirty_coco.missing): "missing", str(dirty_coco.corrupt): HEADER}}
    }
    assert card["train_config"]["skip_bad_images"] is True
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 3  # 22 images, 8 per step


def test_a_clean_data_set_skips_nothing(shapes_root, tmp_path):
    assert cli.main([*train_args(shapes_root, tmp_path), "--skip-bad-images"]) == 0
    _, card = load_checkpoint(tmp_path / "run" / "best.safetensors")
    assert card["training_data"]["skipped_images"] == {}
    assert card["training_data"]["train_images"] == 24


def test_evaluating_bad_images_stops_before_decoding_naming_each(tiny_checkpoint, dirty_coco, tmp_path, capsys):
    out = tmp_path / "eval"
    code = cli.main(
        ["evaluate", str(tiny_checkpoint), "--data", str(dirty_coco.root), "--split", "train", "--out", str(out)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("captioner evaluate: error: 2 of 24 images of split 'train' cannot be used:\n")
    assert f"  {dirty_coco.missing}: missing\n  {dirty_coco.corrupt}: {HEADER}\n" in err
    assert "--skip-bad-images" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_evaluate_with_skip_bad_images_scores_the_rest(tiny_checkpoint, dirty_coco, tmp_path, capsys):
    out = tmp_path / "eval"
    code = cli.main(
        [
            "evaluate",
            str(tiny_checkpoint),
            "--data",
            str(dirty_coco.root),
            "--split",
            "train",
            "--max-length",
            "5",
            "--out",
            str(out),
            "--skip-bad-images",
        ]
    )
    assert code == 0
    results = json.loads((out / "results_train.json").read_text())
    assert [r["image_id"] for r in results] == [i for i in range(1, 25) if i not in (3, 5)]
    captured = capsys.readouterr()
    assert f"left out 2 bad images of split 'train':\n  {dirty_coco.missing}: missing" in captured.err
    assert "(22 images, 2 bad ones left out, beam)" in captured.out


def test_an_image_that_fails_to_decode_later_is_named(tmp_path):
    """A header that reads but pixels cut short passes the cheap check; decoding it names the file."""
    path = tmp_path / "cut-in-the-pixels.jpg"
    data = jpeg(256)
    path.write_bytes(data[: len(data) // 2])
    assert find_bad_images([path]) == {}
    with pytest.raises(ImageError, match=f"^{path}: cannot decode the image"):
        ImageFiles([path], ImagePreset(64, (0.5,) * 3, (0.5,) * 3))[0]
