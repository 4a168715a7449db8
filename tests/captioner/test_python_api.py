"""The library from Python: the names `captioner` exports, that importing it imports no torch, and
docs/python.md's examples run as written, in order, as one reader's session.

The examples load `runtime.home.default_checkpoint()`: here $CAPTIONER_HOME makes that the tiny
checkpoint with an ONNX encoder (the demo's model carries one too), and every picture they name is
made in the directory they run in.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import captioner

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "python.md"
FENCE = re.compile(r"^```python\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
PICTURE = re.compile(r"[\"']([\w/.-]+\.(?:jpg|jpeg|png|webp|gif|bmp))[\"']")


def python_blocks() -> list[str]:
    return FENCE.findall(PAGE.read_text(encoding="utf-8"))


def run_python(code: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=environment, capture_output=True, text=True, timeout=300
    )


def test_every_public_name_imports():
    assert sorted(captioner.__all__) == ["DecodeOptions", "ImageError", "Predictor", "heatmap_overlay"]
    namespace: dict = {}
    exec("from captioner import *", namespace)
    assert set(captioner.__all__) <= set(namespace)
    from captioner.decoding import DecodeOptions
    from captioner.images import ImageError
    from captioner.overlay import heatmap_overlay
    from captioner.predictor import Predictor

    assert (captioner.DecodeOptions, captioner.ImageError, captioner.Predictor, captioner.heatmap_overlay) == (
        DecodeOptions,
        ImageError,
        Predictor,
        heatmap_overlay,
    )
    assert set(captioner.__all__) <= set(dir(captioner))
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        captioner.Nothing  # noqa: B018


def test_importing_the_package_imports_no_torch(tmp_path):
    code = (
        "import json, sys, captioner; "
        "print(json.dumps([m for m in ('torch', 'numpy', 'PIL', 'pydantic', 'onnxruntime') if m in sys.modules]))"
    )
    done = run_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_the_page_has_the_examples_this_test_relies_on():
    blocks = python_blocks()
    assert len(blocks) >= 5
    assert "default_checkpoint()" in blocks[0]
    assert any("heatmap_overlay(" in block for block in blocks)


@pytest.mark.slow  # a real interpreter importing torch and ONNX Runtime: 10 s and more
def test_the_pages_examples_run_as_written(tiny_onnx_checkpoint, tmp_path):
    home = tmp_path / "home"
    (home / "demo").mkdir(parents=True)
    (home / "demo" / "model.safetensors").symlink_to(tiny_onnx_checkpoint)
    work = tmp_path / "work"
    code = "\n\n".join(python_blocks())
    for name in sorted(set(PICTURE.findall(code))):
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (320, 240), (200, 60, 40)).save(path)

    done = run_python(code, work, {"CAPTIONER_HOME": str(home)})
    print(done.stdout)  # shown when the test fails: how far the examples got

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # What the comments on the page say the examples print.
    assert "unsupported_format" in done.stdout
    assert "{'backend': 'onnxruntime', 'precision': 'fp32', 'device': 'cpu'}" in lines
    assert "{'backend': 'torch', 'precision': 'fp32', 'device': 'cpu'}" in lines
    assert sum(line.startswith("320 x 240: ") for line in lines) == 3  # a path, bytes, a PIL image
    assert any(re.fullmatch(r"\S+: most on row \d+, column \d+ of 8 x 8", line) for line in lines)
    with Image.open(next(work.glob("*.png"))) as overlay:
        assert overlay.size == (320, 240)
