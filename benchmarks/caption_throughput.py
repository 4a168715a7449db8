"""Throughput of `captioner caption` against the encoder alone and the tutorials' loop.

    .venv/bin/python benchmarks/caption_throughput.py --out benchmarks/RESULTS.md
    .venv/bin/python benchmarks/caption_throughput.py --images 6 --rounds 1 --max-length 4  # quick

On the same 640x480 JPEGs drawn here, beam size 3, attention on: images/s and CPU ms per
image of (a) the encoder alone on ready pixels at each of ENCODER_BATCH_SIZES, in as many
processes as (c) has workers; (b) the tutorials' loop: one image at a time, the whole picture
decoded, the image projected again at every step (ProjectingEveryStep); (b') that loop with
the library's shortcuts; (c) `captioner caption` end to end, and with --amp. Then the CPU cost
of (c)'s stages on one thread. Each contender runs in a fresh process, warmed up; they take
turns for --rounds rounds and each keeps its best. With --out, the measurements go to
results/caption_throughput.json beside it, and its section is rendered from them.
"""

import argparse
import contextlib
import multiprocessing
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import cli
from captioner.decoder import Decoder, DecoderState, Memory
from captioner.decoding import DecodeOptions, decode
from captioner.images import stack_pixels
from captioner.predictor import Predictor, PreparedImage
from folder.journal import result_line
from runtime.allocator import keep_freed_memory
from runtime.home import default_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from results_file import describe_machine, machine, markdown_table, save_results, write_section

SECTION = "## Folder captioning throughput"
BEAM_SIZE = 3
CHILD_PRELOAD = ("torch", "onnxruntime", "cli", "captioner.predictor", "folder.journal")  # in_child's
ENCODER_BATCH_SIZES = (4, 8, 16, 32)
STAGE_IMAGES, STAGE_BATCH_SIZE = 256, 32  # captioner caption's default batch size
LABELS = {
    "a": "(a) encoder alone, batch {batch_size}, {threads} processes of 1 thread",
    "b": "(b) the tutorials' loop, {threads} threads",
    "b'": "(b') that loop with the library's shortcuts",
    "c": "(c) `captioner caption`",
    "c_amp": "(c) with --amp",
}


def measure(run: Callable[[], None], count: int) -> dict:
    """Images per second, and CPU ms per image of this process and its ended children ((c)'s workers)."""
    cpu = lambda: sum(
        u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )
    start_wall, start_cpu = time.perf_counter(), cpu()
    run()
    return {"images_per_s": count / (time.perf_counter() - start_wall), "cpu_ms": 1000 * (cpu() - start_cpu) / count}


def in_child(function: Callable, *args):
    """function(*args) in a fresh process, with the allocator `captioner` sets up. The process is
    forked from a server that imported torch, ONNX Runtime and the project once (CHILD_PRELOAD),
    rather than spawned to import them all again: a benchmark starts many children."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(CHILD_PRELOAD))  # read when the server starts, on the first call
    with ProcessPoolExecutor(1, context, initializer=keep_freed_memory) as child:
        return child.submit(function, *args).result()


def draw_images(folder: Path, count: int, seed: int = 0) -> None:
    """Photo-sized JPEGs: smooth backgrounds, noise and a few shapes, for a realistic decoding cost."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:480, 0:640, 0:1][:2] / 640.0  # (480, 640, 1) each
    for i in range(count):
        a, b = rng.uniform(-1, 1, (2, 3))
        pixels = rng.uniform(40, 200, 3) + 60 * (a * xs + b * ys) + rng.normal(0, 6, (480, 640, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(2, 6)):
            x, y, w, h = rng.integers(0, 560), rng.integers(0, 400), *rng.integers(30, 200, 2)
            fill = tuple(map(int, rng.integers(0, 256, 3)))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill)
        image.save(folder / f"bench_{i:06d}.jpg", quality=90)


def encode_share(encoder: Callable, batches: list[torch.Tensor], ready, times) -> None:
    """One of (a)'s processes: warmed up on its first batch, it starts when all the others are ready."""
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            encoder(batches[0])
            ready.wait()
            start, cpu = time.perf_counter(), time.process_time()
            for batch in batches:
                encoder(batch)  # (B, P, D)
    except BaseException:
        ready.abort()  # the others stop waiting
        raise
    times.put((start, time.perf_counter(), time.process_time() - cpu))


def encoder_rates(
    checkpoint: Path, paths: list[Path], processes: int, backend: str = "auto", sizes=ENCODER_BATCH_SIZES
) -> dict[str, dict]:
    """(a) at each batch size, the batches shared among forked processes as (c)'s are, on the
    encoder `backend` gives (captioner.predictor)."""
    predictor = Predictor.from_checkpoint(checkpoint, backend=backend)
    pixels = stack_pixels([predictor.prepare(p).pixels for p in paths])  # (N, 3, S, S)
    fork, rates = multiprocessing.get_context("fork"), {}
    for size in sizes:
        batches = pixels.split(size)
        shares = [batches[i::processes] for i in range(min(processes, len(batches)))]
        ready, times = fork.Barrier(len(shares)), fork.SimpleQueue()
        workers = [fork.Process(target=encode_share, args=(predictor.encoder, share, ready, times)) for share in shares]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        if any(worker.exitcode for worker in workers):
            raise RuntimeError(f"an encoder process failed at batch size {size}")
        starts, ends, cpu = zip(*(times.get() for _ in workers), strict=True)
        rates[str(size)] = {
            "images_per_s": len(paths) / (max(ends) - min(starts)),
            "cpu_ms": 1000 * sum(cpu) / len(paths),
        }
    return rates


class ProjectingEveryStep:
    """The library's decoder as the tutorials' attention runs it: every step projects the image's
    features again, for each row (their attention modules take the encoder output at each call)."""

    def __init__(self, decoder: Decoder, features: torch.Tensor):
        self.decoder, self.features = decoder, features  # features (1, P, D)
        self.init_state, self.has_attention = decoder.init_state, decoder.has_attention

    def step(self, words: torch.Tensor, state: DecoderState, memory: Memory):
        again = self.decoder.prepare(self.features.expand(memory.rows, -1, -1))  # one image per row: (N, P, R)
        return self.decoder.step(words, state, again)


def loop_rate(checkpoint: Path, paths: list[Path], max_length: int, tutorial: bool) -> dict:
    """(b) with `tutorial`, else (b'): one image at a time, a JSON line each, after one to warm up."""
    predictor = Predictor.from_checkpoint(checkpoint)
    decoder = predictor.model.decoder
    options = DecodeOptions(beam_size=BEAM_SIZE, attention=True, max_length=max_length)

    def caption(path: Path) -> str:
        if tutorial:  # the whole picture decoded, then resized
            picture = Image.open(path).convert("RGB")
            image = PreparedImage(predictor.preset(picture), *picture.size)
        else:
            image = predictor.prepare(path)
        features = predictor.encode(stack_pixels([image.pixels]))  # (1, P, D)
        steps = ProjectingEveryStep(decoder, features) if tutorial else decoder
        hypotheses = decode(steps, decoder.prepare(features), options)[0]
        return result_line(path.name, predictor.format_result(image, hypotheses, options))

    def run(some: list[Path]) -> None:
        with tempfile.TemporaryFile("w") as f, torch.inference_mode():
            f.writelines(caption(path) for path in some)

    run(paths[:1])
    return measure(lambda: run(paths), len(paths))


def cli_rate(checkpoint: Path, folder: Path, count: int, max_length: int, extra: list[str]) -> dict:
    """(c) in a process that has run it on a thirty-second of the images first. Loading the model is included."""
    argv = [
        "caption",
        str(folder),
        "--checkpoint",
        str(checkpoint),
        "--method",
        "beam",
        "--beam-size",
        str(BEAM_SIZE),
        "--attention",
        "--max-length",
        str(max_length),
        *extra,
    ]

    def run(*more: str) -> None:
        if (status := cli.main([*argv, *more])) != 0:
            raise RuntimeError(f"captioner caption exited with {status}")

    with tempfile.TemporaryDirectory() as scratch:
        run("--shard", "0/32", "--out", f"{scratch}/warm-up.jsonl")
        rate = measure(lambda: run("--out", f"{scratch}/captions.jsonl"), count)
        if (lines := Path(scratch, "captions.jsonl").read_text().count("\n")) != count:
            raise RuntimeError(f"captioner caption wrote {lines} lines for {count} images")
    return rate


def stage_costs(checkpoint: Path, paths: list[Path], max_length: int) -> dict:
    """CPU ms per image of each of (c)'s stages on one thread, in batches as (c)'s (thread time,
    which another process's load barely changes), and the words per caption."""
    torch.set_num_threads(1)
    predictor = Predictor.from_checkpoint(checkpoint)
    options = DecodeOptions(beam_size=BEAM_SIZE, attention=True, max_length=max_length)
    ticks = [time.thread_time()]
    images = [predictor.prepare(p) for p in paths]
    ticks.append(time.thread_time())
    with torch.inference_mode():
        features = [
            predictor.encode(stack_pixels([im.pixels for im in images[i : i + STAGE_BATCH_SIZE]]))
            for i in range(0, len(images), STAGE_BATCH_SIZE)
        ]  # (B, P, D) each
        ticks.append(time.thread_time())
        captions = [hyps for batch in features for hyps in predictor.model.caption_features(batch, options)]
        ticks.append(time.thread_time())
    for path, image, hyps in zip(paths, images, captions, strict=True):
        result_line(path.name, predictor.format_result(image, hyps, options))
    ticks.append(time.thread_time())
    stages = zip(("read and prepare", "encoder", "beam search", "result line"), ticks, ticks[1:], strict=False)
    return {
        "cpu_ms": {stage: 1000 * (end - begin) / len(paths) for stage, begin, end in stages},
        "words": sum(len(hyps[0].token_ids) for hyps in captions) / len(captions),
    }


def native_bf16() -> bool:
    """Whether the CPU computes in bf16 itself (AMX or AVX-512 BF16): elsewhere torch emulates it,
    and --amp runs many times slower than float32, which is not worth the benchmark's minutes."""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
        return "amx_bf16" in flags or "avx512_bf16" in flags
    return False


def render(results: dict) -> str:
    """The section of RESULTS.md: machine and settings, the table, (a) by batch size, (c)'s stages."""
    setup, rounds, ms = results["setup"], results["rounds"], results["stages"]["cpu_ms"]
    speed = lambda rate: rate["images_per_s"]
    measured = {key: label for key, label in LABELS.items() if key in rounds[0]}
    best = {key: max((r[key] for r in rounds), key=speed) for key in measured}
    rows = []
    for key, label in measured.items():
        within = [speed(r["c"]) / speed(r[key]) for r in rounds]
        rows.append(
            [
                label.format(batch_size=best["a"]["batch_size"], **setup),
                f"{speed(best[key]):.1f}",
                f"{best[key]['cpu_ms']:.1f}",
                f"{speed(best['c']) / speed(best[key]):.2f}",
                f"{min(within):.2f} to {max(within):.2f}",
            ]
        )
    total = sum(ms.values())
    return "\n".join(
        [
            SECTION,
            "",
            f"`{results['command']}`",
            "",
            f"{describe_machine(results['machine'])}. Model: {setup['model']}. {setup['images']} images, beam size "
            f"{BEAM_SIZE}, attention on, at most {setup['max_length']} words ({results['stages']['words']:.1f} on "
            f"average); the best of {len(rounds)} rounds.",
            "",
            *markdown_table(["", "images/s", "CPU ms per image", "(c) / this", "(c) / this within a round"], rows),
            "",
            "(a) by batch size, images/s: "
            + ", ".join(
                f"{size}: {max(speed(r['a_sizes'][size]) for r in rounds):.1f}" for size in rounds[0]["a_sizes"]
            )
            + ".",
            "",
            f"(c)'s stages on one thread, batches of {STAGE_BATCH_SIZE}, CPU ms per image: "
            + ", ".join(f"{stage} {cost:.1f}" for stage, cost in ms.items())
            + f"; total {total:.1f}, encoder share {ms['encoder'] / total:.2f}.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=default_checkpoint())
    parser.add_argument("--images", type=int, default=1024, help="how many images to draw")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--out", type=Path, help="the Markdown file to write the results into")
    args = parser.parse_args(argv)
    if not args.checkpoint.exists():
        parser.error(f"no checkpoint at {args.checkpoint}: `make model` trains the default one")
    keep_freed_memory()  # what `captioner` does at start

    with tempfile.TemporaryDirectory(prefix="caption-bench-") as tmp:
        folder = Path(tmp)
        draw_images(folder, args.images)
        paths = sorted(folder.iterdir())
        threads = torch.get_num_threads()
        rounds = []
        for r in range(args.rounds):
            sizes = in_child(encoder_rates, args.checkpoint, paths, threads)
            size = max(sizes, key=lambda size: sizes[size]["images_per_s"])
            rates = {"a": {**sizes[size], "batch_size": int(size)}, "a_sizes": sizes}
            for key, tutorial in (("b", True), ("b'", False)):
                rates[key] = in_child(loop_rate, args.checkpoint, paths, args.max_length, tutorial)
            rates["c"] = in_child(cli_rate, args.checkpoint, folder, len(paths), args.max_length, [])
            if native_bf16():
                rates["c_amp"] = in_child(cli_rate, args.checkpoint, folder, len(paths), args.max_length, ["--amp"])
            print(
                f"round {r + 1}, images/s:",
                *(f"{key} {rates[key]['images_per_s']:.1f}" for key in LABELS if key in rates),
                file=sys.stderr,
            )
            rounds.append(rates)
        predictor = Predictor.from_checkpoint(args.checkpoint)
        c, runtime = predictor.model.config, predictor.runtime
        results = {
            "command": "python benchmarks/caption_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine(),
            "setup": {
                "model": f"{args.checkpoint} ({c.encoder} encoder on {runtime['backend']} {runtime['precision']}, "
                f"{c.cell} decoder, hidden {c.hidden_dim})",
                "images": len(paths),
                "max_length": args.max_length,
                "threads": threads,
            },
            "rounds": rounds,
            "stages": in_child(stage_costs, args.checkpoint, paths[:STAGE_IMAGES], args.max_length),
        }
    print(text := render(results))
    if args.out:
        save_results(args.out, "caption_throughput", results)
        write_section(args.out, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
