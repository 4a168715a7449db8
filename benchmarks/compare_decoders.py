"""Attention or not, LSTM vs GRU vs vanilla RNN: the same Shapes data, the same budget.

    .venv/bin/python benchmarks/compare_decoders.py --out benchmarks/RESULTS.md

Every variant starts from the default model's recipe (training.demo), changes
one thing, trains for --epochs on the demo's Shapes data and feature cache
(built by `captioner demo --no-serve`, or here if missing), and is scored on
the test split with beam size 3. The section "## Decoder comparison on Shapes"
of --out is replaced with the table.
"""

import argparse
import json
import sys
from pathlib import Path

from captioner.checkpoint import load_checkpoint
from captioner.config import ModelConfig
from captioner.decoding import DecodeOptions
from captioner.predictor import Predictor
from runtime.home import default_workdir
from training.caption_metrics import CocoScorer
from training.coco import CaptionSplit, load_split
from training.demo import DEMO_MODEL, DEMO_SEED, DEMO_SPLITS, DEMO_TRAINING
from training.evaluate import caption_and_score
from training.shapes import generate
from training.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).parent))
from results_file import describe_machine, machine, write_section

SECTION = "## Decoder comparison on Shapes"
VARIANTS = {
    "soft attention, LSTM (the default)": {},
    "no attention (Show and Tell), LSTM": {"attention": False},
    "soft attention, GRU": {"cell": "gru"},
    "soft attention, vanilla tanh RNN": {"cell": "rnn"},
    "soft attention, LSTM, no positions": {"positional": False},
}
COLUMNS = (
    "exact_object_set",
    "exact_object_set_3_objects",
    "informative_rate",
    "relation_accuracy",
    "relation_count",
    "pointing_accuracy",
    "BLEU-4",
    "CIDEr",
)


def cell(value: float | int | None) -> str:
    """A score to 3 decimals, a count as it is, n/a for one not measured (None or NaN)."""
    if isinstance(value, int):
        return str(value)
    return "n/a" if value is None or value != value else f"{value:.3f}"


def train_and_score(
    model: ModelConfig, name: str, args, data: Path, test: CaptionSplit, scorer: CocoScorer
) -> tuple[dict, float]:
    """One variant trained on the Shapes data in `data` and scored on `test`: (scores, training minutes)."""
    config = TrainConfig(
        **{
            **DEMO_TRAINING.model_dump(),
            "data": str(data),
            "out": str(args.workdir / "compare" / name.replace(" ", "_")),
            "epochs": args.epochs,
            "patience": args.epochs,
            "cache_dir": str(args.workdir / "features"),
            "seed": DEMO_SEED,
            "progress": False,
        }
    )
    best = train(config, model)
    history = json.loads((Path(config.out) / "history.json").read_text())
    minutes = history[-1]["seconds"] / 60  # the epochs' own clock: the first variant also builds the feature cache
    predictor = Predictor(*load_checkpoint(best))
    options = DecodeOptions(method="beam", beam_size=3)
    _, scores = caption_and_score(predictor, test, options, batch_size=64, scorer=scorer)
    return scores, minutes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=default_workdir())
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/RESULTS.md"))
    args = parser.parse_args(argv)

    data = args.workdir / "shapes"
    generate(data, DEMO_SPLITS, DEMO_SEED)
    test = load_split(data, "test")
    rows = []
    with CocoScorer() as scorer:  # one METEOR process for all the variants: each start takes seconds
        for name, change in VARIANTS.items():
            scores, minutes = train_and_score(
                ModelConfig(**{**DEMO_MODEL.model_dump(), **change}), name, args, data, test, scorer
            )
            rows.append((name, scores, minutes))
            print(name, {k: round(scores.get(k, float("nan")), 3) for k in COLUMNS}, f"{minutes:.1f} min")

    lines = [
        SECTION,
        "",
        f"{describe_machine(machine())}. Shapes world, {DEMO_SPLITS['train']} training images, "
        f"{args.epochs} epochs of cross-entropy each (no SCST phase), the default recipe otherwise; test split "
        f"({len(test)} images), beam size 3, the library's default decoding. "
        "Strict truth metrics; relation_count is the number of relation phrases scored. "
        "Pointing game: n/a without attention. Training time is wall-clock time on the machine "
        "that ran it (the epochs only, validation included), which other jobs may have shared.",
        "",
        "| variant | " + " | ".join(COLUMNS) + " | training time |",
        "|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for name, scores, minutes in rows:
        cells = [cell(scores.get(c)) for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {minutes:.1f} min |")
    write_section(args.out, SECTION, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
