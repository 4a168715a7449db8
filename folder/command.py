"""`captioner caption`: caption image files and folders into JSON lines, CSV or COCO results.

    captioner caption photos/ --recursive --out captions.jsonl
    captioner caption a.jpg b.png --method greedy --out captions.jsonl
    captioner caption photos/ --attention --overlays sheets/ --out captions.jsonl
    captioner caption val2014/ --method beam --beam-size 3 --format coco --out results.json

Files are found by discovery (`files`), captioned by the pipeline
(`pipeline`) and recorded in the journal (`journal`), one run at a time on an
output (`lock`); this module reads the command line, splits the work across
shards or torchrun ranks, and reports.
"""

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from pydantic import BaseModel, Field

from captioner.decoding import DecodeOptions
from runtime.allocator import keep_freed_memory
from runtime.cpus import cpus_per_local_rank
from runtime.devices import add_device_arguments, resolve_device
from runtime.distributed import Distributed, torchrun_rank
from runtime.files import full_disk_is_an_error
from runtime.flags import add_model_flags, model_from_flags
from runtime.home import default_checkpoint

from .files import Entry, Shard, find_entries, run_order
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
from .lock import Busy, holding

FORMATS = ("jsonl", "csv", "coco")
MAX_BATCH_SIZE = 256
MAX_WORKERS = 32
MAX_THREADS = 256
# after a full disk: the journal holds every finished batch, and a rerun cuts its torn last line
RERUN = "run the same command again to resume"

EPILOG = """\
output:
  One JSON line per file, in the order the files are found (roots as given,
  folders sorted by name): the core's result format (as in the HTTP API)
  plus "file", the path relative to the root it was found under (a file given
  directly: its name). A file that cannot be read or decoded gives
  {"file": ..., "error": {"code": ..., "message": ...}}, with the codes of the
  HTTP API (unreadable, too_large, unsupported_format, too_many_pixels,
  corrupt_image). Files skipped by design get such a line too: not_an_image
  (the extension is not .jpg .jpeg .png .webp .gif .bmp), outside_root (a
  symbolic link leading out of the folder, unless --follow-links) and
  not_a_regular_file (a named pipe, socket or device: never opened).
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
  OUT, its journal, its locks and the --overlays folder are never inputs, even
  inside a folder being captioned.
  --retry-failed captions again the images whose lines are errors (files
  skipped by design are not retried) and replaces their lines: OUT keeps one
  line per file, in the same order. Interrupted, it resumes like any run.

one run at a time:
  A run holds OUT.lock (and, for csv and coco, OUT.jsonl.lock) while it writes.
  A second run on the same --out, or a --merge into it, is refused (exit
  status 2) before it reads or writes anything, instead of captioning every
  image twice. The lock goes with the run that holds it, even one killed with
  SIGKILL; a lock file left behind holds nothing and the next run goes on.

file names:
  A name that is not UTF-8 (b"caf\\xe9.jpg" on Linux) is kept as Python's
  os.fsdecode gives it, with each undecodable byte as a lone surrogate: in JSON
  as its escape ("caf\\udce9.jpg"), which json.loads reads back as the same
  name and os.fsencode turns back into the file's bytes; in CSV as the bytes
  themselves (read it with errors="surrogateescape"). Shards, merging,
  resuming and retrying key on these names like any other.

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


class Throughput(BaseModel):
    """How the command spreads its work over the CPUs; none of it changes a caption, so none of it
    is a compared setting (`journal`)."""

    batch_size: int = Field(
        32,
        ge=1,
        le=MAX_BATCH_SIZE,
        description=(
            "images per decoding batch; the encoder takes them in equal parts of at most 16, cheapest on a CPU; "
            "a stop loses at most the batches in flight"
        ),
    )
    workers: int | None = Field(
        None,
        ge=1,
        le=MAX_WORKERS,
        description=(
            "batches captioned at once, each by a worker that reads, encodes and decodes it; processes on a CPU "
            "under Linux, else threads; none: the CPUs available, shared among torchrun's local ranks"
        ),
    )
    threads: int | None = Field(
        None,
        ge=1,
        le=MAX_THREADS,
        description=("torch threads of each worker; none: the CPUs available shared among the workers"),
    )


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
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help=f"model file (default: the default model, {default_checkpoint()})"
    )
    parser.add_argument("--out", type=Path, required=True, help="output file; rerunning resumes it")
    parser.add_argument(
        "--format", choices=FORMATS, default=None, help="default: csv for an --out ending in .csv, else jsonl"
    )
    add_model_flags(parser, DecodeOptions, title="decoding", skip=("attention",))
    parser.add_argument("--attention", action="store_true", help="one attention grid per word in the output")
    parser.add_argument(
        "--overlays",
        type=Path,
        metavar="DIR",
        help="write DIR/<file>.png: the picture, its best caption and a heatmap per word",
    )
    parser.add_argument("-r", "--recursive", action="store_true", help="enter subfolders")
    parser.add_argument("--follow-links", action="store_true", help="read symbolic links that lead outside the folder")
    add_model_flags(parser, Throughput, title="throughput")
    add_device_arguments(parser)
    parser.add_argument("--shard", type=_shard, metavar="I/N", help="caption only the I-th of N disjoint parts")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="PART",
        help="merge shard outputs into --out in the single-run order, captioning nothing",
    )
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="caption again the images whose lines in --out are errors (not the files skipped "
        "by design), replacing those lines",
    )


def _usage_error(message: str) -> int:
    print(f"captioner caption: error: {message}", file=sys.stderr)
    return 2


def _throughput(args: argparse.Namespace) -> Throughput:
    """A number out of its range ends the command at once (exit status 2), as argparse ends it
    for a malformed flag: nothing has been looked at yet."""
    try:
        return model_from_flags(Throughput, args)
    except ValueError as e:
        raise SystemExit(_usage_error(str(e))) from None


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

    @property
    def locks(self) -> list[Path]:
        """Held while a run writes (`lock`): OUT's and its journal's, for a run on either name would
        write into this one's files (a jsonl run on x.csv.jsonl would append to x.csv's journal)."""
        return [path.with_name(path.name + ".lock") for path in dict.fromkeys((self.out, self.journal))]

    def written_here(self, path: Path) -> bool:
        """OUT, its journal, parts, locks, temporary files and the overlays folder are never inputs,
        even inside a folder being captioned: a rerun must find the same files."""
        name = path.name.removeprefix(".")
        if name == self.out.name or name.startswith(self.out.name + "."):
            return path.parent.resolve() == self.out.parent.resolve()
        return self.overlays is not None and path.resolve() == self.overlays.resolve()


def main(args: argparse.Namespace) -> int:
    keep_freed_memory()  # this process's malloc policy, set before any worker thread or fork exists
    throughput = _throughput(args)
    try:
        options = model_from_flags(DecodeOptions, args, attention=args.attention or bool(args.overlays))
        device = resolve_device(args.device, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError as e:
        return _usage_error(str(e))
    ranks = torchrun_rank()
    if problem := _conflicting_flags(args, ranks):
        return _usage_error(problem)
    outputs = Outputs(args.out, args.format or ("csv" if args.out.suffix.lower() == ".csv" else "jsonl"), args.overlays)
    try:
        entries = find_entries(args.paths, args.recursive, args.follow_links, exclude=outputs.written_here)
    except (OSError, ValueError) as e:
        return _usage_error(str(e))
    with full_disk_is_an_error("captioner caption", RERUN):
        if args.merge:
            return _merge_parts(args.merge, outputs, run_order(entries))
        return _caption_exclusively(args, throughput, options, device, outputs, entries, ranks)


def _caption_exclusively(
    args: argparse.Namespace,
    throughput: Throughput,
    options: DecodeOptions,
    device: torch.device,
    outputs: Outputs,
    entries: list[Entry],
    ranks: tuple[int, int] | None,
) -> int:
    """`_caption_run` holding the output's locks (with every torchrun rank), or refused."""
    if ranks:
        dist.init_process_group("gloo")
    try:
        with _exclusive(outputs, ranks):
            return _caption_run(args, throughput, options, device, outputs, entries, ranks)
    except Busy as e:
        return _refused(outputs, e, "let it finish, or give another --out")
    finally:
        if ranks:
            dist.destroy_process_group()


def _refused(outputs: Outputs, busy: Busy, advice: str) -> int:
    return _usage_error(f"another run is writing {outputs.out} ({busy}); {advice}")


def _conflicting_flags(args: argparse.Namespace, ranks: tuple[int, int] | None) -> str | None:
    """What is wrong with the flags together, if anything."""
    if ranks and (args.shard or args.merge):
        return "under torchrun each rank takes its shard itself; drop --shard and --merge"
    if args.shard and args.merge:
        return "--merge combines the outputs of --shard runs; give one of them"
    if args.merge and args.retry_failed:
        return "--merge captions nothing; retry the failed images in the runs that wrote the parts, or after merging"
    return None


def _merge_parts(parts: list[Path], outputs: Outputs, order: dict[str, int]) -> int:
    """Merge the parts into OUT (with what it holds already) in the single-run order."""
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        return _usage_error(f"no such part: {', '.join(missing)}")
    try:
        with holding(outputs.locks):
            try:
                settings = common_settings([outputs.journal, *parts])
                merge([outputs.journal, *parts], order, outputs.journal)
            except ValueError as e:
                return _usage_error(f"cannot merge: {e}")
            if settings is not None:
                write_settings(outputs.journal, settings)
            return _finish(outputs, label=f"merged {len(parts)} parts: ")
    except Busy as e:
        return _refused(outputs, e, "let it finish, then merge")


@contextmanager
def _exclusive(outputs: Outputs, ranks: tuple[int, int] | None) -> Iterator[None]:
    """Hold the output's locks, or raise Busy before any work. Under torchrun rank 0 holds them
    for every rank (the ranks of one run share the output), and every rank learns whether it got
    them, so a refused run stops on all its ranks."""
    with ExitStack() as held:
        busy = None
        if ranks is None or ranks[0] == 0:
            try:
                held.enter_context(holding(outputs.locks))
            except Busy as e:
                busy = e
        if ranks and not Distributed.from_environment().broadcast_flag(busy is None):
            busy = busy or Busy("rank 0 found the output held")
        if busy is not None:
            raise busy
        yield


def _caption_run(
    args: argparse.Namespace,
    throughput: Throughput,
    options: DecodeOptions,
    device: torch.device,
    outputs: Outputs,
    entries: list[Entry],
    ranks: tuple[int, int] | None,
) -> int:
    """Caption into the output what it lacks, and with --retry-failed what failed in it; the
    exit status. The output's lock is held."""
    order = run_order(entries)
    shard = Shard(*ranks) if ranks else args.shard
    if shard is not None:
        entries = [e for e in entries if shard.holds(e.file)]
    journals = [outputs.journal, outputs.part(ranks[0])] if ranks else [outputs.journal]
    try:
        earlier = recover(*journals)  # under torchrun, the output a run before merged, then this rank's part
    except ValueError as e:
        return _usage_error(f"{e}; give another --out or delete it")
    retried = {e.file for e in entries if e.file in earlier.failed} if args.retry_failed else set()
    todo = [e for e in entries if e.file not in earlier.done or e.file in retried]
    checkpoint = args.checkpoint or default_checkpoint()
    try:
        predictor = _load(checkpoint, args, throughput.batch_size, device)
    except _ModelUnavailable as e:
        return _usage_error(str(e))
    settings = _settings(checkpoint, args, options)
    if earlier.done:
        try:
            check_settings(outputs.journal, settings)
        except ValueError as e:
            return _usage_error(f"{e}; rerun with those settings to go on, or give another --out to start over")
    if not ranks or ranks[0] == 0:
        write_settings(outputs.journal, settings)
    already_done = len(entries) - len(todo)
    if ranks:
        _caption(
            args,
            throughput,
            predictor,
            options,
            todo,
            journals[-1],
            already_done,
            label=f"rank {ranks[0]}: ",
            show_progress=ranks[0] == 0,
        )
        return _merge_ranks(outputs, order, *ranks)
    failed = _caption(args, throughput, predictor, options, todo, outputs.journal, already_done)
    if retried or earlier.superseded:
        merge([outputs.journal], order, outputs.journal)  # one line per image again, in run order
    return _finish(outputs, len(earlier.failed - retried) + failed)


def _merge_ranks(outputs: Outputs, order: dict[str, int], rank: int, world_size: int) -> int:
    """Once every rank has written its part, rank 0 merges them into the output and speaks for it."""
    dist.monitored_barrier(timeout=timedelta(days=1))  # every rank's part is complete: wait for the slowest
    if rank != 0:
        return 0
    parts = [outputs.part(r) for r in range(world_size)]
    merge([outputs.journal, *parts], order, outputs.journal)
    for part in parts:
        part.unlink()
    return _finish(outputs, label=f"merged {world_size} ranks: ")


class _ModelUnavailable(Exception):
    pass


def _load(checkpoint: Path, args: argparse.Namespace, batch_size: int, device: torch.device):
    """The predictor on `device`, loaded with the CPUs available."""
    from captioner.predictor import Predictor

    torch.set_num_threads(cpus_per_local_rank())
    try:
        return Predictor.from_checkpoint(checkpoint, device, args.backend, max_batch_size=batch_size, amp=args.amp)
    except (OSError, ValueError) as e:  # a checkpoint or ONNX encoder that cannot be used (CheckpointError, ...)
        hint = "" if args.checkpoint else "; train it with `captioner demo` or give --checkpoint"
        raise _ModelUnavailable(f"cannot load the model: {e}{hint}") from e


def _settings(checkpoint: Path, args: argparse.Namespace, options: DecodeOptions) -> dict:
    """What decides the output's lines, kept beside its journal (`journal`): which model
    (by content: a retrained model at the same path is another model) and how it decodes."""
    return {
        "checkpoint": str(checkpoint.resolve()),
        "checkpoint_sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
        **options.model_dump(),
        "attention": args.attention,
        "amp": args.amp,
        "backend": args.backend,
    }


def _caption(
    args: argparse.Namespace,
    throughput: Throughput,
    predictor,
    options: DecodeOptions,
    todo: list[Entry],
    output: Path,
    already_done: int,
    label: str = "",
    show_progress: bool = True,
) -> int:
    """Caption `todo` into `output` and say how it went; returns how many images failed."""
    from tqdm import tqdm

    from .pipeline import BatchLost, PipelineConfig, caption_entries

    cpus = cpus_per_local_rank()
    workers = throughput.workers or cpus
    config = PipelineConfig(
        throughput.batch_size,
        workers=workers,
        threads_per_worker=throughput.threads or max(1, cpus // workers),
        overlays=args.overlays,
        keep_attention=args.attention,
    )
    start = time.perf_counter()
    writer = JournalWriter(output)
    with tqdm(
        total=sum(e.skip is None for e in todo),
        unit="img",
        desc=f"{label}captioning",
        disable=None if show_progress else True,
        file=sys.stderr,
    ) as bar:
        try:
            tally = caption_entries(predictor, todo, options, config, writer.append, bar.update)
        except KeyboardInterrupt:
            bar.close()
            print(
                f"{label}interrupted: {output} holds every finished batch; rerun the same command to go on",
                file=sys.stderr,
            )
            raise SystemExit(130) from None
        except BatchLost as e:
            bar.close()
            print(
                f"{label}error: a worker process died (out of memory?) captioning {_some(e.files)}: {e.why}. "
                f"{output} holds every batch before them; rerun the same command to caption them and the rest, "
                "with fewer --workers or a smaller --batch-size",
                file=sys.stderr,
            )
            raise SystemExit(1) from None
        finally:
            writer.close()
    seconds = time.perf_counter() - start
    print(
        f"{label}captioned {tally.captioned}, failed {tally.failed}, skipped {tally.skipped}, "
        f"already done {already_done}; {seconds:.1f} s, {tally.captioned / max(seconds, 1e-9):.1f} images/s "
        f"-> {output}",
        file=sys.stderr,
    )
    return tally.failed


def _some(files: list[str], shown: int = 3) -> str:
    """The first few of `files`, and how many more."""
    more = f" and {len(files) - shown} more" if len(files) > shown else ""
    return ", ".join(files[:shown]) + more


def _finish(outputs: Outputs, failed: int | None = None, label: str = "") -> int:
    """Write the CSV or COCO file from the complete journal; the exit status of the whole output."""
    if failed is None:
        failed = len(recover(outputs.journal).failed)
    if outputs.format == "csv":
        write_csv(outputs.journal, outputs.out)
    elif outputs.format == "coco":
        write_coco(outputs.journal, outputs.out)
    if failed:
        print(
            f'{label}{failed} image{"s" * (failed > 1)} could not be captioned: see the "error" lines '
            f"in {outputs.journal}",
            file=sys.stderr,
        )
    elif label:
        print(f"{label}-> {outputs.out}", file=sys.stderr)
    return 1 if failed else 0
