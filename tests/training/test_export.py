"""`captioner export`, run as a user runs it: the checkpoint it writes captions like the one it
read (fp32 exactly), says what its encoder is, and bad requests are refused before any work."""

import json
import sys

import pytest
from PIL import Image
from safetensors import safe_open

from captioner.predictor import Predictor
from tests.conftest import assert_same_captions, run_command
from training.export import calibration_files

pytestmark = pytest.mark.slow
CAPTIONER = [sys.executable, "-m", "cli"]


@pytest.fixture
def photos(tmp_path):
    """Eight small pictures, each its own colour and a square in its own place, one in a subfolder."""
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    for i in range(8):
        image = Image.new("RGB", (80, 60), (30 * i, 255 - 30 * i, 90))
        image.paste((255, 255, 0), (5 * i, 4 * i, 5 * i + 20, 4 * i + 20))
        image.save(folder / ("more" if i == 7 else "") / f"p{i}.png")
    return folder


def captions(checkpoint, photos, out, backend) -> list[dict]:
    result = run_command(
        [*CAPTIONER, "caption", str(photos), "-r", "--checkpoint", str(checkpoint), "--out", str(out)]
        + ["--backend", backend, "--num-captions", "3", "--attention"]
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_an_exported_checkpoint_captions_on_onnxruntime_as_the_original_does_on_torch(
    tiny_checkpoint, photos, tmp_path
):
    exported = tmp_path / "onnx.safetensors"
    result = run_command([*CAPTIONER, "export", str(tiny_checkpoint), "--out", str(exported)])
    assert result.returncode == 0, result.stderr
    assert f"wrote {exported}: the encoder in ONNX (fp32" in result.stdout
    assert Predictor.from_checkpoint(exported).runtime == {
        "backend": "onnxruntime",
        "precision": "fp32",
        "device": "cpu",
    }
    on_torch = captions(tiny_checkpoint, photos, tmp_path / "torch.jsonl", "torch")
    on_onnxruntime = captions(exported, photos, tmp_path / "onnx.jsonl", "onnxruntime")
    assert len(on_torch) == 8
    assert_same_captions(on_onnxruntime, on_torch)


def test_an_int8_export_is_calibrated_on_the_folders_images_and_says_so(tiny_checkpoint, photos, tmp_path):
    (photos / "notes.txt").write_text("not an image")
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    exported = tmp_path / "int8.safetensors"
    command = [*CAPTIONER, "export", str(tiny_checkpoint), "--out", str(exported), "--int8"]
    result = run_command(command + ["--calibration", str(photos), "--calibration-method", "percentile"])
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stderr and "broken.png" in result.stderr
    assert "calibrating int8 on 8 images" in result.stderr
    predictor = Predictor.from_checkpoint(exported)
    assert (
        predictor.runtime
        == predictor.info()["runtime"]
        == {"backend": "onnxruntime", "precision": "int8", "device": "cpu"}
    )
    with safe_open(str(exported), framework="pt") as f:
        described = json.loads(f.metadata()["onnx_encoder"])
    assert described["precision"] == "int8" and described["calibration"] == "percentile"
    (photos / "broken.png").unlink()
    lines = captions(exported, photos, tmp_path / "int8.jsonl", "auto")
    assert sum("captions" in line for line in lines) == 8 and len(lines) == 9  # notes.txt: skipped


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--int8"], "--int8 needs --calibration DIR"),
        (["--calibration", "."], "--calibration and --keep-fp32 are for --int8"),
        (["--int8", "--calibration", "no/such/folder"], "no folder at no/such/folder"),
        (["--int8", "--calibration", "EMPTY"], "no readable calibration image"),
    ],
)
def test_bad_requests_are_refused_with_status_2_and_nothing_written(tiny_checkpoint, tmp_path, flags, message):
    (tmp_path / "empty").mkdir()
    flags = [str(tmp_path / "empty") if flag == "EMPTY" else flag for flag in flags]
    out = tmp_path / "out.safetensors"
    result = run_command([*CAPTIONER, "export", str(tiny_checkpoint), "--out", str(out), *flags])
    assert result.returncode == 2 and message in result.stderr
    assert not out.exists()


def test_the_checkpoint_itself_cannot_be_the_output(tiny_checkpoint):
    before = tiny_checkpoint.read_bytes()
    result = run_command([*CAPTIONER, "export", str(tiny_checkpoint), "--out", str(tiny_checkpoint)])
    assert result.returncode == 2 and "--out must be a new file" in result.stderr
    assert tiny_checkpoint.read_bytes() == before


def test_calibration_images_are_picked_evenly_from_the_sorted_list(tmp_path):
    for i in range(10):
        (tmp_path / f"{i:02d}.jpg").touch()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.PNG").touch()
    (tmp_path / "readme.md").touch()
    # 11 images, sorted: 00.jpg ... 09.jpg, sub/x.PNG; the 0th, 2nd, 5th and 8th of them
    assert [p.name for p in calibration_files(tmp_path, 4)] == ["00.jpg", "02.jpg", "05.jpg", "08.jpg"]
    assert len(calibration_files(tmp_path, 100)) == 11
