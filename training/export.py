"""`captioner export`: a checkpoint whose encoder also runs on ONNX Runtime, fp32 or int8.

    captioner export runs/shapes/best.safetensors --out runs/shapes/model-onnx.safetensors
    captioner export best.safetensors --out model-int8.safetensors --int8 --calibration data/shapes

The output is the input checkpoint (the same weights, config, vocabulary and card) with the
encoder's ONNX graph stored beside the weights: `caption`, `serve` and `evaluate` run that graph on
a CPU, and `--backend torch` still runs the torch encoder. int8 is calibrated on images found
under DIR (any folder of images; a COCO-layout root works as it is), picked evenly from the sorted
list; the images should look like what the model will caption.
"""

import argparse
import sys
from pathlib import Path

import torch

from captioner.checkpoint import CheckpointError, load_checkpoint
from captioner.images import IMAGE_SUFFIXES, ImageError
from captioner.onnx_encoder import OnnxGraph, export_encoder, quantize_encoder
from captioner.predictor import Predictor
from runtime.files import full_disk_is_an_error
from training.train import save_model

CALIBRATION_BATCH = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="the checkpoint to export (captioner train's best.safetensors)")
    parser.add_argument("--out", type=Path, required=True, help="the new checkpoint, with its ONNX encoder")
    parser.add_argument("--int8", action="store_true", help="quantize the encoder to int8 (needs --calibration)")
    parser.add_argument("--calibration", type=Path, metavar="DIR", help="images to calibrate int8 on, found under DIR")
    parser.add_argument(
        "--calibration-images", type=int, default=64, metavar="N", help="how many of them (default: %(default)s)"
    )
    parser.add_argument(
        "--calibration-method",
        choices=("minmax", "percentile", "entropy"),
        default="minmax",
        help="how activation ranges are set from them (default: %(default)s)",
    )
    parser.add_argument(
        "--keep-fp32",
        nargs="*",
        metavar="LAYER",
        help="layers (prefixes of their weights' names) left in fp32 by --int8 (default: the encoder's stem "
        "and last stage; give none to quantize every layer)",
    )


def calibration_files(root: Path, count: int) -> list[Path]:
    """`count` image files under `root`, evenly spaced in sorted order (all of them if fewer)."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) <= count:
        return files
    return [files[i * len(files) // count] for i in range(count)]


def calibration_batches(predictor: Predictor, files: list[Path]) -> list[torch.Tensor]:
    """The files' pixels, prepared as captioning prepares them, in batches (B, 3, S, S); an
    unreadable file is reported and left out."""
    pixels = []
    for path in files:
        try:
            pixels.append(predictor.prepare(path).pixels)
        except ImageError as e:
            print(f"captioner export: skipped {path}: {e.message}", file=sys.stderr)
    if not pixels:
        raise ValueError("no readable calibration image")
    return list(torch.stack(pixels).split(CALIBRATION_BATCH))


def _usage_error(args: argparse.Namespace) -> str | None:
    if args.int8 and args.calibration is None:
        return "--int8 needs --calibration DIR: int8 ranges are set on images like the ones the model will caption"
    if (args.calibration is not None or args.keep_fp32 is not None) and not args.int8:
        return "--calibration and --keep-fp32 are for --int8"
    if args.calibration is not None and not args.calibration.is_dir():
        return f"no folder at {args.calibration}"
    if args.calibration_images < 1:
        return "--calibration-images must be at least 1"
    if args.out.resolve() == args.checkpoint.resolve():
        return "--out must be a new file, not the checkpoint itself"
    return None


def export(args: argparse.Namespace) -> OnnxGraph:
    model, card = load_checkpoint(args.checkpoint)
    graph = export_encoder(model.encoder)
    if args.int8:
        files = calibration_files(args.calibration, args.calibration_images)
        batches = calibration_batches(Predictor(model, card), files)
        print(f"captioner export: calibrating int8 on {sum(len(b) for b in batches)} images", file=sys.stderr)
        keep = model.encoder.keep_fp32_in_int8 if args.keep_fp32 is None else tuple(args.keep_fp32)
        graph = quantize_encoder(graph, batches, method=args.calibration_method, keep_fp32=keep)
    save_model(model, args.out, card, graph)
    return graph


def main(args: argparse.Namespace) -> int:
    problem = _usage_error(args)
    if problem:
        print(f"captioner export: error: {problem}", file=sys.stderr)
        return 2
    try:
        with full_disk_is_an_error("captioner export", "export again"):
            graph = export(args)
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        print(f"captioner export: error: {e}", file=sys.stderr)
        return 2
    size = len(graph.model) / 1e6
    print(f"wrote {args.out}: the encoder in ONNX ({graph.precision}, {size:.1f} MB) beside the checkpoint's weights")
    return 0
