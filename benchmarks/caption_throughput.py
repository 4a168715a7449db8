"""Throughput of `captioner caption` against the encoder alone and the tutorials' loop.

    .venv/bin/python benchmarks/caption_throughput.py --out benchmarks/RESULTS.md
    .venv/bin/python benchmarks/caption_throughput.py --stand-in --images 256 --rounds 2

On the same images (640x480 JPEGs drawn here, or --images-dir), beam size 3,
attention on, it measures images per second of
  (a) the encoder alone on ready-made pixels at its best batch size and thread
      layout (streams of threads; more than one stream are processes, as
      (c)'s workers are): the floor no captioner can beat. A sweep on a few
      images finds the six fastest layouts (its ranking is noisy: a busy
      second can reorder them); all six run on every image in every round and
      (a) is the fastest;
  (b) a one-image-at-a-time loop as the popular tutorials write it (sgrvinod's
      PyTorch tutorial, TensorFlow's "image captioning with visual attention"):
      decode the whole picture and resize it, encode it, then a per-image beam
      search with K rows whose attention projects the image's features again at
      every step (their attention modules take the encoder output each call);
      finished beams leave until none are left;
  (b') the same loop with this library's per-image shortcuts: JPEGs decoded at
      reduced scale and the image projected once: a stronger baseline than the
      tutorials, to show what batching alone buys;
  (c) `captioner caption` end to end, model loading included, in a process
      that has imported torch and timm and captioned a few images before;
      and, for information, the same with --amp (the encoder in bf16), which
      the targets do not compare: (a) runs in float32.
Each contender runs with its best torch thread count, in a fresh process of its
own: a process's history changes its speed by several percent (after large
encoder batches, small ones run slower), and no contender should inherit
another's. The contenders take turns for --rounds rounds and each keeps its
best round, so a neighbour's burst of CPU on a shared machine hurts all alike;
the CPU time each spends per image is reported too. All run with the allocator
`captioner` sets up (runtime.allocator). Targets: (c) >= 0.75 x (a) and
(c) >= 3 x (b). The section "## Folder captioning throughput" of --out is
replaced with the results; other sections are kept.

--checkpoint defaults to the default model; with --stand-in, a missing
checkpoint is replaced by a random-weight model of the same shape
(efficientnet_lite0_s16 encoder, default decoder): the same cost per step.
"""

import argparse
import json
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw

import cli
from runtime.allocator import keep_freed_memory
from captioner.decoding import DecodeOptions, Hypothesis, rank_score
from folder.journal import result_line
from runtime.home import default_checkpoint
from captioner.images import stack_pixels
from captioner.predictor import PreparedImage, Predictor
from captioner.vocab import Vocabulary

sys.path.insert(0, str(Path(__file__).parent))
from results_file import write_section  # noqa: E402

BEAM_SIZE = 3
SECTION = "## Folder captioning throughput"
ENCODER_BATCH_SIZES = (1, 2, 4, 8, 16, 32)
SWEEP_IMAGES = 256  # 64 were too few: a busy half second reordered batches 4 and 16
ENCODER_FINALISTS = 6  # the sweep's fastest layouts, all measured on every image in every round: its ranking is noisy
CLI_BATCH_SIZE = 32  # captioner caption's default, for the stage costs


class Rate(NamedTuple):
    images_per_s: float
    cpu_ms: float  # CPU time of the process, all its threads and its ended children, per image


def measure(run: Callable[[], None], count: int) -> Rate:
    def cpu() -> float:  # children too: (c)'s workers are processes, counted once they have ended
        usages = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return sum(usage.ru_utime + usage.ru_stime for usage in usages)

    start_wall, start_cpu = time.perf_counter(), cpu()
    run()
    return Rate(count / (time.perf_counter() - start_wall), 1000 * (cpu() - start_cpu) / count)


# --- inputs ----------------------------------------------------------------------


def draw_images(folder: Path, count: int, seed: int = 0) -> None:
    """Photo-sized JPEGs with smooth backgrounds and a few shapes: realistic decoding cost."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:480, 0:640] / 640.0
    for i in range(count):
        a, b = rng.uniform(-1, 1, (2, 3))
        base = rng.uniform(40, 200, 3)
        pixels = base + 60 * (a * xs[..., None] + b * ys[..., None])  # (480, 640, 3)
        pixels += rng.normal(0, 6, pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(2, 6)):
            x0, y0 = rng.integers(0, 560), rng.integers(0, 400)
            box = (x0, y0, x0 + rng.integers(30, 200), y0 + rng.integers(30, 200))
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        image.save(folder / f"bench_{i:06d}.jpg", quality=90)


def stand_in_checkpoint(path: Path) -> None:
    """A random-weight model with the real model's shape and a Shapes-like vocabulary."""
    from captioner.checkpoint import save_checkpoint
    from captioner.config import ModelConfig
    from captioner.model import build_model

    words = ("a there is are picture of single two three shapes and on background to the left right above below "
             "small little large big red green blue yellow purple circle square triangle diamond white gray dark black")
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="efficientnet_lite0_s16"), Vocabulary.build([words]), pretrained=False)
    save_checkpoint(model, path, {"training_data": "none: random weights for benchmarking"})


# --- (a) the encoder alone ---------------------------------------------------------


def encoder_rate(predictor: Predictor, pixels: torch.Tensor, batch_size: int, streams: int) -> Rate:
    """Encoding `pixels` (N, 3, S, S) in batches, on `streams` streams of torch.get_num_threads() //
    streams intra-op threads each. More than one stream are forked processes, as (c)'s lanes are:
    the encoder runs its front image by image, and threads of one process would slow each other
    through Python's lock. Each stream warms up before the clock starts."""
    encoder = predictor.model.encoder
    threads = max(1, torch.get_num_threads() // streams)
    batches = list(pixels.split(batch_size))
    if streams == 1:
        with torch.inference_mode():
            encoder(batches[0])  # warm up: the first call at a batch size sets up its kernels and grows the heap

        def run() -> None:
            with torch.inference_mode():
                for batch in batches:
                    encoder(batch)  # (B, P, D)

        return measure(run, len(pixels))

    fork = multiprocessing.get_context("fork")
    shares = [batches[s::streams] for s in range(streams) if batches[s::streams]]
    ready, cpu_seconds = fork.Barrier(len(shares) + 1), fork.SimpleQueue()

    def stream(mine: list[torch.Tensor]) -> None:
        try:
            torch.set_num_threads(threads)
            with torch.inference_mode():
                encoder(mine[0])  # its own heap grows here, not on the clock
                ready.wait()
                start = time.process_time()
                for batch in mine:
                    encoder(batch)  # (B, P, D)
            cpu_seconds.put(time.process_time() - start)
        except BaseException:
            ready.abort()  # the parent stops waiting, whichever wait it is in
            cpu_seconds.put(None)
            raise

    workers = [fork.Process(target=stream, args=(mine,)) for mine in shares]
    for worker in workers:
        worker.start()
    ready.wait()
    start = time.perf_counter()
    cpu = [cpu_seconds.get() for _ in workers]  # each arrives as its stream ends
    wall = time.perf_counter() - start
    for worker in workers:
        worker.join()
    if None in cpu:
        raise RuntimeError(f"an encoder stream failed at batch size {batch_size}")
    return Rate(len(pixels) / wall, 1000 * sum(cpu) / len(pixels))


def encoder_rates(checkpoint: Path, paths: list[Path], threads: int,
                  layouts: list[tuple[int, int]]) -> dict[tuple[int, int], Rate]:
    """(a) at each (batch size, streams) layout, smallest batches first: after batches of 16 and
    more, a process's encoder stays up to 10% slower at small batches (measured, cause unknown)."""
    torch.set_num_threads(threads)
    predictor = Predictor.from_checkpoint(checkpoint)
    pixels = stack_pixels([predictor.prepare(p).pixels for p in paths])  # (N, 3, S, S)
    return {layout: encoder_rate(predictor, pixels, *layout) for layout in sorted(layouts)}


def in_child(function: Callable, *args):
    """function(*args) in a fresh process: each contender's round starts as clean as the others'."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn, initializer=keep_freed_memory) as child:
        return child.submit(function, *args).result()


# --- (b) the tutorials' loop, and (b') the same with this library's shortcuts -------


def tutorial_image(predictor: Predictor, path: Path) -> PreparedImage:
    """The tutorials' reading: the whole picture decoded, then resized and normalised."""
    picture = Image.open(path).convert("RGB")
    return PreparedImage(predictor.preset(picture), *picture.size)


def tutorial_beam_search(predictor: Predictor, pixels: torch.Tensor, beam_size: int, max_length: int,
                         project_every_step: bool) -> Hypothesis:
    """One image: k beams as k rows; finished beams leave the batch until none are left.

    With `project_every_step`, as in the tutorials, every step projects the features
    of each live row again (their attention modules take the encoder output);
    otherwise the image is projected once and its rows share it."""
    decoder = predictor.model.decoder
    features = predictor.model.encoder(pixels.unsqueeze(0))  # (1, P, D)
    k = beam_size
    image = decoder.prepare(features)
    memory = image.repeat(k)  # k rows reading the one image
    state = decoder.init_state(memory)
    words = torch.full((k,), Vocabulary.start_id, dtype=torch.long)  # (k,)
    sequences = torch.zeros(k, 0, dtype=torch.long)  # (k, t)
    alphas = torch.zeros(k, 0, image.regions.size(1))  # (k, t, P)
    scores = torch.zeros(k)  # (k,)
    complete = []
    for step in range(max_length + 1):
        if project_every_step:
            memory = decoder.prepare(features.expand(k, -1, -1))  # (k, P, ...) as k images
        logits, state, alpha = decoder.step(words, state, memory)  # (k, V), state, (k, P)
        log_probs = scores.unsqueeze(1) + logits.log_softmax(1)  # (k, V)
        if step == 0:
            scores, best = log_probs[0].topk(k)  # all beams are the same at the start
        else:
            scores, best = log_probs.view(-1).topk(k)  # (k,)
        parent, words = best // log_probs.size(1), best % log_probs.size(1)  # (k,), (k,)
        sequences = torch.cat([sequences[parent], words.unsqueeze(1)], 1)  # (k, t+1)
        alphas = torch.cat([alphas[parent], alpha[parent].unsqueeze(1)], 1)  # (k, t+1, P)
        ended = (words == Vocabulary.end_id) | (step == max_length)
        for i in ended.nonzero().flatten().tolist():
            n = len(sequences[i]) - 1 if words[i] == Vocabulary.end_id else len(sequences[i])
            complete.append(Hypothesis(sequences[i, :n].tolist(), float(scores[i]),
                                       rank_score(float(scores[i]), n, 0.7), alphas[i, :n]))
        going = (~ended).nonzero().flatten()
        k = len(going)
        if k == 0:
            break
        state, memory = state.index_select(parent[going]), image.repeat(k)
        sequences, alphas, scores, words = sequences[going], alphas[going], scores[going], words[going]
    return max(complete, key=lambda h: h.score)


def tutorial_rate(predictor: Predictor, paths: list[Path], out: Path, max_length: int, threads: int,
                  literal: bool) -> Rate:
    """(b) with `literal`, else (b'): one image at a time, a JSON line each."""
    options = DecodeOptions(beam_size=BEAM_SIZE, attention=True, max_length=max_length)

    def run() -> None:
        with open(out, "w") as f, torch.inference_mode():
            for path in paths:
                image = tutorial_image(predictor, path) if literal else predictor.prepare(path)
                best = tutorial_beam_search(predictor, image.pixels, BEAM_SIZE, max_length, project_every_step=literal)
                f.write(result_line(path.name, predictor.format_result(image, [best], options)))
                f.flush()

    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return measure(run, len(paths))
    finally:
        torch.set_num_threads(default_threads)


def fresh_tutorial_rate(checkpoint: Path, paths: list[Path], out: Path, max_length: int, threads: int,
                        literal: bool) -> Rate:
    """tutorial_rate in a process of its own, warmed up on one image first."""
    predictor = Predictor.from_checkpoint(checkpoint)
    tutorial_rate(predictor, paths[:1], out, max_length, threads, literal)
    return tutorial_rate(predictor, paths, out, max_length, threads, literal)


# --- (c) captioner caption ---------------------------------------------------------


def cli_rate(checkpoint: Path, folder: Path, count: int, out: Path, extra: list[str]) -> Rate:
    """`captioner caption` in a process that has run it before, on a thirty-second of the images,
    as (a) and (b) are warmed up: the first run's heap growth and kernel set-up are a one-off cost
    that a folder of thousands of images does not notice. Loading the model is included."""
    argv = ["caption", str(folder), "--checkpoint", str(checkpoint), "--method", "beam",
            "--beam-size", str(BEAM_SIZE), "--attention", *extra]
    default_threads = torch.get_num_threads()

    def run(*more: str) -> None:
        status = cli.main([*argv, *more])
        if status != 0:
            raise RuntimeError(f"captioner caption exited with {status}")

    warm_up = out.with_name(out.name + ".warm-up")
    run("--shard", "0/32", "--out", str(warm_up))
    warm_up.unlink()
    out.unlink(missing_ok=True)  # or the run resumes and does nothing
    rate = measure(lambda: run("--out", str(out)), count)
    torch.set_num_threads(default_threads)  # the command sets them for the process
    lines = sum(1 for _ in open(out))
    if lines != count:
        raise RuntimeError(f"captioner caption wrote {lines} lines for {count} images")
    return rate


# --- where the time goes ------------------------------------------------------------


def stage_costs(predictor: Predictor, paths: list[Path], batch_size: int, max_length: int) -> dict:
    """CPU milliseconds per image of each stage of (c), on one thread (thread time, which
    another process's load barely changes), and the words per caption."""
    options = DecodeOptions(beam_size=BEAM_SIZE, attention=True, max_length=max_length)
    default_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    clock = time.thread_time
    costs = dict.fromkeys(("read and prepare", "encoder", "beam search", "result line"), 0.0)
    lengths = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        t = clock()
        images = [predictor.prepare(p) for p in chunk]
        costs["read and prepare"] += clock() - t
        with torch.inference_mode():
            t = clock()
            features = predictor.encode(stack_pixels([im.pixels for im in images]))  # (B, P, D), as (c) does
            costs["encoder"] += clock() - t
            t = clock()
            captions = predictor.model.caption_features(features, options)
            costs["beam search"] += clock() - t
        t = clock()
        for path, image, hyps in zip(chunk, images, captions):
            result_line(path.name, predictor.format_result(image, hyps, options))
        costs["result line"] += clock() - t
        lengths += [len(h[0].token_ids) for h in captions]
    torch.set_num_threads(default_threads)
    return {"ms": {stage: 1000 * seconds / len(paths) for stage, seconds in costs.items()},
            "words": sum(lengths) / len(lengths)}


# --- report ------------------------------------------------------------------------


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "os": platform.platform()}


def describe(predictor: Predictor, checkpoint: Path, stand_in: bool) -> str:
    c = predictor.model.config
    shape = (f"{c.encoder}, {'x'.join(map(str, predictor.model.grid))} grid, {c.cell} decoder with hidden "
             f"{c.hidden_dim}, region {c.region_dim}, attention {c.attention_dim}")
    if stand_in:
        return f"random-weight stand-in ({shape})"
    data = predictor.card.get("training_data", {})
    cider = predictor.card.get("scores", {}).get("test_CIDEr")
    trained = f"; trained on {data.get('name', 'unknown data')}" if isinstance(data, dict) else ""
    return f"{checkpoint} ({shape}{trained}{f', test CIDEr {cider}' if cider is not None else ''})"


def same_best_caption(ours: Path, theirs: Path) -> float:
    """The share of images whose best caption is the same in both outputs: the contenders do one job."""
    def best(path: Path) -> dict[str, str]:
        return {r["file"]: r["captions"][0]["text"] for r in map(json.loads, open(path)) if "captions" in r}

    mine, other = best(ours), best(theirs)
    return sum(other.get(file) == text for file, text in mine.items()) / len(mine)


def encoder_key(batch_size: int, streams: int) -> str:
    return f"encoder {batch_size}x{streams}"


LOOPS = {"tutorial": True, "shortcuts": False}  # (b) and (b'): literal or not
LABELS = {"tutorial": "b", "shortcuts": "b'"}


def fastest_threads(loop_threads: dict[tuple[str, int], Rate]) -> dict[str, int]:
    """For each loop, the torch thread count it ran fastest with."""
    return {loop: max((t for (l, t) in loop_threads if l == loop), key=lambda t: loop_threads[loop, t].images_per_s)
            for loop in LOOPS}


def report(info: dict, setup: dict, sweep: dict, loop_threads: dict, costs: dict, rounds: list[dict]) -> str:
    best = {key: max((r[key] for r in rounds), key=lambda rate: rate.images_per_s) for key in rounds[0]}
    a, b, b2, c, c_amp = (best[k].images_per_s for k in ("encoder", "tutorial", "shortcuts", "caption", "caption_amp"))
    batch, streams = max(setup["finalists"], key=lambda cfg: best[encoder_key(*cfg)].images_per_s)
    threads = fastest_threads(loop_threads)
    stages = costs["ms"]
    bound = stages["encoder"] / sum(stages.values())
    lines = [
        SECTION, "",
        f"`{setup['command']}`", "",
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
        f"Python {info['python']}, {info['os']}. Load average (1 min) before / after: {setup['load_before']} / "
        f"{setup['load_after']}: other work on a shared machine slows every contender.", "",
        f"Model: {setup['model']}. {setup['images']} images, {setup['image_kind']}; beam size {BEAM_SIZE}, "
        f"attention on, at most {setup['max_length']} words ({costs['words']:.1f} on average); best of "
        f"{len(rounds)} rounds.", "",
        "| | images/s | CPU ms per image | (c) / this | target |",
        "| --- | ---: | ---: | ---: | --- |",
        f"| (a) encoder alone: batch {batch}, {streams} stream(s) of {setup['threads'] // streams} thread(s) | "
        f"{a:.1f} | {best['encoder'].cpu_ms:.1f} | {c / a:.2f} | >= 0.75: {'met' if c / a >= 0.75 else 'not met'} |",
        f"| (b) the tutorials' loop: one image at a time, whole picture decoded, image projected again at every "
        f"step, {threads['tutorial']} torch thread(s) | {b:.1f} | {best['tutorial'].cpu_ms:.1f} | {c / b:.2f} | "
        f">= 3: {'met' if c / b >= 3 else 'not met'} |",
        f"| (b') the same loop with this library's shortcuts: reduced-scale JPEG decoding, image projected once, "
        f"{threads['shortcuts']} torch thread(s) | {b2:.1f} | {best['shortcuts'].cpu_ms:.1f} | {c / b2:.2f} | |",
        f"| (c) `captioner caption` end to end ({setup['cli_args']}) | {c:.1f} | {best['caption'].cpu_ms:.1f} | "
        f"1.00 | |",
        f"| (c) with `--amp`: the encoder in bf16 (not the targets' comparison: (a) runs in float32) | "
        f"{c_amp:.1f} | {best['caption_amp'].cpu_ms:.1f} | {c / c_amp:.2f} | |",
        "",
        f"(c) includes starting the command and loading the model (about {setup['load_seconds']:.2f} s once "
        f"torch and timm are imported; a fresh `captioner` process first spends about 3 s importing them). "
        f"Images whose best caption is the same as (c)'s: (b) {100 * setup['agree']['tutorial']:.1f}%, "
        f"(b') {100 * setup['agree']['shortcuts']:.1f}%, (c) with --amp {100 * setup['agree']['caption_amp']:.1f}%. "
        f"(b') reads the pixels (c) reads; (b) decodes the whole "
        f"picture, and captions of pictures unlike the model's training data hang on small pixel differences. "
        f"The rest is beam search: the tutorials' beam narrows as beams finish, ours keeps K beams alive until "
        f"K captions have finished.", "",
        "Every round, images/s (and the ratios within the round, where the machine's load is the most alike): "
        + "; ".join(
            f"a {r['encoder'].images_per_s:.1f} ("
            + ", ".join(f"{bs}x{st}: {r[encoder_key(bs, st)].images_per_s:.1f}" for bs, st in setup["finalists"])
            + f"), b {r['tutorial'].images_per_s:.1f}, "
            f"b' {r['shortcuts'].images_per_s:.1f}, c {r['caption'].images_per_s:.1f}, "
            f"c --amp {r['caption_amp'].images_per_s:.1f} "
            f"(c/a {r['caption'].images_per_s / r['encoder'].images_per_s:.2f}, "
            f"c/b {r['caption'].images_per_s / r['tutorial'].images_per_s:.2f})" for r in rounds) + ".", "",
        f"Encoder alone on the first {SWEEP_IMAGES} images, batch size x streams: images/s: " + ", ".join(
            f"{bs}x{s}: {rate.images_per_s:.1f}" for (bs, s), rate in sorted(sweep.items())) + ". "
        f"Loops (b) and (b') on the first {SWEEP_IMAGES // 4} images, torch threads: images/s: " + ", ".join(
            f"{LABELS[loop]} with {t}: {rate.images_per_s:.1f}"
            for (loop, t), rate in sorted(loop_threads.items(), reverse=True)) + ".", "",
        f"Where the time of (c) goes, CPU ms per image on one thread, batches of {CLI_BATCH_SIZE}: " + ", ".join(
            f"{stage} {ms:.1f}" for stage, ms in stages.items()) + f"; total {sum(stages.values()):.1f}. The "
        f"encoder is {bound:.0%} of that work, so with every core busy and perfect overlap (c) could reach "
        f"{bound:.2f} of the encoder alone at (c)'s own encoder batch size "
        f"({costs['encoder_batch_size']}).", "",
    ]
    if setup["stand_in"]:
        lines += ["The model is a random-weight stand-in: its captions end at random, and a batch's beam search "
                  "runs until its last image is done, often to the maximum length; a trained model's batches "
                  "also run until their longest caption ends.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=default_checkpoint())
    parser.add_argument("--stand-in", action="store_true", help="a random-weight model if the checkpoint is missing")
    parser.add_argument("--images", type=int, default=1024, help="how many images to draw")
    parser.add_argument("--images-dir", type=Path, help="caption these images instead of drawn ones")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--caption-args", default="", help="extra arguments for captioner caption")
    parser.add_argument("--out", type=Path, help="the Markdown file to write the results into")
    args = parser.parse_args(argv)
    keep_freed_memory()  # what `captioner` does at start, here for every contender

    with tempfile.TemporaryDirectory(prefix="caption-bench-") as tmp:
        tmp = Path(tmp)
        checkpoint, stand_in = args.checkpoint, False
        if not checkpoint.exists():
            if not args.stand_in:
                parser.error(f"no checkpoint at {checkpoint}; train one (captioner demo) or add --stand-in")
            checkpoint, stand_in = tmp / "stand-in.safetensors", True
            stand_in_checkpoint(checkpoint)
        folder = args.images_dir
        if folder is None:
            folder = tmp / "images"
            folder.mkdir()
            draw_images(folder, args.images)
        paths = sorted(p for p in folder.iterdir() if p.is_file())
        predictor = Predictor.from_checkpoint(checkpoint)  # the first load also pays for lazy imports
        start = time.perf_counter()
        Predictor.from_checkpoint(checkpoint)
        load_seconds = time.perf_counter() - start  # what (c) pays once the imports are done
        threads = torch.get_num_threads()
        load_before = "%.1f" % os.getloadavg()[0]

        layouts = [(bs, s) for bs in ENCODER_BATCH_SIZES for s in sorted({1, threads})]
        sweep = in_child(encoder_rates, checkpoint, paths[:SWEEP_IMAGES], threads, layouts)
        finalists = sorted(sweep, key=lambda cfg: sweep[cfg].images_per_s, reverse=True)[:ENCODER_FINALISTS]
        loop_threads = {(loop, t): tutorial_rate(predictor, paths[:SWEEP_IMAGES // 4], tmp / "tutorial.jsonl",
                                                 args.max_length, t, literal)
                        for loop, literal in LOOPS.items() for t in sorted({1, threads})}
        best_threads = fastest_threads(loop_threads)
        costs = stage_costs(predictor, paths[:SWEEP_IMAGES], CLI_BATCH_SIZE, args.max_length)
        costs["encoder_batch_size"] = predictor.encoder_batch_size
        print(f"encoder: fastest at (batch, streams) {finalists}; loops: best with {best_threads} thread(s)",
              file=sys.stderr)
        extra = args.caption_args.split()
        rounds = []
        for r in range(args.rounds):
            encoder = {encoder_key(*layout): rate
                       for layout, rate in in_child(encoder_rates, checkpoint, paths, threads, finalists).items()}
            rates = {
                **encoder,
                "encoder": max(encoder.values(), key=lambda rate: rate.images_per_s),
                **{loop: in_child(fresh_tutorial_rate, checkpoint, paths, tmp / f"{loop}.jsonl", args.max_length,
                                  best_threads[loop], literal) for loop, literal in LOOPS.items()},
                "caption": in_child(cli_rate, checkpoint, folder, len(paths), tmp / "caption.jsonl",
                                    ["--max-length", str(args.max_length), *extra]),
                "caption_amp": in_child(cli_rate, checkpoint, folder, len(paths), tmp / "caption_amp.jsonl",
                                        ["--max-length", str(args.max_length), "--amp", *extra]),
            }
            print(f"round {r + 1}: " + ", ".join(f"{k} {v.images_per_s:.1f} images/s" for k, v in rates.items()),
                  file=sys.stderr)
            rounds.append(rates)
        setup = {
            "command": "python benchmarks/caption_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "load_before": load_before, "load_after": "%.1f" % os.getloadavg()[0], "threads": threads,
            "finalists": finalists,
            "model": describe(predictor, checkpoint, stand_in),
            "stand_in": stand_in, "images": len(paths),
            "image_kind": "640x480 JPEGs drawn by the benchmark" if args.images_dir is None else f"from {args.images_dir}",
            "max_length": args.max_length, "cli_args": " ".join(extra) or "default settings",
            "load_seconds": load_seconds,
            "agree": {run: same_best_caption(tmp / "caption.jsonl", tmp / f"{run}.jsonl")
                      for run in (*LOOPS, "caption_amp")},
        }
        text = report(machine(), setup, sweep, loop_threads, costs, rounds)
    print(text)
    if args.out:
        write_section(args.out, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
