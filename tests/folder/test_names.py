"""File names that are not UTF-8 (b"caf\\xe9.jpg", as Latin-1 systems write them) through every
output format, sharding, merging, resuming and retrying."""

import csv
import json
import os
import sys
from pathlib import Path

import pytest

from folder.journal import settings_path
from tests.folder.conftest import caption, picture

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux file names are bytes; others are text")

RAW_NAMES = [b"caf\xe9_000001.jpg", b"na\xefve/\xe9t\xe9_000002.png", b"plain_000003.jpg"]
NAMES = [os.fsdecode(raw) for raw in RAW_NAMES]
BROKEN = os.fsdecode(b"cass\xe9_000004.jpg")
ORDER = [NAMES[0], BROKEN, NAMES[1], NAMES[2]]  # sorted by name, a folder where its name sorts


@pytest.fixture
def latin1_folder(tmp_path) -> Path:
    """Images named in Latin-1, one of them in a folder so named, and a broken one."""
    root = tmp_path / "photos"
    for name in NAMES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        picture("RGB").save(root / name, format="PNG" if name.endswith(".png") else "JPEG")
    (root / BROKEN).write_bytes(b"\xff\xd8\xff")
    return root


def common(checkpoint) -> tuple:
    return ("-r", "--checkpoint", checkpoint, "--method", "greedy", "--batch-size", "1")


def test_names_round_trip_through_json_lines(latin1_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "captions.jsonl"
    assert caption(latin1_folder, "--out", out, *common(tiny_checkpoint)) == 1  # the broken one
    text = out.read_text(encoding="utf-8")  # the journal is UTF-8 throughout: the bytes are escapes
    assert '"file":"caf\\udce9_000001.jpg"' in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["file"] for line in lines] == ORDER
    for line in lines:
        assert (latin1_folder / line["file"]).is_file()  # the name opens the very file
        assert ("error" in line) == (line["file"] == BROKEN)
    assert os.fsencode(lines[0]["file"]) == RAW_NAMES[0]


def test_names_round_trip_through_csv_as_their_bytes(latin1_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "captions.csv"
    assert caption(latin1_folder, "--out", out, *common(tiny_checkpoint)) == 1
    assert b"\ncaf\xe9_000001.jpg,1," in out.read_bytes()
    with open(out, newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.DictReader(f))
    assert [row["file"] for row in rows] == ORDER
    assert [bool(row["error_code"]) for row in rows] == [False, True, False, False]


def test_names_give_coco_ids(latin1_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "results.json"
    assert caption(latin1_folder, "--out", out, "--format", "coco", *common(tiny_checkpoint)) == 1
    assert sorted(result["image_id"] for result in json.loads(out.read_text())) == [1, 2, 3]


def test_names_are_sharded_merged_and_resumed(latin1_folder, tiny_checkpoint, tmp_path, capsys):
    single = tmp_path / "single.jsonl"
    caption(latin1_folder, "--out", single, *common(tiny_checkpoint))
    parts = [tmp_path / f"part{i}.jsonl" for i in range(3)]
    for i, part in enumerate(parts):
        caption(latin1_folder, "--out", part, "--shard", f"{i}/3", *common(tiny_checkpoint))
    owned = [[json.loads(line)["file"] for line in part.read_text().splitlines()] for part in parts]
    assert sorted(name for names in owned for name in names) == sorted(ORDER)  # each on one shard
    assert sum(bool(names) for names in owned) >= 2  # the parts really split the names

    merged = tmp_path / "merged.jsonl"
    assert caption(latin1_folder, "-r", "--out", merged, "--merge", *parts) == 1
    assert merged.read_text() == single.read_text()
    assert settings_path(merged).read_text() == settings_path(single).read_text()

    lines = single.read_text().splitlines(keepends=True)
    single.write_text("".join(lines[:2]) + lines[2][:30])  # killed while writing a non-UTF-8 name's line
    capsys.readouterr()
    caption(latin1_folder, "--out", single, *common(tiny_checkpoint))
    assert "already done 2" in capsys.readouterr().err
    assert single.read_text() == "".join(lines)


def test_names_are_retried(latin1_folder, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "captions.csv"
    assert caption(latin1_folder, "--out", out, *common(tiny_checkpoint)) == 1
    picture("RGB").save(latin1_folder / BROKEN, format="JPEG")
    capsys.readouterr()
    assert caption(latin1_folder, "--out", out, "--retry-failed", *common(tiny_checkpoint)) == 0
    assert "captioned 1, failed 0, skipped 0, already done 3" in capsys.readouterr().err
    with open(out, newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.DictReader(f))
    assert [row["file"] for row in rows] == ORDER and all(row["caption"] for row in rows)
