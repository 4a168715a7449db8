"""Cross-entropy only against cross-entropy followed by SCST, on the Shapes world, with the same extra budget.

    .venv/bin/captioner demo --no-serve                   # once: the default model, its data and features
    .venv/bin/python benchmarks/scst_shapes.py --out benchmarks/RESULTS.md
    .venv/bin/python benchmarks/scst_shapes.py --epochs 1 --lr 1e-4   # another budget or step size

Both arms start from the default recipe's cross-entropy phase (training.demo, its best
epoch saved at runtime.home.default_workdir()/run/best.safetensors; the demo's own SCST
phase continues from it as arm B does) and train --epochs more epochs on the
demo's data and feature cache with the demo's settings otherwise, at one learning rate
(--lr, no warm-up, cosine decay to a tenth):
(A) with cross-entropy, `captioner train --init-from MODEL`;
(B) with self-critical sequence training, `captioner train --scst --init-from MODEL
--scst-reference-weight W` (the demo's W unless --reference-weight says otherwise).
Each keeps its best epoch by validation CIDEr (greedy, 300 images), as any run does. Both
arms are then scored on the test split with beam size 3 by training.evaluate.caption_and_score:
CIDEr and BLEU-4 (pycocoevalcap) and the Shapes world's strict truth metrics, as is the
start. The section "## SCST on Shapes" of --out is replaced with the table.

Time on 2 idle cores: a cross-entropy epoch is 125 steps of about 0.6 s, an SCST epoch
125 of about 1 s (a greedy caption, 5 samples and their CIDEr-D per image, then one
pass with gradient), a test evaluation a minute or two; several times that on a
machine other work shares.
"""

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from captioner.checkpoint import load_checkpoint
from captioner.decoding import DecodeOptions
from captioner.predictor import Predictor
from runtime.home import default_workdir
from training.caption_metrics import CocoScorer
from training.coco import load_split
from training.demo import DEMO_SCST_REFERENCE_WEIGHT, DEMO_SEED, DEMO_SPLITS, DEMO_TRAINING
from training.evaluate import caption_and_score
from training.train import BEST_MODEL, TrainConfig, train

sys.path.insert(0, str(Path(__file__).parent))
from results_file import write_section

SECTION = "## SCST on Shapes"
COLUMNS = (
    "CIDEr",
    "BLEU-4",
    "exact_object_set",
    "exact_object_set_3_objects",
    "informative_rate",
    "object_precision",
    "object_recall",
    "relation_accuracy",
    "pointing_accuracy",
)


def cpu_name() -> str:
    with contextlib.suppress(OSError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    return platform.processor() or "an unknown CPU"


def continue_training(
    start: Path, workdir: Path, out: Path, epochs: int, lr: float, scst: bool, reference_weight: float
) -> tuple[Path, float]:
    """`epochs` more epochs from `start` with the demo's settings: (best checkpoint, minutes)."""
    config = TrainConfig(
        **{
            **DEMO_TRAINING.model_dump(),
            "data": str(workdir / "shapes"),
            "out": str(out),
            "epochs": epochs,
            "patience": epochs,
            "lr": lr,
            "warmup_steps": 0,
            "cache_dir": str(workdir / "features"),
            "seed": DEMO_SEED,
            "progress": False,
            "init_from": str(start),
            "scst": scst,
            "scst_reference_weight": reference_weight if scst else 0.0,
        }
    )
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a stale resume
    started = time.time()
    best = train(config, load_checkpoint(start)[0].config)  # the model settings are the checkpoint's anyway
    return best, (time.time() - started) / 60


def score_on_test(checkpoint: Path, test, scorer: CocoScorer) -> dict[str, float]:
    model, card = load_checkpoint(checkpoint)
    _, scores = caption_and_score(
        Predictor(model, card), test, DecodeOptions(method="beam", beam_size=3), batch_size=64, scorer=scorer
    )
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=default_workdir(), help="the demo's (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=1, help="extra epochs for each arm (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-4, help="both arms' learning rate (default: %(default)s)")
    parser.add_argument(
        "--reference-weight",
        type=float,
        default=DEMO_SCST_REFERENCE_WEIGHT,
        help="arm B's weight of the references' cross-entropy (default: the demo's, %(default)s; 0: SCST alone)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/RESULTS.md"))
    args = parser.parse_args(argv)

    start = args.workdir / "run" / BEST_MODEL
    if not start.is_file():
        print(f"no cross-entropy model at {start}: build it first with `captioner demo --no-serve`", file=sys.stderr)
        return 2
    began = time.time()
    test = load_split(args.workdir / "shapes", "test")
    runs = args.workdir / "scst-benchmark"
    arms = {"(A) cross-entropy": False, "(B) SCST": True}
    rows = []
    _, start_card = load_checkpoint(start)
    with CocoScorer() as scorer:
        rows.append(("start: the default recipe's cross-entropy phase", score_on_test(start, test, scorer), None, None))
        for name, scst in arms.items():
            out = runs / ("scst" if scst else "ce")
            best, minutes = continue_training(
                start, args.workdir, out, args.epochs, args.lr, scst, args.reference_weight
            )
            if not (best.parent / "history.json").exists():  # written by a run that finished
                print(f"{name} stopped before it finished: no table written", file=sys.stderr)
                return 1
            history = json.loads((best.parent / "history.json").read_text())
            label = f"{name}, +{args.epochs} epoch{'s' * (args.epochs != 1)}"
            rows.append((label, score_on_test(best, test, scorer), minutes, max(h["val_CIDEr"] for h in history)))
            print(name, {k: round(v, 4) for k, v in rows[-1][1].items() if isinstance(v, float)}, f"{minutes:.1f} min")

    lines = [
        SECTION,
        "",
        f"`.venv/bin/python benchmarks/scst_shapes.py --epochs {args.epochs} --lr {args.lr:g} "
        f"--reference-weight {args.reference_weight:g}`",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}; shared with other work, so "
        f"the minutes are wall-clock and loose. The whole script took {(time.time() - began) / 60:.1f} min.",
        "",
        f"Both arms start from the default recipe's cross-entropy phase (`captioner demo`: epoch "
        f"{start_card.get('epoch')} of {len(start_card.get('history', []))}, the best by validation CIDEr; "
        "arm B is what the demo then does) and train "
        f"{args.epochs} more epoch{'s' * (args.epochs != 1)} of the {DEMO_TRAINING.batch_size}-image "
        f"batches of its {DEMO_SPLITS['train']} training images at lr {args.lr:g} (no warm-up, cosine to a "
        "tenth), keeping the best epoch by validation CIDEr (greedy, 300 images): (A) cross-entropy "
        "(`--init-from`), "
        f"(B) SCST (`--scst --init-from --scst-reference-weight {args.reference_weight:g}`, 5 samples per "
        "image, greedy baseline, CIDEr-D reward with the "
        f"training references' document frequencies, dropout off). Test split ({len(test)} images), beam "
        "size 3.",
        "",
        "| | " + " | ".join(COLUMNS) + " | best val CIDEr | training time |",
        "| --- |" + " ---: |" * (len(COLUMNS) + 2),
    ]
    for name, scores, minutes, val in rows:
        cells = [f"{scores[c]:.3f}" if c in scores and scores[c] == scores[c] else "n/a" for c in COLUMNS]
        extra = ["", ""] if minutes is None else [f"{val:.3f}", f"{minutes:.1f} min"]
        lines.append(f"| {name} | " + " | ".join(cells + extra) + " |")
    write_section(args.out, SECTION, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
