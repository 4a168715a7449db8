"""What the folder tests share: the mixed folder of images, the command run in-process and as a
real process, and torch's threads given back after each test."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli

RED = (220, 40, 40)


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The command sets torch's threads for its process: give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def picture(mode: str, size=(40, 30)) -> Image.Image:
    """A picture with some structure (so JPEG, palettes and 16 bits all have work to do)."""
    rng = np.random.default_rng(len(mode))
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "I;16":
        return Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    return rgb.convert(mode)


def _write_animated_gif(path: Path) -> None:
    frames = [Image.new("RGB", (40, 30), c).convert("P") for c in (RED, (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _write_rotated_jpeg(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: 40x30 stored, 30x40 shown
    picture("RGB").save(path, exif=exif)


# name -> (writer, (width, height) of the picture as the user sees it)
GOOD_IMAGES = {
    "rgb.jpg": (lambda p: picture("RGB").save(p, quality=90), (40, 30)),
    "gray.png": (lambda p: picture("L").save(p), (40, 30)),
    "rgba.png": (lambda p: picture("RGBA").save(p), (40, 30)),
    "la.png": (lambda p: picture("LA").save(p), (40, 30)),
    "palette.png": (lambda p: picture("P").save(p, transparency=0), (40, 30)),
    "cmyk.jpg": (lambda p: picture("CMYK").save(p), (40, 30)),
    "deep.png": (lambda p: picture("I;16").save(p), (40, 30)),
    "animated.gif": (_write_animated_gif, (40, 30)),
    "photo.webp": (lambda p: picture("RGB").save(p), (40, 30)),
    "bitmap.BMP": (lambda p: picture("RGB").save(p, format="BMP"), (40, 30)),
    "rotated.jpeg": (_write_rotated_jpeg, (30, 40)),
    "sub/inner.png": (lambda p: picture("RGB", (50, 20)).save(p), (50, 20)),
    "sub/deeper/last.jpg": (lambda p: picture("RGB", (20, 50)).save(p), (20, 50)),
    "inside_link.png": (None, (40, 30)),  # a symbolic link to rgba.png, inside the folder
}
FAILED = {"broken.jpg": "corrupt_image", "text.png": "unsupported_format"}
SKIPPED = {"notes.txt": "not_an_image", "outside_link.jpg": "outside_root"}
# the single-run order: every folder's entries sorted by name, subfolders entered where they sort
ORDER = [
    "animated.gif",
    "bitmap.BMP",
    "broken.jpg",
    "cmyk.jpg",
    "deep.png",
    "gray.png",
    "inside_link.png",
    "la.png",
    "notes.txt",
    "outside_link.jpg",
    "palette.png",
    "photo.webp",
    "rgb.jpg",
    "rgba.png",
    "rotated.jpeg",
    "sub/deeper/last.jpg",
    "sub/inner.png",
    "text.png",
]


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """Good images of every mode and format, broken ones, a non-image, links in and out, subfolders."""
    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    for name, (write, _) in GOOD_IMAGES.items():
        if write is not None:
            write(root / name)
    full = (root / "rgb.jpg").read_bytes()
    (root / "broken.jpg").write_bytes(full[: len(full) // 2])  # cut mid-scan
    (root / "text.png").write_text("not a picture at all")
    (root / "notes.txt").write_text("the photos from the trip")
    (root / "inside_link.png").symlink_to(root / "rgba.png")
    outside = tmp_path / "elsewhere.jpg"
    picture("RGB").save(outside)
    (root / "outside_link.jpg").symlink_to(outside)
    return root


def caption(*args) -> int:
    return cli.main(["caption", *map(str, args)])


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


BIN = Path(sys.executable).parent


def many_images(folder: Path, count: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        sub = folder / f"set{i % 3}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(sub / f"img_{i:04d}.png")
    (folder / "set0" / "readme.txt").write_text("not an image")
    return folder


def single_run(folder: Path, out: Path, *flags) -> str:
    assert cli.main(["caption", str(folder), "--out", str(out), *map(str, flags)]) == 0
    return out.read_text()


def start_midway(command: list[str], out: Path, lines: int = 5) -> subprocess.Popen:
    """The command, once `out` has `lines` lines, paused there: its process group (its worker
    processes too) is sent SIGSTOP, so it stays midway whatever the test does next and however
    slow the machine is (a run of 150 images takes a few seconds, as long as starting another
    command). SIGKILL ends it as it is; `resume` lets it go on, to see a signal sent meanwhile.
    With Ctrl-C's default meaning even where this test runs with SIGINT ignored (a background job
    of a shell does), which the command inherits."""
    process = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < lines):
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGSTOP)
    return process


def resume(process: subprocess.Popen) -> None:
    """Lets a command paused by start_midway go on."""
    os.killpg(process.pid, signal.SIGCONT)


def wait_for(process: subprocess.Popen) -> str:
    """Its stderr once it has exited; it and its workers are killed if it takes over a minute."""
    try:
        return process.communicate(timeout=60)[1].decode()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def slow_flags(checkpoint: Path) -> list:
    """Flags of a run slow enough to be stopped midway: beam 10 to 50 words, one image per batch,
    and two workers, which on a CPU are forked processes."""
    return [
        "-r",
        "--checkpoint",
        checkpoint,
        "--batch-size",
        "1",
        "--beam-size",
        "10",
        "--max-length",
        "50",
        "--threads",
        "1",
        "--workers",
        "2",
    ]


@pytest.fixture
def slow_run(tmp_path, tiny_checkpoint) -> tuple[Path, list, Path, list[str]]:
    """(folder, flags, out, command) of a run slow enough to be stopped midway: beam 10 to 50 words,
    one image per batch, and two workers, which on a CPU are forked processes."""
    folder = many_images(tmp_path / "photos", 150)
    flags = slow_flags(tiny_checkpoint)
    out = tmp_path / "captions.jsonl"
    return folder, flags, out, [str(BIN / "captioner"), "caption", str(folder), "--out", str(out), *map(str, flags)]
