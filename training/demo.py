"""The default model: draw the Shapes world, train on it, evaluate, save, serve.

    captioner demo                    # everything, then serve it on http://127.0.0.1:8000
    captioner demo --no-serve         # stop once the model is saved
    captioner demo --workdir DIR      # where the data, feature cache, run and model go
    captioner demo --scst-epochs 0    # cross-entropy only: the model that prefers generic captions

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
from runtime.files import full_disk_is_an_error
from runtime.home import default_workdir
from training.shapes import add_hold_out_argument
from training.train import TrainConfig, save_model, train

# The default model's recipe; what each choice is worth on Shapes: docs/model.md, "The recipe".
DEMO_MODEL = ModelConfig(
    encoder="efficientnet_lite0_s16",  # 14 x 14 regions: small shapes need cells finer than 32 px
    # A 0.64M-parameter decoder: 256/256/128 (1.06M) scored about the same on Shapes and cost
    # more per caption (docs/model.md, "The recipe").
    embed_dim=128,
    region_dim=192,
    hidden_dim=192,
    attention_dim=64,
    dropout=0.1,
    positional=True,
    init_state="learned",  # no glimpse of the whole image up front: the decoder has to look
    word_in_query=True,
)
# Cross-entropy first, then self-critical sequence training from its best epoch: maximum likelihood
# alone makes "there are three shapes on a ... background", the one caption style with no object
# in it, the likeliest caption of most three-object pictures; CIDEr's reward, whose IDF weighting
# discounts what every caption shares, trains that preference away. CIDEr alone is gamed in turn
# ("three shapes a red circle and a blue square" for two shapes): the references' cross-entropy,
# added with a weight, keeps the captions in their language (docs/model.md, "Why SCST, and why repeat blocking").
DEMO_TRAINING = TrainConfig(
    epochs=8,  # of cross-entropy, then DEMO_SCST_EPOCHS of SCST from the best of them (docs/model.md)
    batch_size=32,
    lr=2e-3,
    warmup_steps=50,
    alpha_c=0.2,
    patience=3,
    val_limit=300,
)
DEMO_SCST_EPOCHS = 1
DEMO_SCST_LR = 1e-4  # fine-tuning's step: SCST starts from a model that already captions well
DEMO_SCST_REFERENCE_WEIGHT = 2.0
DEMO_SPLITS = {"train": 4000, "val": 300, "test": 500}
# What the model card (and so the web page) shows of the test evaluation; `captioner evaluate`
# prints all of it, per number of objects too.
CARD_SCORES = (
    "exact_object_set",
    "exact_object_set_3_objects",
    "informative_rate",
    "object_precision",
    "object_recall",
    "relation_accuracy",
    "pointing_accuracy",
    "BLEU-4",
    "CIDEr",
)
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
        help="where everything goes (default: $CAPTIONER_HOME/demo, ~/.cache/captioner/demo; "
        "with --hold-out, a folder of its own beside it)",
    )
    parser.add_argument("--no-serve", dest="serve", action="store_false", help="stop once the model is saved")
    parser.add_argument("--retrain", action="store_true", help="train again even if the model exists")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=DEMO_TRAINING.epochs, help="cross-entropy epochs")
    parser.add_argument(
        "--scst-epochs",
        type=int,
        default=DEMO_SCST_EPOCHS,
        help=f"self-critical epochs after cross-entropy (default {DEMO_SCST_EPOCHS}; 0: cross-entropy only)",
    )
    add_hold_out_argument(parser)  # its own workdir, beside the default one, unless --workdir
    for split, count in DEMO_SPLITS.items():
        parser.add_argument(f"--{split}-images", type=int, default=count, help=f"default {count}")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def hold_out_workdir(pairs: frozenset[tuple[str, str]]) -> Path:
    """Where `--hold-out` builds its world and model: a folder per set of pairs, beside the default one."""
    name = "_".join(f"{color}-{shape}" for color, shape in sorted(pairs))
    return default_workdir().with_name(f"demo-hold-out-{name}")


def train_phases(workdir: Path, data: Path, epochs: int, scst_epochs: int, progress: bool, val_images: int) -> Path:
    """Cross-entropy from scratch, then `scst_epochs` of SCST from its best epoch: the last phase's best."""
    base = {
        **DEMO_TRAINING.model_dump(),
        "data": str(data),
        "cache_dir": str(workdir / "features"),
        "progress": progress,
        "seed": DEMO_SEED,
        "val_limit": min(DEMO_TRAINING.val_limit, val_images),
    }
    phases: list[dict[str, object]] = [{"out": str(workdir / "run"), "epochs": epochs}]
    if scst_epochs:
        scst = {
            "scst": True,
            "scst_reference_weight": DEMO_SCST_REFERENCE_WEIGHT,
            "lr": DEMO_SCST_LR,
            "warmup_steps": 0,
            "epochs": scst_epochs,
            "patience": scst_epochs,
        }
        phases.append({**scst, "out": str(workdir / "scst")})
    best: Path | None = None
    for phase in phases:
        shutil.rmtree(str(phase["out"]), ignore_errors=True)  # a fresh run: the demo's recipe, not a stale resume
        start = {} if best is None else {"init_from": str(best)}
        best = train(TrainConfig(**{**base, **phase, **start}), DEMO_MODEL)
    assert best is not None  # the cross-entropy phase always runs
    return best


def build_default_model(
    workdir: Path,
    epochs: int = DEMO_TRAINING.epochs,
    splits: dict[str, int] = DEMO_SPLITS,
    progress: bool = True,
    scst_epochs: int = DEMO_SCST_EPOCHS,
    hold_out: frozenset[tuple[str, str]] = frozenset(),
) -> Path:
    """Data, features, training, evaluation on the test split: the saved default model's path."""
    from captioner.checkpoint import load_checkpoint
    from captioner.decoding import DecodeOptions
    from captioner.onnx_encoder import export_encoder
    from captioner.predictor import Predictor
    from training.coco import load_split
    from training.evaluate import caption_and_score, format_scores
    from training.shapes import generate

    started = time.time()
    data = workdir / "shapes"
    generate(data, splits, DEMO_SEED, hold_out=hold_out)
    best = train_phases(workdir, data, epochs, scst_epochs, progress, splits["val"])
    trained = time.time() - started

    model, card = load_checkpoint(best)
    options = DecodeOptions(method="beam", beam_size=3)
    test = load_split(data, "test")
    _, scores = caption_and_score(Predictor(model, card), test, options, batch_size=64, progress=progress)
    shown = [name for name in CARD_SCORES if name in scores] + [n for n in scores if "held_out" in n]
    card = {
        **card,
        "name": "Shapes demo" + (" (held-out pairs)" if hold_out else ""),
        "description": DESCRIPTION,
        "training_data": {
            **card.get("training_data", {}),
            "name": "Shapes world v1 (procedurally drawn)",
            "held_out_pairs": [" ".join(pair) for pair in sorted(hold_out)],
        },
        "scores": {f"test_{name}": round(scores[name], 4) for name in shown},
        "evaluation": f"Shapes test split, {len(test)} images, beam size 3, the top caption",
        "minutes_to_train": round(trained / 60, 1),
    }
    path = workdir / "model.safetensors"
    save_model(model, path, card, export_encoder(model.encoder))  # served on ONNX Runtime: the same features, faster
    print(f"saved the default model to {path} in {(time.time() - started) / 60:.1f} min")
    print(f"test split, {len(test)} images, beam size 3:")
    print(format_scores(scores))
    return path


def main(args: argparse.Namespace) -> int:
    workdir = args.workdir or (hold_out_workdir(args.hold_out) if args.hold_out else default_workdir())
    model = workdir / "model.safetensors"
    if args.retrain or not model.exists():
        keep_freed_memory()  # training's allocator policy, before any thread starts (serving is another process)
        splits = {split: getattr(args, f"{split}_images") for split in DEMO_SPLITS}
        # what was finished is reused by the next run: the data, the feature cache and the saved model
        with full_disk_is_an_error("captioner demo", "run the same command again"):
            model = build_default_model(workdir, args.epochs, splits, args.progress, args.scst_epochs, args.hold_out)
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
