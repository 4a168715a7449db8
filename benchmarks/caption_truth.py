"""The strict truth metrics of a model's captions of a Shapes split, through `captioner caption` and the HTTP API.

    .venv/bin/python benchmarks/caption_truth.py --data ~/.cache/captioner/demo/shapes --split test
    .venv/bin/python benchmarks/independent_shapes.py data/independent
    .venv/bin/python benchmarks/caption_truth.py --data data/independent --split independent \\
        --out benchmarks/RESULTS.md --section "## Caption truth: independent renderer"
    .venv/bin/python benchmarks/caption_truth.py --data DIR --split test --limit 50 --no-api   # quick

ROOT (--data) is a Shapes world in the COCO layout, as `captioner shapes` or
benchmarks/independent_shapes.py write it: ROOT/images/SPLIT/*.png and
ROOT/annotations/instances_SPLIT.json. The model (--checkpoint, default: the one
`captioner demo` trains) captions the split's images (the first --limit by file name)
twice, as a user would get them:

1. the folder command, `captioner caption ROOT/images/SPLIT --attention --beam-size B
   --out TMP/captions.jsonl` in a child process (the files one by one under --limit);
2. the service, `captioner serve --port P` in a child process, ready once GET /readyz
   answers 200, then POST /v1/captions with a few images per request and
   `attention=true`, `beam_size=B`.

Every other decoding option is the library's default, so both sources decode alike.
Each source's top captions are scored by training.shapes_truth against the drawn
truth (exact object set, informative rate, the lenient count_or_exact, object
precision and recall, relation accuracy, pointing game), over the split and by number
of objects in the picture. The report adds the fraction of images whose top caption
is the same word for word in both sources, how many top captions start with
"there are", and five raw top captions per number of objects. It is printed, and with
--out written as the section --section of that Markdown file.
"""

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pycocotools.coco import COCO

from runtime.home import default_checkpoint
from training.shapes import Scene
from training.shapes_truth import Caption, TruthScores, load_truth, score_by_objects, score_captions

sys.path.insert(0, str(Path(__file__).parent))
from results_file import markdown_table, write_section

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Caption truth on Shapes (strict)"
SOURCES = ("folder command", "API")
COLUMNS = (
    "images",
    "exact_object_set",
    "informative_rate",
    "count_or_exact",
    "object_recall",
    "relation_accuracy",
    "pointing_accuracy",
)
IMAGES_PER_REQUEST = 4
SAMPLES_PER_GROUP = 5
READY_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Split:
    folder: Path  # ROOT/images/SPLIT
    files: dict[str, int]  # file name -> image id, in file-name order
    truth: dict[int, Scene]  # image id -> what is drawn


@dataclass(frozen=True)
class SourceRun:
    """One source's top caption per image id, and the seconds it took (the server's start included)."""

    captions: dict[int, Caption]
    seconds: float


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a Shapes world in the COCO layout")
    parser.add_argument("--split", required=True, help="ROOT/images/SPLIT and ROOT/annotations/instances_SPLIT.json")
    parser.add_argument("--checkpoint", type=Path, default=default_checkpoint(), help="(default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images by file name")
    parser.add_argument("--beam-size", type=int, default=3, help="(default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="a Markdown file to write the section into")
    parser.add_argument("--section", default=SECTION, help="its heading, a `## ` line (default: %(default)s)")
    parser.add_argument("--no-api", action="store_true", help="the folder command only")
    args = parser.parse_args(argv)
    if not args.section.startswith("## "):
        parser.error(f"--section must start with '## ', got {args.section!r}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be at least 1, got {args.limit}")
    return args


def load_split(root: Path, split: str, limit: int | None) -> Split:
    """The split's images that are on disk, the first `limit` by file name, and their truth."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools reports its loading on stdout
        coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
    folder = root / "images" / split
    by_name = {Path(image["file_name"]).name: image_id for image_id, image in coco.imgs.items()}
    names = sorted(name for name in by_name if (folder / name).is_file())[:limit]
    if not names:
        raise SystemExit(f"no image of instances_{split}.json is in {folder}")
    return Split(folder, {name: by_name[name] for name in names}, load_truth(coco))


def top_caption(result: Mapping[str, Any]) -> Caption:
    """The best caption of a result (the folder command's line or the API's), its attention as (T, h, w)."""
    best = result["captions"][0]
    h, w = result["attention_grid"]
    grids = best.get("attention")
    attention = None if grids is None else np.asarray(grids, dtype=np.float64).reshape(-1, h, w)
    return {"tokens": list(best["tokens"]), "attention": attention}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


def caption_folder(split: Split, checkpoint: Path, beam_size: int, scratch: Path, whole: bool) -> SourceRun:
    """`captioner caption` on the split's folder (or on its files one by one when not `whole`)."""
    out = scratch / "captions.jsonl"
    paths = [str(split.folder)] if whole else [str(split.folder / name) for name in split.files]
    flags = ["--checkpoint", str(checkpoint), "--attention", "--beam-size", str(beam_size), "--out", str(out)]
    began = time.monotonic()
    done = subprocess.run(cli("caption", *paths, *flags), cwd=REPO, capture_output=True, text=True)
    seconds = time.monotonic() - began
    if done.returncode != 0:
        raise SystemExit(f"captioner caption exited with {done.returncode}:\n{done.stderr[-3000:]}")
    captions = {}
    for line in out.read_text().splitlines():
        record = json.loads(line)
        name = Path(record["file"]).name
        if name in split.files:
            if "error" in record:
                raise SystemExit(f"captioner caption could not caption {name}: {record['error']}")
            captions[split.files[name]] = top_caption(record)
    missing = [name for name, image_id in split.files.items() if image_id not in captions]
    if missing:
        raise SystemExit(f"captioner caption gave no line for {len(missing)} images, {missing[:5]} ...")
    return SourceRun(captions, seconds)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_ready(server: subprocess.Popen, base: str, log: Path) -> None:
    """Poll GET /readyz until it answers 200; the server exiting first, or the deadline, is an error."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"captioner serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(base + "/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:  # not listening yet
            pass
        time.sleep(0.2)
    raise SystemExit(f"captioner serve was not ready within {READY_TIMEOUT_S:.0f} s:\n{log.read_text()[-3000:]}")


@contextmanager
def serving(checkpoint: Path, log: Path) -> Iterator[str]:
    """`captioner serve` on a free loopback port: its base URL once ready; stopped on leaving."""
    port = free_port()
    flags = ["--checkpoint", str(checkpoint), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with log.open("w") as log_file:
        server = subprocess.Popen(cli("serve", *flags), cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_until_ready(server, base, log)
            yield base
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(30)


def chunks(names: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(names), size):
        yield names[start : start + size]


def post_images(client: httpx.Client, folder: Path, names: list[str], beam_size: int) -> list[dict]:
    """One POST /v1/captions of `names`; its results, in upload order."""
    files = [("images", (name, (folder / name).read_bytes(), "image/png")) for name in names]
    fields = {"attention": "true", "beam_size": str(beam_size)}
    answer = client.post("/v1/captions", data=fields, files=files)
    if answer.status_code != 200:
        raise SystemExit(f"POST /v1/captions answered {answer.status_code}: {answer.text[:2000]}")
    results: list[dict] = answer.json()["results"]
    if [r["file"] for r in results] != names:
        raise SystemExit(f"POST /v1/captions answered for {[r['file'] for r in results]}, sent {names}")
    return results


def caption_over_api(split: Split, checkpoint: Path, beam_size: int, scratch: Path) -> SourceRun:
    """The split's images through a `captioner serve` of our own, a few per request."""
    began = time.monotonic()
    captions = {}
    with (
        serving(checkpoint, scratch / "server.log") as base,
        httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT_S) as client,
    ):
        limit = client.get("/v1/model").json()["limits"]["max_images"]
        for names in chunks(list(split.files), min(IMAGES_PER_REQUEST, limit)):
            for name, result in zip(names, post_images(client, split.folder, names, beam_size)):
                captions[split.files[name]] = top_caption(result)
    return SourceRun(captions, time.monotonic() - began)


def number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def score_row(label: str, scores: TruthScores) -> list[str]:
    """The row's figures; relations and pointing with how many phrases and words they scored
    (one relation phrase of 64 is 0.016: the count says how far a figure can be trusted)."""
    counts = {"relation_accuracy": scores.relation_count, "pointing_accuracy": scores.pointing_count}
    cells = [number(getattr(scores, c)) + (f" ({counts[c]})" if counts.get(c) else "") for c in COLUMNS[1:]]
    return [label, str(scores.images), *cells]


def score_rows(source: str, truth: dict[int, Scene], captions: dict[int, Caption]) -> list[list[str]]:
    """The source's scores over all its images, then for 1, 2, 3 objects."""
    rows = [score_row(f"{source}, all", score_captions(truth, captions))]
    for objects, scores in score_by_objects(truth, captions).items():
        rows.append(score_row(f"{source}, {objects} object{'s' * (objects != 1)}", scores))
    return rows


def text(caption: Caption) -> str:
    return " ".join(caption["tokens"])


def describe_scene(scene: Scene) -> str:
    return ", ".join(f"{o.size} {o.color} {o.shape}" for o in scene.objects) + f" on {scene.background}"


def samples(split: Split, captions: dict[int, Caption]) -> list[list[str]]:
    """The first SAMPLES_PER_GROUP images (by file name) of each number of objects: file, truth, top caption."""
    rows = []
    for objects in sorted({len(scene.objects) for scene in split.truth.values()}):
        group = [name for name, i in split.files.items() if i in captions and len(split.truth[i].objects) == objects]
        for name in group[:SAMPLES_PER_GROUP]:
            image_id = split.files[name]
            rows.append([str(objects), name, describe_scene(split.truth[image_id]), f"`{text(captions[image_id])}`"])
    return rows


def text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table of text, left-aligned."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def starts_with_there_are(captions: dict[int, Caption]) -> int:
    return sum(caption["tokens"][:2] == ["there", "are"] for caption in captions.values())


def agreement(runs: dict[str, SourceRun]) -> tuple[int, int, list[int]]:
    """(identical top captions, images captioned by both, the ids of those that differ)."""
    folder, api = (runs[s].captions for s in SOURCES)
    both = sorted(folder.keys() & api.keys())
    differ = [i for i in both if folder[i]["tokens"] != api[i]["tokens"]]
    return len(both) - len(differ), len(both), differ


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "an unknown CPU"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def command_line(args: argparse.Namespace) -> str:
    words = [".venv/bin/python benchmarks/caption_truth.py", "--data", str(args.data), "--split", args.split]
    if args.checkpoint != default_checkpoint():
        words += ["--checkpoint", str(args.checkpoint)]
    if args.limit is not None:
        words += ["--limit", str(args.limit)]
    if args.beam_size != 3:
        words += ["--beam-size", str(args.beam_size)]
    if args.no_api:
        words.append("--no-api")
    return " ".join(words)


def agreement_lines(split: Split, runs: dict[str, SourceRun]) -> list[str]:
    if len(runs) < len(SOURCES):
        return []
    same, both, differ = agreement(runs)
    lines = [f"Top caption identical in both sources: {same} of {both} images ({number(same / both)})."]
    names = {i: name for name, i in split.files.items()}
    for image_id in differ[:SAMPLES_PER_GROUP]:
        folder, api = (text(runs[s].captions[image_id]) for s in SOURCES)
        lines.append(f"- {names[image_id]}: folder command `{folder}`, API `{api}`")
    return lines


def report(args: argparse.Namespace, split: Split, runs: dict[str, SourceRun]) -> str:
    header = ["source, objects in the picture", *COLUMNS]
    rows = [row for source, run in runs.items() for row in score_rows(source, split.truth, run.captions)]
    first = runs[SOURCES[0]].captions
    there_are = ", ".join(
        f"{source} {starts_with_there_are(run.captions)} of {len(run.captions)}" for source, run in runs.items()
    )
    seconds = ", ".join(f"{source} {run.seconds:.0f} s" for source, run in runs.items())
    lines = [
        args.section,
        "",
        f"`{command_line(args)}`",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}. "
        f"Model: {args.checkpoint.name} (SHA-256 {sha256(args.checkpoint)[:12]}). "
        f"Data: {args.data.name}/images/{args.split}, {len(split.files)} images. Beam size {args.beam_size}, "
        "the library's defaults otherwise; top caption only; attention as returned by each source. "
        f"Wall-clock: {seconds}.",
        "",
        "The strict metrics of training/shapes_truth.py: exact_object_set counts a caption only when it "
        "names exactly the picture's (colour, shape) objects; count_or_exact also counts a caption that only "
        "states the right number of objects.",
        "",
        *markdown_table(header, rows),
        "",
        *agreement_lines(split, runs),
        f'Top captions starting with "there are": {there_are}.',
        "",
        f"Top captions ({SOURCES[0]}), the first {SAMPLES_PER_GROUP} images of each number of objects:",
        "",
        *text_table(["objects", "file", "in the picture", "top caption"], samples(split, first)),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.checkpoint.is_file():
        print(f"no model at {args.checkpoint}: train the default one with `captioner demo --no-serve`", file=sys.stderr)
        return 2
    split = load_split(args.data, args.split, args.limit)
    runs: dict[str, SourceRun] = {}
    with tempfile.TemporaryDirectory(prefix="caption-truth-") as scratch:
        whole = args.limit is None
        runs[SOURCES[0]] = caption_folder(split, args.checkpoint, args.beam_size, Path(scratch), whole)
        if not args.no_api:
            runs[SOURCES[1]] = caption_over_api(split, args.checkpoint, args.beam_size, Path(scratch))
    section = report(args, split, runs)
    print(section)
    if args.out is not None:
        write_section(args.out, args.section, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
