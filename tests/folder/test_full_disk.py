"""`captioner caption` on a full disk: one line naming the file, exit status 1, and a rerun once
there is room captions every image exactly once.

The command runs as a real process under a file-size limit (`ulimit -f`), which fails a write
part-way with EFBIG as a full file system fails it with ENOSPC, and needs no privileges.
"""

import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_command
from tests.folder.conftest import BIN, many_images, read_lines, single_run

TOO_LARGE = "file too large writing {}: raise the file size limit (ulimit -f) or write to another file system"
RERUN = "run the same command again to resume"


def assert_reported(run: subprocess.CompletedProcess, path: Path) -> None:
    """Exit status 1 and the one line: no traceback, nor death by SIGXFSZ (-25)."""
    assert run.returncode == 1, run.stderr
    assert run.stderr.splitlines() == [f"captioner caption: error: {TOO_LARGE.format(path)} and {RERUN}"]


@pytest.mark.slow
def test_a_full_journal_is_one_line_and_the_rerun_captions_every_image_once(tmp_path, tiny_checkpoint):
    folder = many_images(tmp_path / "photos", 60)
    flags = ["-r", "--checkpoint", tiny_checkpoint, "--batch-size", "4", "--workers", "2", "--threads", "1"]
    reference = single_run(folder, tmp_path / "reference.jsonl", *flags)
    out = tmp_path / "captions.jsonl"
    command = [str(BIN / "captioner"), "caption", str(folder), "--out", str(out), *map(str, flags)]

    full = run_command(command, limit=len(reference.encode()) // 2)  # the journal fills up halfway
    assert_reported(full, out)
    whole = out.read_bytes().count(b"\n")
    assert 0 < whole < 61, "the run did not stop part-way"

    resumed = run_command(command)
    assert resumed.returncode == 0, resumed.stderr
    assert f"already done {whole}" in resumed.stderr  # the torn last line, if any, was cut and redone
    assert out.read_text() == reference


@pytest.mark.slow
def test_a_full_disk_met_by_an_overlay_in_a_worker_leaves_no_half_sheet(tmp_path, tiny_checkpoint):
    folder = many_images(tmp_path / "photos", 8)
    out, sheets = tmp_path / "captions.jsonl", tmp_path / "sheets"
    flags = ["-r", "--checkpoint", tiny_checkpoint, "--batch-size", "2", "--workers", "2", "--threads", "1"]
    command = [str(BIN / "captioner"), "caption", str(folder), "--out", str(out), "--overlays", str(sheets)]
    command += map(str, flags)

    full = run_command(command, limit=20_000)  # a sheet is larger; the journal's lines and the settings are not
    assert_reported(full, sheets / "set0" / "img_0000.png.png")  # the first image's, from a forked lane
    assert [p for p in sheets.rglob("*") if not p.is_dir()] == [], "a half-written sheet or temporary was left"

    resumed = run_command(command)
    assert resumed.returncode == 0, resumed.stderr
    names = [line["file"] for line in read_lines(out)]
    images = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))
    assert sorted(n for n in names if n.endswith(".png")) == images  # each once
    assert sorted(str(p.relative_to(sheets)) for p in sheets.rglob("*.png")) == [f"{n}.png" for n in images]
