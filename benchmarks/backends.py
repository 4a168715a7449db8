"""The encoder's backends side by side, in one run: torch fp32, ONNX Runtime fp32 and int8.

    .venv/bin/python benchmarks/backends.py --out benchmarks/RESULTS.md
    .venv/bin/python benchmarks/backends.py --images 32 --rounds 1 --service-rounds 1 --seconds 3  # quick

From --checkpoint (default: the demo model) it exports an fp32 and an int8 ONNX encoder as
`captioner export` does (int8 calibrated on 64 of the drawn images: this measures speed; what
int8 does to the captions is measured on Shapes, README "Performance"). Then, on the same
640x480 JPEGs as the other benchmarks, beam size 3, attention on, the backends taking turns for
--rounds rounds (in the reverse order every other round): (1) the encoder alone on ready pixels,
in the predictor's batches for it, shared among as many 1-thread processes as `captioner caption`
has workers; (2) `captioner caption` end to end, start-up included. Ratios to torch are taken
within each round. (3) For each backend, --service-rounds times: `captioner caption` on the
folder and on its first sixteenth, then `captioner serve` under --clients clients, one image per
request. The service's rate is taken after a warm-up, so it is set against the folder command's
steady rate as well as its whole run's: the images beyond the short run's over the seconds beyond
it, in which start-up (loading the model, forking the workers, an ONNX Runtime session each)
cancels out. Medians over the rounds.
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from captioner.predictor import ONNX_ENCODER_BATCH
from runtime.home import default_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from caption_throughput import cli_rate, draw_images, encoder_rates, in_child
from results_file import describe_machine, machine, markdown_table, save_results, write_section
from service_load import free_port, load_with_cpu, request_bytes, start_server

SECTION = "## Encoder backends"
BACKENDS = {"torch": "torch fp32", "fp32": "ONNX Runtime fp32", "int8": "ONNX Runtime int8"}
TORCH_ENCODER_BATCH = 16  # the predictor's on a CPU; ONNX Runtime's is captioner.predictor.ONNX_ENCODER_BATCH
CALIBRATION_IMAGES = 64
CPU_PARTS = ("server_ms", "workers_ms", "clients_ms")  # service_load.cpu_per_request's
SHORT_RUN = 16  # the short folder run takes this fraction of the images


def export_models(checkpoint: Path, calibration: list[Path], folder: Path) -> dict[str, Path]:
    """The checkpoint with an fp32 and with an int8 ONNX encoder (captioner export's steps)."""
    from captioner.checkpoint import load_checkpoint
    from captioner.onnx_encoder import export_encoder, quantize_encoder
    from captioner.predictor import Predictor
    from training.export import calibration_batches
    from training.train import save_model

    model, card = load_checkpoint(checkpoint)
    fp32 = export_encoder(model.encoder)
    batches = calibration_batches(Predictor(model, card), calibration)
    int8 = quantize_encoder(fp32, batches, keep_fp32=model.encoder.keep_fp32_in_int8)
    paths = {"fp32": folder / "fp32.safetensors", "int8": folder / "int8.safetensors"}
    save_model(model, paths["fp32"], card, fp32)
    save_model(model, paths["int8"], card, int8)
    return paths


def model_and_flags(models: dict[str, Path], backend: str) -> tuple[Path, list[str]]:
    return (models["fp32"], ["--backend", "torch"]) if backend == "torch" else (models[backend], [])


def speed_rounds(args, models: dict[str, Path], folder: Path, paths: list[Path]) -> list[dict]:
    """(1) and (2), the backends taking turns each round."""
    rounds = []
    for r in range(args.rounds):
        rates = {}
        for backend in list(BACKENDS)[:: 1 if r % 2 == 0 else -1]:  # a drift of the machine's speed evens out
            model, flags = model_and_flags(models, backend)
            batch = TORCH_ENCODER_BATCH if flags else ONNX_ENCODER_BATCH
            encoder = in_child(encoder_rates, model, paths, args.workers, "torch" if flags else "auto", [batch])
            caption = in_child(cli_rate, model, folder, len(paths), args.max_length, flags)
            rates[backend] = {"encoder": encoder[str(batch)], "caption": caption}
        print(
            f"round {r + 1}, images/s:",
            *(
                f"{b} encoder {v['encoder']['images_per_s']:.1f} caption {v['caption']['images_per_s']:.1f}"
                for b, v in rates.items()
            ),
            file=sys.stderr,
        )
        rounds.append(rates)
    return rounds


def folder_rates(model: Path, folders: tuple[Path, Path], counts: tuple[int, int], args, flags: list[str]) -> dict:
    """`captioner caption` on the whole folder (images/s, start-up included) and its steady rate and
    CPU ms per image: the whole run's less the short run's, over the images beyond the short run's.
    None where not measurable (a run too short to tell)."""
    whole, short = (in_child(cli_rate, model, f, n, args.max_length, flags) for f, n in zip(folders, counts))
    extra_seconds = counts[0] / whole["images_per_s"] - counts[1] / short["images_per_s"]
    extra_images = counts[0] - counts[1]
    measurable = extra_images > 0 and extra_seconds > 0
    return {
        "folder": whole["images_per_s"],
        "folder_steady": extra_images / extra_seconds if measurable else None,
        "folder_steady_cpu_ms": (
            (whole["cpu_ms"] * counts[0] - short["cpu_ms"] * counts[1]) / extra_images if measurable else None
        ),
    }


def service_rounds(args, models: dict[str, Path], folders: tuple[Path, Path], paths: list[Path], scratch: Path) -> dict:
    """(3): per backend and round, the folder command's rates, then the server's at --clients."""
    requests = [request_bytes(path, args.max_length) for path in paths]
    counts = (len(paths), len(list(folders[1].iterdir())))
    shares: dict[str, list[dict]] = {}
    for backend in BACKENDS:
        model, flags = model_and_flags(models, backend)
        shares[backend] = []
        for _ in range(args.service_rounds):
            folder = folder_rates(model, folders, counts, args, flags)
            port = free_port()
            server = start_server(model, port, scratch / "server.log", flags)
            try:
                served = load_with_cpu(server.pid, port, requests, args.clients, args.warm_up, args.seconds)
            finally:
                server.terminate()
                server.wait(60)
            shares[backend].append(
                {**folder, "server": served["images_per_s"], "p50_ms": served["p50_ms"], "cpu": served["cpu"]}
            )
            print(f"{backend}: folder {folder}, server {served['images_per_s']:.1f} images/s", file=sys.stderr)
    return shares


def _median_and_range(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f} to {max(values):.2f})"


def _share_of_steady(shares: list[dict]) -> str:
    """The service's rate over the folder command's steady rate, in the rounds that measured one."""
    measured = [s["server"] / s["folder_steady"] for s in shares if s["folder_steady"]]
    return _median_and_range(measured) if measured else "-"


def render(results: dict) -> str:
    rounds, service, setup = results["rounds"], results["service"], results["setup"]
    rate = lambda r, backend, what: r[backend][what]["images_per_s"]
    rows = []
    for backend, label in BACKENDS.items():
        shares = service[backend]
        rows.append(
            [
                label,
                f"{statistics.median(rate(r, backend, 'encoder') for r in rounds):.1f}",
                _median_and_range([rate(r, backend, "encoder") / rate(r, "torch", "encoder") for r in rounds]),
                f"{statistics.median(rate(r, backend, 'caption') for r in rounds):.1f}",
                _median_and_range([rate(r, backend, "caption") / rate(r, "torch", "caption") for r in rounds]),
                f"{statistics.median(s['server'] for s in shares):.1f}",
                _median_and_range([s["server"] / s["folder"] for s in shares]),
                _share_of_steady(shares),
                " / ".join(f"{statistics.median(s['cpu'][part] for s in shares):.1f}" for part in CPU_PARTS),
            ]
        )
    header = [
        "backend",
        f"encoder alone (batch: torch {TORCH_ENCODER_BATCH}, ONNX Runtime {ONNX_ENCODER_BATCH}), images/s",
        "vs torch",
        "`captioner caption` images/s",
        "vs torch",
        f"service, {setup['clients']} clients, images/s",
        "service / folder command's run",
        "service / its steady rate",
        "CPU ms per request: server process / workers / clients",
    ]
    return "\n".join(
        [
            SECTION,
            "",
            f"`{results['command']}`",
            "",
            f"{describe_machine(results['machine'])}. Model: {setup['model']}. {setup['images']} images, beam size 3, "
            f"attention on, at most {setup['max_length']} words; {setup['workers']} workers of 1 thread for the "
            f"encoder alone. Medians of {len(rounds)} rounds (ratios within each round: median, then range); the "
            f"service columns: {setup['service_rounds']} rounds of a folder run, a run on its first "
            f"1/{SHORT_RUN}, then {setup['seconds']:.0f} s of load after {setup['warm_up']:.0f} s of warm-up. A "
            "folder run's rate includes its start-up; its steady rate does not (the module's docstring).",
            "",
            *markdown_table(header, rows),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=default_checkpoint())
    parser.add_argument("--images", type=int, default=1024, help="long enough that start-up is a small share")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--service-rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds of each service round")
    parser.add_argument("--warm-up", type=float, default=3.0)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--out", type=Path, help="write the results into this Markdown file")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"no model at {args.checkpoint}: run `make model` first")
    args.workers = torch.get_num_threads()  # captioner caption's default: one worker a core
    with tempfile.TemporaryDirectory(prefix="backends-bench-") as scratch:
        folder = Path(scratch, "images")
        folder.mkdir()
        draw_images(folder, args.images)
        paths = sorted(folder.iterdir())
        short = Path(scratch, "short")
        short.mkdir()
        for path in paths[: max(1, len(paths) // SHORT_RUN)]:
            (short / path.name).hardlink_to(path)
        models = in_child(export_models, args.checkpoint, paths[:CALIBRATION_IMAGES], Path(scratch))
        rounds = speed_rounds(args, models, folder, paths)
        service = service_rounds(args, models, (folder, short), paths, Path(scratch))
    results = {
        "command": "python benchmarks/backends.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "setup": {
            "model": args.checkpoint.name,
            "images": args.images,
            "max_length": args.max_length,
            "workers": args.workers,
            "clients": args.clients,
            "seconds": args.seconds,
            "warm_up": args.warm_up,
            "service_rounds": args.service_rounds,
        },
        "rounds": rounds,
        "service": service,
    }
    print(text := render(results))
    if args.out:
        save_results(args.out, "backends", results)
        write_section(args.out, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
