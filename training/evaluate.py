"""Decode a caption split with a checkpoint and score it with the COCO caption metrics.

    captioner evaluate runs/shapes/best.safetensors --data data/shapes --split test
    captioner evaluate best.safetensors --data data/coco --split test --karpathy data/coco/dataset_coco.json \\
        --method beam --beam-size 3 --batch-size 32 --out runs/coco/eval

writes OUT/results_<split>.json (the COCO results format, `[{"image_id", "caption"}]`)
and OUT/scores_<split>.json, and prints the scores. On the Shapes world (a split
with its `instances_<split>.json`) the truth metrics of `training.shapes_truth`
are added, decoded with attention on for the pointing game.

Scoring is apart from decoding: the training loop, which decodes cached
features, scores through `score_predictions` (or the Java-free `cider` and
`truth_scores` every epoch) exactly as this command does.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import sys
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, cast

from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from captioner.decoding import DecodeOptions
from captioner.predictor import Predictor, PreparedImage
from runtime.allocator import keep_freed_memory
from runtime.devices import add_device_arguments, resolve_device
from runtime.flags import add_model_flags, model_from_flags
from training.caption_metrics import CocoScorer
from training.coco import CaptionSplit, load_split
from training.image_check import BadImagesError, find_bad_images, skipped_note, usable_split

if TYPE_CHECKING:
    from training.shapes_truth import Caption, TruthScores


def truth_scores(split: CaptionSplit, captions: Mapping[int, dict], by_objects: bool = False) -> dict[str, float]:
    """The Shapes world's truth metrics (NaN where nothing was scored; counts are ints); {} for other data.

    `captions`: image id -> {"tokens": [...], "attention": (T, h, w) grids or None}. With
    `by_objects`, each metric also for the images of 1, 2 and 3 objects apart
    (`exact_object_set_3_objects`, ...). A world drawn with held-out pairs (`captioner shapes
    --hold-out`) adds `held_out_recall` and the exact object set with and without them.
    """
    if split.instances is None:
        return {}
    from training.shapes import held_out_pairs
    from training.shapes_truth import load_truth, score_by_objects, score_captions, score_held_out

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        scenes = load_truth(split.instances)
    typed = cast("Mapping[int, Caption]", captions)  # Caption dicts, as documented
    scores = _named_scores(score_captions(scenes, typed))
    if by_objects:
        for n, group in score_by_objects(scenes, typed).items():
            suffix = f"_{n}_object" if n == 1 else f"_{n}_objects"
            scores.update({f"{name}{suffix}": value for name, value in _named_scores(group).items()})
    held_out = held_out_pairs(split.instances)
    if held_out:
        held = score_held_out(scenes, typed, held_out)
        scores.update(
            held_out_images=held.images_with,
            held_out_recall=held.held_out_recall,
            exact_object_set_with_held_out=held.exact_with,
            exact_object_set_without_held_out=held.exact_without,
        )
    return scores


def _named_scores(truth: TruthScores) -> dict[str, float]:
    return {name: value for name, value in dataclasses.asdict(truth).items() if name != "images"}


def score_predictions(
    split: CaptionSplit, captions: Mapping[int, dict], scorer: CocoScorer | None = None
) -> dict[str, float]:
    """COCO metrics of the best caption per image (+ truth metrics on Shapes), over the predicted images.

    `captions`: image id -> {"tokens": [...], "attention": grids or None}. Without a
    `scorer`, one is started (and stopped) for this call.
    """
    if scorer is None:
        with CocoScorer() as own:
            return score_predictions(split, captions, own)
    texts = {image_id: " ".join(c["tokens"]) for image_id, c in captions.items()}
    return {**scorer.score(split.references(), texts), **truth_scores(split, captions, by_objects=True)}


def prepared_batches(
    predictor: Predictor, paths: list[Path], batch_size: int, pool: ThreadPoolExecutor
) -> Iterator[list[PreparedImage]]:
    """Batches of prepared images; the next batch is prepared in `pool` while the caller uses this one."""
    chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    upcoming = [pool.submit(predictor.prepare, p) for p in chunks[0]] if chunks else []
    for following in chunks[1:] + [[]]:
        current, upcoming = upcoming, [pool.submit(predictor.prepare, p) for p in following]
        yield [f.result() for f in current]


def decode_split(
    predictor: Predictor,
    split: CaptionSplit,
    options: DecodeOptions,
    batch_size: int = 32,
    workers: int = 2,
    progress: bool = False,
) -> dict[int, dict]:
    """image id -> the best caption, as the predictor formats it ({"text", "tokens", "log_prob", "attention"?})."""
    captions = {}
    with ThreadPoolExecutor(max(1, workers)) as pool:
        batches = prepared_batches(predictor, split.image_paths, batch_size, pool)
        done = 0
        for images in tqdm(
            batches,
            total=math.ceil(len(split) / batch_size),
            desc=f"decode {split.name}",
            unit="batch",
            disable=not progress,
        ):
            for image_id, result in zip(split.image_ids[done:], predictor.caption_batch(images, options)):
                captions[image_id] = result["captions"][0]
            done += len(images)
    return captions


def caption_and_score(
    predictor: Predictor,
    split: CaptionSplit,
    options: DecodeOptions,
    batch_size: int = 32,
    out_dir: Path | None = None,
    scorer: CocoScorer | None = None,
    workers: int = 2,
    progress: bool = False,
) -> tuple[list[dict], dict[str, float]]:
    """Decode `split`, score it: (COCO results `[{"image_id", "caption"}]`, scores).

    With `out_dir`, writes results_<split>.json and scores_<split>.json there.
    """
    if split.instances is not None:
        options = options.model_copy(update={"attention": True})  # the pointing game needs it
    best = decode_split(predictor, split, options, batch_size, workers, progress)
    results = [{"image_id": image_id, "caption": c["text"]} for image_id, c in best.items()]
    captions = {image_id: {"tokens": c["tokens"], "attention": c.get("attention")} for image_id, c in best.items()}
    scores = score_predictions(split, captions, scorer)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"results_{split.name}.json").write_text(json.dumps(results) + "\n", encoding="utf-8")
        # NaN (a truth metric with nothing to score) is not JSON: written as null.
        finite = {name: None if math.isnan(v) else v for name, v in scores.items()}
        (out_dir / f"scores_{split.name}.json").write_text(json.dumps(finite, indent=2) + "\n", encoding="utf-8")
    return results, scores


def format_scores(scores: Mapping[str, float]) -> str:
    """One aligned `name  value` line per score; counts stay whole numbers."""
    width = max(map(len, scores), default=0)
    lines = []
    for name, value in scores.items():
        lines.append(f"{name:<{width}}  {value:.4f}" if isinstance(value, float) else f"{name:<{width}}  {value}")
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------


class EvaluationSize(BaseModel):
    """How much this command decodes at once and with how many threads: its own numbers, checked
    by the same rules as every other flag."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")

    limit: int | None = Field(None, ge=1, description="only the first LIMIT images (lowest ids)")
    batch_size: int = Field(32, ge=1, description="images decoded together")
    workers: int = Field(
        default_factory=lambda: min(4, os.cpu_count() or 1), ge=1, description="threads preparing images"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="a .safetensors checkpoint")
    parser.add_argument("--data", type=Path, required=True, help="data set root (Shapes world or COCO)")
    parser.add_argument("--split", default="test", help="split name: test, val, val2014, ... (default test)")
    parser.add_argument("--karpathy", type=Path, help="Karpathy's dataset_coco.json: split is train, val or test")
    parser.add_argument(
        "--out",
        type=Path,
        help="where results_<split>.json and scores_<split>.json go (default: the checkpoint's folder)",
    )
    add_model_flags(parser, EvaluationSize, title="evaluation")
    add_device_arguments(parser)
    parser.add_argument("--spice", action="store_true", help="also SPICE, if its Stanford models are on disk")
    parser.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="score without the images found missing or unreadable (listed) instead of stopping",
    )
    # only the best caption is scored
    add_model_flags(parser, DecodeOptions, title="decoding", skip=("attention", "num_captions"), defaults={"seed": 0})


def main(args: argparse.Namespace) -> int:
    keep_freed_memory()  # this process's allocator policy, before any thread starts
    try:
        size = model_from_flags(EvaluationSize, args)
        options = model_from_flags(DecodeOptions, args)
        predictor = Predictor.from_checkpoint(
            args.checkpoint, resolve_device(args.device), args.backend, max_batch_size=size.batch_size, amp=args.amp
        )
    except ValueError as e:
        print(f"captioner evaluate: error: {e}", file=sys.stderr)
        return 2
    split = load_split(args.data, args.split, args.karpathy)
    if size.limit is not None:
        split = split.first(size.limit)
    try:  # every image looked at before decoding any, with the limits decoding will apply
        split = usable_split(split, find_bad_images(split.image_paths, predictor.limits), args.skip_bad_images)
    except BadImagesError as e:
        print(f"captioner evaluate: error: {e}", file=sys.stderr)
        return 2
    if split.skipped:
        print(skipped_note(split), file=sys.stderr)
    out_dir = args.out or args.checkpoint.parent
    with CocoScorer(spice=args.spice) as scorer:
        _, scores = caption_and_score(
            predictor, split, options, size.batch_size, out_dir, scorer, size.workers, progress=True
        )
    skipped = f", {len(split.skipped)} bad ones left out" if split.skipped else ""
    print(f"{args.checkpoint} on {args.data} {split.name} ({len(split)} images{skipped}, {options.method})")
    print(format_scores(scores))
    print(f"wrote {out_dir / f'results_{split.name}.json'} and {out_dir / f'scores_{split.name}.json'}")
    return 0
