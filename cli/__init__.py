"""The `captioner` console command: one entry point, one module per subcommand.

Each subcommand module exposes `add_arguments(parser)` and `main(args)`. Only the
module of the subcommand being run is imported, so `captioner caption` never
imports training code or FastAPI.

    captioner shapes data/shapes --train 3000 --val 300 --test 300
    captioner train --data data/shapes --out runs/shapes
    captioner evaluate runs/shapes/best.safetensors --data data/shapes --split test
    captioner demo
    captioner serve --checkpoint runs/shapes/best.safetensors
    captioner caption photos/ --out captions.jsonl
    captioner export runs/shapes/best.safetensors --out runs/shapes/model-onnx.safetensors
"""

import argparse
import importlib
import sys

# name -> (module, one-line help). The dispatcher only names the applications; each owns its
# process (threads, allocator, signals) once it runs.
COMMANDS = {
    "shapes": ("training.shapes", "draw the Shapes world, a captioning data set in the COCO layout"),
    "train": ("training.train", "train a captioning model on COCO-format data"),
    "evaluate": ("training.evaluate", "decode a split and score it with the COCO caption metrics"),
    "demo": ("training.demo", "build, train and serve the default Shapes model"),
    "serve": ("api.serve", "serve a model over HTTP with its web page"),
    "caption": ("folder.command", "caption image files and folders into JSON lines, CSV or COCO results"),
    "export": ("training.export", "add an ONNX encoder (fp32 or int8) to a checkpoint, for fast CPU inference"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    top = argparse.ArgumentParser(
        prog="captioner",
        description="Image captioning with an attention LSTM decoder.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {n:<9} {h}" for n, (_, h) in COMMANDS.items()),
    )
    top.add_argument("command", choices=COMMANDS, metavar="COMMAND")
    top.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ns = top.parse_args(argv[:1] if argv else argv)
    module_name, help_text = COMMANDS[ns.command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"captioner {ns.command}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    return int(module.main(args) or 0)
