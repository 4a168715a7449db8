"""`captioner caption` on real files with the real tiny model, run in-process through the CLI."""

import csv
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.checkpoint import save_checkpoint
from captioner.decoding import DecodeOptions
from captioner.encoder import Encoder
from captioner.images import ImageError
from captioner.predictor import Predictor
from folder.files import Entry, Shard, find_entries
from folder.journal import coco_image_ids, recover, settings_path
from folder.pipeline import MIN_TAIL_BATCH, _segments
from tests.conftest import talkative_tiny_model
from tests.folder.conftest import FAILED, GOOD_IMAGES, ORDER, SKIPPED, caption, picture, read_lines


def test_every_file_gets_one_line_in_walk_order(mixed_folder, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    status = caption(
        mixed_folder,
        "--recursive",
        "--checkpoint",
        tiny_checkpoint,
        "--out",
        out,
        "--method",
        "greedy",
        "--attention",
        "--batch-size",
        "4",
    )
    assert status == 1  # two images failed
    lines = read_lines(out)
    assert [line["file"] for line in lines] == ORDER
    for line in lines:
        name = line["file"]
        if name in GOOD_IMAGES:
            assert (line["width"], line["height"]) == GOOD_IMAGES[name][1], name
            assert line["method"] == "greedy" and line["attention_grid"] == [8, 8]
            [best] = line["captions"]
            assert best["text"] == " ".join(best["tokens"])
            assert len(best["attention"]) == len(best["tokens"])
            for grid in best["attention"]:
                assert np.asarray(grid).shape == (8, 8)
                assert abs(np.sum(grid) - 1.0) < 1e-3
        else:
            assert set(line) == {"file", "error"}, name
            assert line["error"]["code"] == {**FAILED, **SKIPPED}[name]
            assert line["error"]["message"]
    summary = capsys.readouterr().err
    assert "captioned 14, failed 2, skipped 2" in summary


def test_names_in_any_script_and_names_that_are_not_utf8_are_written_and_resumed(tiny_checkpoint, tmp_path, capsys):
    root = tmp_path / "photos"
    root.mkdir()
    names = ["café 東京.jpg", os.fsdecode(b"raw\xff.jpg")]  # the second: bytes no encoding reads
    for name in names:
        picture("RGB").save(root / name, format="JPEG")
    out = tmp_path / "captions.jsonl"
    assert caption(root, "--checkpoint", tiny_checkpoint, "--out", out) == 0
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(line["file"] for line in lines) == sorted(names)
    assert all(line["captions"][0]["text"] for line in lines)
    assert caption(root, "--checkpoint", tiny_checkpoint, "--out", out) == 0
    assert "captioned 0, failed 0, skipped 0, already done 2" in capsys.readouterr().err


def test_without_recursive_subfolders_are_left_out(mixed_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "captions.jsonl"
    caption(mixed_folder, "--checkpoint", tiny_checkpoint, "--out", out, "--method", "greedy")
    assert [line["file"] for line in read_lines(out)] == [n for n in ORDER if not n.startswith("sub/")]


def test_links_out_of_the_folder_are_read_when_asked(mixed_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "captions.jsonl"
    caption(
        mixed_folder / "outside_link.jpg",
        mixed_folder / "rgb.jpg",
        "--checkpoint",
        tiny_checkpoint,
        "--out",
        out,
        "--method",
        "greedy",
        "--follow-links",
    )
    lines = read_lines(out)
    assert [line["file"] for line in lines] == ["outside_link.jpg", "rgb.jpg"]  # files given: their names
    assert all("captions" in line for line in lines)


def test_results_are_the_predictors(mixed_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "captions.jsonl"
    status = caption(
        mixed_folder / "rgb.jpg",
        mixed_folder / "sub",
        "--checkpoint",
        tiny_checkpoint,
        "--out",
        out,
        "--beam-size",
        "3",
        "--num-captions",
        "2",
        "--batch-size",
        "1",
    )
    assert status == 0
    lines = read_lines(out)
    assert [line["file"] for line in lines] == ["rgb.jpg", "inner.png"]  # relative to the folder given
    predictor = Predictor.from_checkpoint(tiny_checkpoint)
    for line, path in zip(lines, [mixed_folder / "rgb.jpg", mixed_folder / "sub" / "inner.png"]):
        [expected] = predictor.caption([path], DecodeOptions(beam_size=3, num_captions=2))
        assert [c["text"] for c in line["captions"]] == [c["text"] for c in expected["captions"]]
        assert [c["log_prob"] for c in line["captions"]] == pytest.approx(
            [c["log_prob"] for c in expected["captions"]], abs=1e-3
        )
        assert "attention" not in line["captions"][0]


def test_a_torn_last_line_is_cut_and_its_image_redone(mixed_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "captions.jsonl"
    args = (mixed_folder, "--checkpoint", tiny_checkpoint, "--out", out, "--method", "greedy", "--batch-size", "1")
    caption(*args)
    complete = out.read_text()
    lines = complete.splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][:25])  # killed while writing the fourth line
    assert recover(out).done == {json.loads(line)["file"] for line in lines[:3]}
    assert out.read_text() == "".join(lines[:3])
    caption(*args)
    assert out.read_text() == complete


def test_a_rerun_of_a_finished_run_does_nothing(mixed_folder, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    args = (mixed_folder, "--checkpoint", tiny_checkpoint, "--out", out, "--method", "greedy")
    caption(*args)
    first = out.read_text()
    capsys.readouterr()
    assert caption(*args) == 1  # the broken images are still in the output
    assert out.read_text() == first
    assert "captioned 0, failed 0, skipped 0, already done 16" in capsys.readouterr().err


def test_an_output_that_is_not_ours_is_refused(mixed_folder, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    out.write_text("file,caption\nrgb.jpg,a photo\n")
    assert caption(mixed_folder, "--checkpoint", tiny_checkpoint, "--out", out) == 2
    assert "not a captioner result" in capsys.readouterr().err
    assert out.read_text() == "file,caption\nrgb.jpg,a photo\n"


def test_the_settings_that_wrote_the_lines_are_kept_beside_them(mixed_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "captions.csv"
    caption(mixed_folder, "--checkpoint", tiny_checkpoint, "--out", out, "--method", "greedy", "--max-length", "4")
    settings = json.loads((tmp_path / "captions.csv.jsonl.settings.json").read_text())
    assert settings["checkpoint_sha256"] == hashlib.sha256(Path(tiny_checkpoint).read_bytes()).hexdigest()
    assert settings["checkpoint"] == str(Path(tiny_checkpoint).resolve())
    decoding = (settings["method"], settings["max_length"], settings["attention"], settings["amp"])
    assert decoding == ("greedy", 4, False, False)
    written = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("captions"))
    assert written == ["captions.csv", "captions.csv.jsonl", "captions.csv.jsonl.settings.json"]


def test_a_rerun_with_another_model_or_other_flags_is_refused_and_changes_nothing(
    mixed_folder, tiny_checkpoint, tmp_path, capsys
):
    out = tmp_path / "captions.jsonl"
    args = (mixed_folder, "--out", out, "--method", "greedy", "--batch-size", "1")
    caption(*args, "--checkpoint", tiny_checkpoint)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:5]))  # an interrupted run
    kept = out.read_text(), settings_path(out).read_text()
    capsys.readouterr()

    assert caption(*args, "--checkpoint", tiny_checkpoint, "--max-length", "3") == 2
    assert "other settings (max_length 20 there, 3 here)" in capsys.readouterr().err
    assert caption(*args, "--checkpoint", tiny_checkpoint, "--attention") == 2
    assert "attention False there, True here" in capsys.readouterr().err
    retrained = talkative_tiny_model()
    with torch.no_grad():
        retrained.decoder.out.bias[0] += 1.0
    save_checkpoint(retrained, tmp_path / "retrained.safetensors")
    assert caption(*args, "--checkpoint", tmp_path / "retrained.safetensors") == 2
    assert "checkpoint_sha256" in capsys.readouterr().err
    assert (out.read_text(), settings_path(out).read_text()) == kept

    moved = tmp_path / "moved.safetensors"  # the same model read from elsewhere is the same model
    moved.write_bytes(Path(tiny_checkpoint).read_bytes())
    caption(*args, "--checkpoint", moved)
    assert out.read_text() == "".join(lines)
    assert "already done 5" in capsys.readouterr().err


def test_overlays_asked_for_on_a_resume_are_drawn_for_the_images_it_captions(mixed_folder, tiny_checkpoint, tmp_path):
    out, sheets = tmp_path / "captions.jsonl", tmp_path / "sheets"
    args = (mixed_folder, "--checkpoint", tiny_checkpoint, "--out", out, "--method", "greedy", "--batch-size", "1")
    caption(*args)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:5]))
    caption(*args, "--overlays", sheets)
    assert out.read_text() == "".join(lines)  # the same lines: no attention in them without --attention
    drawn = {line["file"] for line in read_lines(out)[5:] if "captions" in line}
    assert drawn and {str(p.relative_to(sheets)).removesuffix(".png") for p in sheets.rglob("*.png")} == drawn


def test_a_deleted_output_starts_over_whatever_settings_it_had(mixed_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "captions.jsonl"
    common = (mixed_folder, "--checkpoint", tiny_checkpoint, "--out", out)
    caption(*common, "--method", "greedy")
    out.unlink()
    caption(*common, "--method", "beam", "--max-length", "3")
    assert {line.get("method") for line in read_lines(out)} == {"beam", None}  # None: error lines
    assert json.loads(settings_path(out).read_text())["max_length"] == 3


def test_an_output_from_before_settings_were_kept_resumes_and_gets_them(mixed_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "captions.jsonl"
    args = (mixed_folder, "--checkpoint", tiny_checkpoint, "--out", out, "--method", "greedy", "--batch-size", "1")
    caption(*args)
    complete = out.read_text()
    out.write_text("".join(complete.splitlines(keepends=True)[:4]))
    settings_path(out).unlink()
    caption(*args)
    assert out.read_text() == complete
    assert json.loads(settings_path(out).read_text())["method"] == "greedy"


def test_shards_are_disjoint_and_merge_into_the_single_run(mixed_folder, tiny_checkpoint, tmp_path):
    common = ("--recursive", "--checkpoint", tiny_checkpoint, "--method", "greedy", "--batch-size", "1")
    single = tmp_path / "single.jsonl"
    caption(mixed_folder, "--out", single, *common)
    parts = [tmp_path / f"part{i}.jsonl" for i in range(2)]
    for i, part in enumerate(parts):
        caption(mixed_folder, "--out", part, "--shard", f"{i}/2", *common)
    names = [{line["file"] for line in read_lines(part)} for part in parts]
    assert names[0] and names[1] and not names[0] & names[1]
    assert names[0] | names[1] == set(ORDER)
    merged = tmp_path / "merged.jsonl"
    assert caption(mixed_folder, "--recursive", "--out", merged, "--merge", *parts) == 1  # failures are kept
    assert merged.read_text() == single.read_text()
    assert settings_path(merged).read_text() == settings_path(single).read_text()


def test_shard_membership_depends_on_the_name_alone():
    names = [f"folder{i % 7}/image_{i}.jpg" for i in range(500)]
    for count in (1, 2, 3, 8):
        owners = [[s for s in range(count) if Shard(s, count).holds(n)] for n in names]
        assert all(len(o) == 1 for o in owners)
        sizes = np.bincount([o[0] for o in owners], minlength=count)
        assert sizes.min() > 500 / count * 0.6  # none is starved
    with pytest.raises(ValueError):
        Shard(2, 2)


def test_csv_has_a_row_per_caption_and_one_per_failure(mixed_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "captions.csv"
    caption(mixed_folder, "--checkpoint", tiny_checkpoint, "--out", out, "--num-captions", "2")
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    good = [n for n in ORDER if n in GOOD_IMAGES and "/" not in n]
    assert [r["file"] for r in rows if r["rank"] == "1"] == good
    assert [r["file"] for r in rows if r["rank"] == "2"] == good
    errors = {r["file"]: r["error_code"] for r in rows if r["error_code"]}
    assert errors == {**FAILED, **SKIPPED}
    journal = read_lines(tmp_path / "captions.csv.jsonl")  # what a rerun resumes from
    expected = [(line["file"], c["text"], c["log_prob"]) for line in journal for c in line.get("captions", [])]
    assert sorted((r["file"], r["caption"], float(r["log_prob"])) for r in rows if r["rank"]) == sorted(expected)


def test_coco_results_load_for_evaluation(tmp_path, tiny_checkpoint):
    from pycocotools.coco import COCO

    folder = tmp_path / "val"
    folder.mkdir()
    ids = [7, 42, 123456]
    for i in ids:
        picture("RGB").save(folder / f"shapes_test_{i:012d}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    out = tmp_path / "results.json"
    caption(folder, "--checkpoint", tiny_checkpoint, "--out", out, "--format", "coco")
    results = json.loads(out.read_text())
    assert sorted(r["image_id"] for r in results) == ids
    assert all(set(r) == {"image_id", "caption"} and isinstance(r["caption"], str) for r in results)

    truth = COCO()
    truth.dataset = {
        "images": [{"id": i} for i in ids],
        "annotations": [{"id": n, "image_id": i, "caption": "a shape"} for n, i in enumerate(ids, 1)],
    }
    truth.createIndex()
    assert sorted(truth.loadRes(str(out)).getImgIds()) == ids


def test_coco_ids_come_from_names_or_from_the_order():
    assert coco_image_ids(["COCO_val2014_000000123456.jpg", "a/000000000042.jpg"]) == [123456, 42]
    assert coco_image_ids(["a/1.jpg", "b/1.jpg"]) == [1, 2]  # the same number twice
    assert coco_image_ids(["cat.jpg", "dog_3.jpg"]) == [1, 2]  # not every name has one


def test_overlays_are_pngs_named_after_the_file(mixed_folder, tiny_checkpoint, tmp_path):
    out, sheets = tmp_path / "captions.jsonl", tmp_path / "sheets"
    caption(
        mixed_folder,
        "-r",
        "--checkpoint",
        tiny_checkpoint,
        "--out",
        out,
        "--overlays",
        sheets,
        "--method",
        "greedy",
        "--max-length",
        "3",
    )
    written = sorted(str(p.relative_to(sheets)) for p in sheets.rglob("*.png"))
    assert written == sorted(f"{name}.png" for name in GOOD_IMAGES)
    for path in sheets.rglob("*.png"):
        with Image.open(path) as sheet:
            sheet.verify()
            assert sheet.format == "PNG"
    for line in read_lines(out):
        if "captions" in line:
            assert "attention" not in line["captions"][0]  # decoded for the sheets, not asked for
            with Image.open(sheets / f"{line['file']}.png") as sheet:  # the picture, then a heatmap per word
                assert sheet.width == min(1 + len(line["captions"][0]["tokens"]), 5) * 224


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "257"], "--batch-size"),
        (["--workers", "33"], "--workers"),
        (["--shard", "2/2"], "--shard"),
        (["--format", "xml"], "--format"),
    ],
)
def test_out_of_range_flags_are_usage_errors(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        caption(tmp_path, "--out", tmp_path / "o.jsonl", *flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags",
    [
        ["--beam-size", "11"],
        ["--method", "greedy", "--num-captions", "2"],
        ["--temperature", "0"],
        ["--beam-size", "2", "--num-captions", "3"],
    ],
)
def test_bad_decoding_options_are_usage_errors(flags, tmp_path, capsys):
    assert caption(tmp_path, "--out", tmp_path / "o.jsonl", *flags) == 2
    assert "captioner caption: error:" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_missing_paths_and_models_are_reported(tmp_path, capsys):
    assert caption(tmp_path / "nope", "--out", tmp_path / "o.jsonl") == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert caption(tmp_path, "--out", tmp_path / "o.jsonl", "--checkpoint", tmp_path / "none.safetensors") == 2
    assert "cannot load the model" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_device_this_machine_lacks_is_a_usage_error_before_any_work(mixed_folder, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    assert caption(mixed_folder, "--checkpoint", tiny_checkpoint, "--out", out, "--device", "cuda") == 2
    assert "captioner caption: error: device cuda: no CUDA GPU is available here" in capsys.readouterr().err
    assert not out.exists()


def test_amp_runs_the_encoder_in_bfloat16_and_captions_the_same_files(
    mixed_folder, tiny_checkpoint, tmp_path, monkeypatch
):
    encoder_dtypes = []
    real_forward = Encoder.forward

    def spy(self, images):
        features = real_forward(self, images)
        if isinstance(features, torch.Tensor):  # not torch.fx's symbolic trace (fold_batch_norms)
            encoder_dtypes.append(features.dtype)
        return features

    monkeypatch.setattr(Encoder, "forward", spy)
    outs = {amp: tmp_path / f"amp{amp}.jsonl" for amp in ("", "--amp")}
    for amp, out in outs.items():
        encoder_dtypes.clear()
        args = [
            mixed_folder,
            "-r",
            "--checkpoint",
            tiny_checkpoint,
            "--out",
            out,
            "--method",
            "greedy",
            "--workers",
            "1",
        ]  # one worker: a thread of this process, where the spy sees it
        assert caption(*args, *([amp] if amp else [])) == 1  # the two broken files
        assert set(encoder_dtypes) == {torch.bfloat16 if amp else torch.float32}
    exact, mixed = read_lines(outs[""]), read_lines(outs["--amp"])
    assert [line["file"] for line in mixed] == [line["file"] for line in exact] == ORDER
    for a, b in zip(exact, mixed):
        assert ("error" in a, "error" in b) in [(True, True), (False, False)]
        if "captions" in b:
            assert b["captions"][0]["tokens"] and (a["width"], a["height"]) == (b["width"], b["height"])


def test_two_roots_with_the_same_names_are_refused(tmp_path):
    for root in ("a", "b"):
        (tmp_path / root).mkdir()
        picture("RGB").save(tmp_path / root / "same.jpg")
    with pytest.raises(ValueError, match=r"same\.jpg"):
        find_entries([tmp_path / "a", tmp_path / "b"])
    assert [e.file for e in find_entries([tmp_path / "a", tmp_path / "a" / "same.jpg"])] == ["same.jpg"]


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs named pipes and Unix sockets")
def test_pipes_sockets_and_devices_are_skipped_without_being_opened(tiny_checkpoint, tmp_path):
    """Opening a named pipe waits for a writer: the run would stop there for good."""
    root = tmp_path / "photos"
    root.mkdir()
    picture("RGB").save(root / "photo.jpg")
    os.mkfifo(root / "pipe.jpg")
    (root / "null.png").symlink_to(os.devnull)  # a character device, read with --follow-links
    os.mkfifo(tmp_path / "given.jpg")
    out = tmp_path / "captions.jsonl"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(root / "socket.jpg"))
        command = [
            Path(sys.executable).parent / "captioner",
            "caption",
            root,
            tmp_path / "given.jpg",
            "--follow-links",
            "--checkpoint",
            tiny_checkpoint,
            "--out",
            out,
        ]
        run = subprocess.run(command, capture_output=True, text=True, timeout=300)  # a pipe opened: no end
    assert run.returncode == 0, run.stderr  # skipped files are no failures
    codes = [(line["file"], line.get("error", {}).get("code")) for line in read_lines(out)]
    assert codes == [
        ("null.png", "not_a_regular_file"),
        ("photo.jpg", None),
        ("pipe.jpg", "not_a_regular_file"),
        ("socket.jpg", "not_a_regular_file"),
        ("given.jpg", "not_a_regular_file"),
    ]
    messages = {line["file"]: line["error"]["message"] for line in read_lines(out) if "error" in line}
    assert "named pipe" in messages["pipe.jpg"] and "socket" in messages["socket.jpg"]
    assert "character device" in messages["null.png"]
    assert "captioned 1, failed 0, skipped 4" in run.stderr


def test_a_link_loop_is_entered_once(tmp_path):
    (tmp_path / "a").mkdir()
    picture("RGB").save(tmp_path / "a" / "x.jpg")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    names = [e.file for e in find_entries([tmp_path], recursive=True, follow_links=True)]
    assert names == ["a/x.jpg"]


def test_outputs_inside_the_folder_are_never_inputs(mixed_folder, tiny_checkpoint, tmp_path, capsys):
    args = (
        mixed_folder,
        "-r",
        "--checkpoint",
        tiny_checkpoint,
        "--out",
        mixed_folder / "captions.csv",
        "--overlays",
        mixed_folder / "sheets",
        "--method",
        "greedy",
        "--max-length",
        "2",
    )
    caption(*args)
    caption(*args)
    assert "captioned 0, failed 0, skipped 0, already done 18" in capsys.readouterr().err
    journal = read_lines(mixed_folder / "captions.csv.jsonl")
    assert [line["file"] for line in journal] == ORDER


def test_parts_made_with_different_settings_are_not_merged(mixed_folder, tiny_checkpoint, tmp_path, capsys):
    parts = [tmp_path / f"part{i}.jsonl" for i in range(2)]
    for i, method in enumerate(("greedy", "beam")):
        caption(
            mixed_folder,
            "-r",
            "--checkpoint",
            tiny_checkpoint,
            "--out",
            parts[i],
            "--shard",
            f"{i}/2",
            "--method",
            method,
        )
    capsys.readouterr()
    out = tmp_path / "captions.jsonl"
    assert caption(mixed_folder, "-r", "--out", out, "--merge", *parts) == 2
    assert (
        "part0.jsonl and " in (err := capsys.readouterr().err)
        and "different settings (method 'greedy' in part0.jsonl, 'beam' in part1.jsonl)" in err
    )
    assert not out.exists()


def test_merging_missing_or_foreign_parts_is_refused(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    out = tmp_path / "captions.jsonl"
    assert caption(tmp_path / "photos", "--out", out, "--merge", tmp_path / "part0.jsonl") == 2
    assert "no such part" in capsys.readouterr().err
    (tmp_path / "part0.jsonl").write_text('{"caption": "no file key"}\n')
    assert caption(tmp_path / "photos", "--out", out, "--merge", tmp_path / "part0.jsonl") == 2
    assert "not a captioner result" in capsys.readouterr().err
    assert not out.exists()


def test_batches_shrink_near_the_end_so_the_workers_finish_together(tmp_path):
    skipped = ImageError("not_an_image", "a text file")
    entries = [Entry(f"{i}.jpg", tmp_path / f"{i}.jpg", skipped if i % 7 == 3 else None) for i in range(400)]
    segments = list(_segments(entries, batch_size=32, workers=2))

    assert [e for segment in segments for e in segment] == entries  # every entry once, in order
    sizes = [sum(e.skip is None for e in segment) for segment in segments]
    assert sizes[:6] == [32] * 6  # full batches while there is plenty left
    assert sizes == sorted(sizes, reverse=True)  # then shorter and shorter
    assert min(sizes[:-1]) == MIN_TAIL_BATCH and sizes[-1] <= MIN_TAIL_BATCH  # the last takes what is left
    assert sum(sizes) == sum(e.skip is None for e in entries)
    assert sizes[-2] * 2 * 2 <= 32  # the last batches are small next to a full one
