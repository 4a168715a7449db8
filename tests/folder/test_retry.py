"""--retry-failed: the images whose lines are errors are captioned again and their lines replaced,
one line per file in run order, in every format, and a retry that was killed resumes."""

import csv
import signal
import subprocess
from pathlib import Path

import pytest

from tests.folder.conftest import (
    BIN,
    caption,
    many_images,
    picture,
    read_lines,
    single_run,
    slow_flags,
    start_midway,
    wait_for,
)


def break_image(path: Path) -> bytes:
    """Cut `path` mid-scan, as a copy interrupted midway leaves it; returns what it held."""
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    return whole


@pytest.fixture
def small_folder(tmp_path) -> Path:
    root = tmp_path / "photos"
    root.mkdir()
    for name in ("a.jpg", "b.jpg", "d.jpg"):
        picture("RGB").save(root / name)
    (root / "c.txt").write_text("not an image")
    return root


def test_failed_images_are_captioned_again_and_their_lines_replaced(small_folder, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    flags = ("--checkpoint", tiny_checkpoint, "--method", "greedy", "--batch-size", "1")
    args = (small_folder, "--out", out, *flags)
    whole = break_image(small_folder / "b.jpg")
    assert caption(*args) == 1
    assert read_lines(out)[1]["error"]["code"] == "corrupt_image"
    (small_folder / "b.jpg").write_bytes(whole)  # the copy finished
    capsys.readouterr()

    assert caption(*args) == 1  # a plain rerun keeps the error line
    assert "already done 4" in capsys.readouterr().err
    assert caption(*args, "--retry-failed") == 0
    assert "captioned 1, failed 0, skipped 0, already done 3" in capsys.readouterr().err
    lines = read_lines(out)
    assert [line["file"] for line in lines] == ["a.jpg", "b.jpg", "c.txt", "d.jpg"]  # one each, in run order
    assert lines[1]["captions"][0]["text"] and lines[2]["error"]["code"] == "not_an_image"  # skips stay
    assert out.read_text() == single_run(small_folder, tmp_path / "reference.jsonl", *flags)


def test_an_image_that_fails_again_keeps_one_error_line_and_csv_one_row(
    small_folder, tiny_checkpoint, tmp_path, capsys
):
    out = tmp_path / "captions.csv"
    args = (small_folder, "--checkpoint", tiny_checkpoint, "--out", out, "--method", "greedy")
    break_image(small_folder / "b.jpg")
    assert caption(*args) == 1
    (small_folder / "b.jpg").write_text("still not a picture")
    capsys.readouterr()
    assert caption(*args, "--retry-failed") == 1
    assert "captioned 0, failed 1, skipped 0, already done 3" in capsys.readouterr().err
    journal = read_lines(tmp_path / "captions.csv.jsonl")
    assert [line["file"] for line in journal] == ["a.jpg", "b.jpg", "c.txt", "d.jpg"]
    assert journal[1]["error"]["code"] == "unsupported_format"  # the retry's error, not the first one
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(row["file"], row["error_code"]) for row in rows] == [
        ("a.jpg", ""),
        ("b.jpg", "unsupported_format"),
        ("c.txt", "not_an_image"),
        ("d.jpg", ""),
    ]


def test_retrying_is_no_merge(small_folder, tmp_path, capsys):
    assert caption(small_folder, "--out", tmp_path / "o.jsonl", "--merge", tmp_path / "p.jsonl", "--retry-failed") == 2
    assert "--merge captions nothing" in capsys.readouterr().err


@pytest.mark.slow
def test_a_killed_retry_resumes_to_the_output_of_one_clean_run(tmp_path, tiny_checkpoint):
    folder = many_images(tmp_path / "photos", 60)
    flags = slow_flags(tiny_checkpoint)
    images = sorted(folder.rglob("*.png"))
    wholes = {path: break_image(path) for path in images[::2]}  # every other image fails
    out = tmp_path / "captions.jsonl"
    command = [str(BIN / "captioner"), "caption", str(folder), "--out", str(out), *map(str, flags)]
    assert subprocess.run(command, capture_output=True).returncode == 1
    first = out.read_text().count("\n")
    for path, whole in wholes.items():
        path.write_bytes(whole)

    retry = start_midway([*command, "--retry-failed"], out, lines=first + 5)
    retry.send_signal(signal.SIGKILL)
    wait_for(retry)
    retried = out.read_text().count("\n") - first
    assert 5 <= retried < len(wholes), "the retry was not killed midway"

    resumed = subprocess.run([*command, "--retry-failed"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"captioned {len(wholes) - retried}, failed 0" in resumed.stderr
    assert out.read_text() == single_run(folder, out.with_name("reference.jsonl"), *flags)
