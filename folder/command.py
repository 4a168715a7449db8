"""`captioner caption`: caption image files and folders into JSON lines, CSV or COCO results.

    captioner caption photos/ --recursive --out captions.jsonl
    captioner caption a.jpg b.png --method greedy --out captions.jsonl
    captioner caption photos/ --attention --overlays sheets/ --out captions.jsonl
    captioner caption val2014/ --method beam --beam-size 3 --format coco --out results.json

Files are found by discovery (`files`), captioned by the pipeline
(`pipeline`) and recorded in the journal (`journal`); this module
reads the command line, splits the work across shards or torchrun ranks, and
reports.
"""

import argparse
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from captioner.decoding import DecodeOptions
from runtime.allocator import keep_freed_memory
from runtime.cpus import cpus_per_local_rank
from runtime.devices import add_device_arguments, resolve_device
from runtime.flags import add_model_flags, model_from_flags
from runtime.home import default_checkpoint

from .files import Entry, Shard, find_entries
from .journal import (
    JournalWriter,
    check_settings,
    common_settings,
    merge,
    recover,
    write_coco,
    write_csv,
    write_settings,
)

FORMATS = ("jsonl", "csv", "coco")
MAX_BATCH_SIZE = 256
MAX_WORKERS = 32

EPILOG = """\
output:
  One JSON line per file, in the order the files are found (roots as given,
  folders sorted by name): the core's result format (as in the HTTP API)
  plus "file", the path relative to the root it was found under (a file given
  directly: its name). A file that cannot be read or decoded gives
  {"file": ..., "error": {"code": ..., "message": ...}}, with the codes of the
  HTTP API (unreadable, too_large, unsupported_format, too_many_pixels,
  corrupt_image). Files skipped by design get such a line too: not_an_image
  (the extension is not .jpg .jpeg .png .webp .gif .bmp) and outside_root (a
  symbolic link leading out of the folder, unless --follow-links).
  --format csv writes one row per caption; --format coco writes a COCO results
  file ([{"image_id", "caption"}], the best caption per image). image_id is the
  number that ends the file name (COCO_val2014_000000123456.jpg -> 123456) when
  every name has a distinct one, else 1, 2, 3, ... in output order. Both are
  written at the end from the JSON lines journal OUT.jsonl, which stays beside
  OUT.

progress:
  A progress bar (images/s) on a terminal, and a summary line on stderr:
  captioned, failed, skipped, already done, time.

workers:
  Each worker reads, encodes and decodes whole batches, and lines are written
  in order as batches finish. On a CPU under Linux the workers are processes
  forked from the command, one torch thread each by default: they share the
  model's memory, and as threads of one process they would slow each other
  through Python's lock. On a GPU, and elsewhere, they are threads.

resuming:
  Lines are flushed to disk after every batch. Rerun the same command with the
  same --out to caption only the files not yet in the output; an interrupted
  run loses at most the batches in flight. To start over, delete the output.
  Beside the JSON lines (OUT, or the journal OUT.jsonl of csv and coco),
  <that name>.settings.json records what wrote them: the model's SHA-256 and
  the decoding flags. A rerun with another model or other flags is refused
  (exit status 2) instead of mixing two kinds of captions in one output; so is
  merging parts written with different ones. --overlays is not one of those
  settings: it draws sheets for the images a run captions, not for the ones
  already done.
  OUT, its journal and the --overlays folder are never taken as inputs, even
  inside a folder being captioned.

exit status:
  0 when every image was captioned (skipped files do not count), 1 when the
  output holds at least one image that failed (earlier runs included), 2 for a
  usage error.

more than one machine:
  On machine I of N, with the same folder (a shared or copied file system):
      captioner caption data/ -r --shard I/N --out part-I.jsonl
  A file's shard is a hash of its name, so the parts are disjoint, cover every
  file, and do not change when files are added. Then, on one machine, merge
  the parts into the single-run order (the same PATHs find that order):
      captioner caption data/ -r --merge part-*.jsonl --out captions.jsonl
  (cat part-*.jsonl > captions.jsonl gives the same lines in another order.)
  On one machine the command keeps every CPU busy by itself (--workers). With
  several GPUs, torchrun gives each its own process and splits the work by rank:
      torchrun --standalone --nproc_per_node 2 -m cli \\
          caption data/ -r --device cuda --out captions.jsonl
  each rank runs on the GPU of its local rank and writes OUT.rank<R>, and rank
  0 merges them into OUT at the end (its exit status is the run's; the other
  ranks exit 0).
  torchrun across machines works the same way when OUT is on a file system
  they share: on each,
      torchrun --nnodes N --nproc_per_node P --rdzv_backend c10d \\
          --rdzv_endpoint HOST:29400 --rdzv_id captions -m cli caption ...
"""


def _bounded(low: int, high: int):
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        return value
    return parse


def _shard(text: str) -> Shard:
    try:
        index, count = (int(part) for part in text.split("/"))
        return Shard(index, count)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}") from e


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files and folders")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help=f"model file (default: the default model, {default_checkpoint()})")
    parser.add_argument("--out", type=Path, required=True, help="output file; rerunning resumes it")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="default: csv for an --out ending in .csv, else jsonl")
    add_model_flags(parser, DecodeOptions, title="decoding", skip=("attention",))
    parser.add_argument("--attention", action="store_true", help="one attention grid per word in the output")
    parser.add_argument("--overlays", type=Path, metavar="DIR",
                        help="write DIR/<file>.png: the picture, its best caption and a heatmap per word")
    parser.add_argument("-r", "--recursive", action="store_true", help="enter subfolders")
    parser.add_argument("--follow-links", action="store_true",
                        help="read symbolic links that lead outside the folder")
    parser.add_argument("--batch-size", type=_bounded(1, MAX_BATCH_SIZE), default=32,
                        help="images per decoding batch; the encoder takes them in equal parts of at most 16, "
                             "cheapest on a CPU (default %(default)s; a stop loses at most the batches in flight)")
    parser.add_argument("--workers", type=_bounded(1, MAX_WORKERS), default=None,
                        help="batches captioned at once, each by a worker that reads, encodes and decodes it; "
                             "processes on a CPU under Linux, else threads (default: the CPUs available, "
                             "shared among torchrun's local ranks)")
    parser.add_argument("--threads", type=_bounded(1, 256), default=None,
                        help="torch threads of each worker (default: the CPUs available shared among the workers)")
    add_device_arguments(parser)
    parser.add_argument("--shard", type=_shard, metavar="I/N", help="caption only the I-th of N disjoint parts")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="PART",
                        help="merge shard outputs into --out in the single-run order, captioning nothing")


def _usage_error(message: str) -> int:
    print(f"captioner caption: error: {message}", file=sys.stderr)
    return 2


def _torchrun_rank() -> tuple[int, int] | None:
    """(rank, world size) when started by torchrun with more than one process."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


@dataclass(frozen=True)
class Outputs:
    """Where a run writes: OUT, the JSON-lines journal behind it, torchrun's parts, the overlays."""

    out: Path
    format: str
    overlays: Path | None = None

    @property
    def journal(self) -> Path:
        return self.out if self.format == "jsonl" else self.out.with_name(self.out.name + ".jsonl")

    def part(self, rank: int) -> Path:
        return self.journal.with_name(f"{self.journal.name}.rank{rank}")

    def written_here(self, path: Path) -> bool:
        """OUT, its journal, parts, temporary files and the overlays folder are never inputs,
        even inside a folder being captioned: a rerun must find the same files."""
        name = path.name.removeprefix(".")
        if name == self.out.name or name.startswith(self.out.name + "."):
            return path.parent.resolve() == self.out.parent.resolve()
        return self.overlays is not None and path.resolve() == self.overlays.resolve()


def main(args: argparse.Namespace) -> int:
    keep_freed_memory()  # this process's malloc policy, set before any lane thread or fork exists
    try:
        options = model_from_flags(DecodeOptions, args, attention=args.attention or bool(args.overlays))
    except ValueError as e:
        return _usage_error(str(e))
    try:
        device = resolve_device(args.device, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError as e:
        return _usage_error(str(e))
    distributed = _torchrun_rank()
    if distributed and (args.shard or args.merge):
        return _usage_error("under torchrun each rank takes its shard itself; drop --shard and --merge")
    if args.shard and args.merge:
        return _usage_error("--merge combines the outputs of --shard runs; give one of them")
    outputs = Outputs(args.out, args.format or ("csv" if args.out.suffix.lower() == ".csv" else "jsonl"),
                      args.overlays)
    try:
        entries = find_entries(args.paths, args.recursive, args.follow_links, exclude=outputs.written_here)
    except (OSError, ValueError) as e:
        return _usage_error(str(e))
    order = {entry.file: i for i, entry in enumerate(entries)}
    if args.merge:
        missing = [str(p) for p in args.merge if not p.is_file()]
        if missing:
            return _usage_error(f"no such part: {', '.join(missing)}")
        try:
            settings = common_settings([outputs.journal, *args.merge])
            merge([outputs.journal, *args.merge], order, outputs.journal)
        except ValueError as e:
            return _usage_error(f"cannot merge: {e}")
        if settings is not None:
            write_settings(outputs.journal, settings)
        return _finish(outputs, label=f"merged {len(args.merge)} parts: ")

    shard = Shard(*distributed) if distributed else args.shard
    if shard is not None:
        entries = [e for e in entries if shard.holds(e.file)]
    output = outputs.part(distributed[0]) if distributed else outputs.journal
    try:
        earlier = recover(output)
        if distributed:
            earlier.done |= recover(outputs.journal).done  # a rerun after the parts were merged
    except ValueError as e:
        return _usage_error(f"{e}; give another --out or delete it")
    todo = [e for e in entries if e.file not in earlier.done]
    checkpoint = args.checkpoint or default_checkpoint()
    try:
        predictor = _load(checkpoint, args, device)
    except _ModelUnavailable as e:
        return _usage_error(str(e))
    settings = _settings(checkpoint, args, options)
    if earlier.done:
        try:
            check_settings(outputs.journal, settings)
        except ValueError as e:
            return _usage_error(f"{e}; rerun with those settings to go on, or give another --out to start over")
    if not distributed or distributed[0] == 0:
        write_settings(outputs.journal, settings)
    if not distributed:
        failed = _caption(args, predictor, options, todo, output, already_done=len(entries) - len(todo))
        return _finish(outputs, earlier.failed + failed)

    import torch.distributed as dist

    rank, world_size = distributed
    dist.init_process_group("gloo")
    _caption(args, predictor, options, todo, output, len(entries) - len(todo), label=f"rank {rank}: ",
             show_progress=rank == 0)
    dist.monitored_barrier(timeout=timedelta(days=1))  # every rank's part is complete: wait for the slowest
    status = 0  # rank 0 speaks for the merged output
    if rank == 0:
        parts = [outputs.part(r) for r in range(world_size)]
        merge([outputs.journal, *parts], order, outputs.journal)
        for part in parts:
            part.unlink()
        status = _finish(outputs, label=f"merged {world_size} ranks: ")
    dist.destroy_process_group()
    return status


class _ModelUnavailable(Exception):
    pass


def _load(checkpoint: Path, args: argparse.Namespace, device: "torch.device"):
    """The predictor on `device`, loaded with the CPUs available."""
    import torch

    from captioner.checkpoint import CheckpointError
    from captioner.predictor import Predictor

    torch.set_num_threads(cpus_per_local_rank())
    try:
        return Predictor.from_checkpoint(checkpoint, device, max_batch_size=args.batch_size, amp=args.amp)
    except (OSError, CheckpointError) as e:
        hint = "" if args.checkpoint else "; train it with `captioner demo` or give --checkpoint"
        raise _ModelUnavailable(f"cannot load the model: {e}{hint}") from e


def _settings(checkpoint: Path, args: argparse.Namespace, options: DecodeOptions) -> dict:
    """What decides the output's lines, kept beside its journal (`journal`): which model
    (by content: a retrained model at the same path is another model) and how it decodes."""
    return {"checkpoint": str(checkpoint.resolve()),
            "checkpoint_sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
            **options.model_dump(), "attention": args.attention, "amp": args.amp}


def _caption(args: argparse.Namespace, predictor, options: DecodeOptions, todo: list[Entry],
             output: Path, already_done: int, label: str = "", show_progress: bool = True) -> int:
    """Caption `todo` into `output` and say how it went; returns how many images failed."""
    from concurrent.futures.process import BrokenProcessPool

    from tqdm import tqdm

    from .pipeline import PipelineConfig, caption_entries

    cpus = cpus_per_local_rank()
    workers = args.workers or cpus
    config = PipelineConfig(args.batch_size, lanes=workers, threads_per_lane=args.threads or max(1, cpus // workers),
                            overlays=args.overlays, keep_attention=args.attention)
    start = time.perf_counter()
    writer = JournalWriter(output)
    with tqdm(total=sum(e.skip is None for e in todo), unit="img", desc=f"{label}captioning",
              disable=None if show_progress else True, file=sys.stderr) as bar:
        try:
            tally = caption_entries(predictor, todo, options, config, writer.append, bar.update)
        except KeyboardInterrupt:
            bar.close()
            print(f"{label}interrupted: {output} holds every finished batch; rerun the same command to go on",
                  file=sys.stderr)
            raise SystemExit(130) from None
        except BrokenProcessPool:
            bar.close()
            print(f"{label}error: a worker process died (out of memory?); {output} holds every finished batch; "
                  f"rerun the same command to go on, with fewer --workers or a smaller --batch-size",
                  file=sys.stderr)
            raise SystemExit(1) from None
        finally:
            writer.close()
    seconds = time.perf_counter() - start
    print(f"{label}captioned {tally.captioned}, failed {tally.failed}, skipped {tally.skipped}, "
          f"already done {already_done}; {seconds:.1f} s, {tally.captioned / max(seconds, 1e-9):.1f} images/s "
          f"-> {output}", file=sys.stderr)
    return tally.failed


def _finish(outputs: Outputs, failed: int | None = None, label: str = "") -> int:
    """Write the CSV or COCO file from the complete journal; the exit status of the whole output."""
    if failed is None:
        failed = recover(outputs.journal).failed
    if outputs.format == "csv":
        write_csv(outputs.journal, outputs.out)
    elif outputs.format == "coco":
        write_coco(outputs.journal, outputs.out)
    if failed:
        print(f"{label}{failed} image{'s' * (failed > 1)} could not be captioned: see the \"error\" lines "
              f"in {outputs.journal}", file=sys.stderr)
    elif label:
        print(f"{label}-> {outputs.out}", file=sys.stderr)
    return 1 if failed else 0
