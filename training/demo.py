"""The default model: draw the Shapes world, train on it, evaluate, save, serve.

    captioner demo                    # everything, then serve it on http://127.0.0.1:8000
    captioner demo --no-serve         # stop once the model is saved
    captioner demo --workdir DIR      # where the data, feature cache, run and model go

The model it saves (default: ~/.cache/captioner/demo/model.safetensors, see
runtime.home) is what `captioner serve` and `captioner caption` use when
given no checkpoint. It knows the Shapes world only: coloured circles, squares,
triangles and diamonds on plain backgrounds. A second run reuses what exists
and starts serving in seconds; --retrain trains again.
"""

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from captioner.config import ModelConfig
from runtime.allocator import keep_freed_memory
from runtime.home import default_workdir
from training.train import TrainConfig

# The default model's recipe, measured in README ("The default model").
DEMO_MODEL = ModelConfig(
    encoder="efficientnet_lite0_s16",  # 14 x 14 regions: small shapes need cells finer than 32 px
    # A 0.64M-parameter decoder: 256/256/128 (1.06M) scored about the same on Shapes and cost
    # more per caption (README, "The default model").
    embed_dim=128,
    region_dim=192,
    hidden_dim=192,
    attention_dim=64,
    dropout=0.1,
    positional=True,
    init_state="learned",  # no glimpse of the whole image up front: the decoder has to look
    word_in_query=True,
)
DEMO_TRAINING = TrainConfig(
    epochs=10,  # the smaller decoder learns relations more slowly; each epoch is a third quicker
    batch_size=32,
    lr=2e-3,
    warmup_steps=50,
    alpha_c=0.2,
    patience=3,
    val_limit=300,
)
DEMO_SPLITS = {"train": 4000, "val": 300, "test": 500}
DEMO_SEED = 0
DESCRIPTION = (
    "Trained on the Shapes world only: circles, squares, triangles and diamonds in five colours "
    "on four plain backgrounds. It knows nothing of real photos; train on COCO for those."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where everything goes (default: $CAPTIONER_HOME/demo, ~/.cache/captioner/demo)",
    )
    parser.add_argument("--no-serve", dest="serve", action="store_false", help="stop once the model is saved")
    parser.add_argument("--retrain", action="store_true", help="train again even if the model exists")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=DEMO_TRAINING.epochs)
    for split, count in DEMO_SPLITS.items():
        parser.add_argument(f"--{split}-images", type=int, default=count, help=f"default {count}")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def build_default_model(
    workdir: Path, epochs: int = DEMO_TRAINING.epochs, splits: dict[str, int] = DEMO_SPLITS, progress: bool = True
) -> Path:
    """Data, features, training, evaluation on the test split: the saved default model's path."""
    from captioner.checkpoint import load_checkpoint
    from captioner.decoding import DecodeOptions
    from captioner.predictor import Predictor
    from training.coco import load_split
    from training.evaluate import evaluate
    from training.shapes import generate
    from training.train import save_model, train

    started = time.time()
    data = workdir / "shapes"
    generate(data, splits, DEMO_SEED)
    run = workdir / "run"
    shutil.rmtree(run, ignore_errors=True)  # a fresh run: the demo's recipe, not a stale resume
    config = TrainConfig(
        **{
            **DEMO_TRAINING.model_dump(),
            "data": str(data),
            "out": str(run),
            "epochs": epochs,
            "cache_dir": str(workdir / "features"),
            "progress": progress,
            "seed": DEMO_SEED,
            "val_limit": min(DEMO_TRAINING.val_limit, splits["val"]),
        }
    )
    best = train(config, DEMO_MODEL)
    trained = time.time() - started

    model, card = load_checkpoint(best)
    options = DecodeOptions(method="beam", beam_size=3)
    test = load_split(data, "test")
    _, scores = evaluate(Predictor(model, card), test, options, batch_size=64, progress=progress)
    card = {
        **card,
        "name": "Shapes demo",
        "description": DESCRIPTION,
        "training_data": {**card.get("training_data", {}), "name": "Shapes world v1 (procedurally drawn)"},
        "scores": {
            **card.get("scores", {}),
            **{f"test_{k}": round(v, 4) for k, v in scores.items() if isinstance(v, float)},
        },
        "evaluation": f"Shapes test split, {len(test)} images, beam size 3",
        "minutes_to_train": round(trained / 60, 1),
    }
    path = workdir / "model.safetensors"
    save_model(model, path, card)
    print(f"saved the default model to {path} in {(time.time() - started) / 60:.1f} min")
    for name, value in card["scores"].items():
        print(f"  {name:<24} {value}")
    return path


def main(args: argparse.Namespace) -> int:
    workdir = args.workdir or default_workdir()
    model = workdir / "model.safetensors"
    if args.retrain or not model.exists():
        keep_freed_memory()  # training's allocator policy, before any thread starts (serving is another process)
        splits = {split: getattr(args, f"{split}_images") for split in DEMO_SPLITS}
        model = build_default_model(workdir, args.epochs, splits, args.progress)
    else:
        print(f"using the default model at {model} (--retrain to train it again)")
    if args.serve:
        # serving is the api package's job: hand over to its command, not its code
        command = [
            sys.executable,
            "-m",
            "cli",
            "serve",
            "--checkpoint",
            str(model),
            "--host",
            args.host,
            "--port",
            str(args.port),
        ]
        print(f"serving on http://{args.host}:{args.port}")
        sys.stdout.flush()
        os.execv(sys.executable, command)
    return 0
