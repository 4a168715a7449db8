"""The JSON-lines output of `captioner caption`, which is also its journal.

One line per file, `"file"` first, appended and flushed batch by batch: a
killed run leaves whole lines plus at most one torn last line, which the next
run cuts off before it appends. CSV and COCO results are written from the
journal once it is complete, so every format resumes the same way.

A name may have more than one line: --retry-failed appends a new line for an
image whose line is an error, and parts merged together may hold the same name.
The line that stands for the name is the later one, unless it is an error and
the earlier one a caption (`_index`); `merge` keeps only the standing lines, in
run order, so a journal is rewritten that way after a retry, and a retry that
was interrupted resumes from what it had done.

A name that is not UTF-8 (lone surrogates, see `files`) is written to JSON as
its escapes ("caf\\udce9.jpg"), which read back as the very same name, and to
CSV as the file system's bytes.

Beside it, JOURNAL.settings.json records what decides its lines (the model's
SHA-256, the decoding options, --attention, --amp): a rerun with other settings
is refused rather than mixing two kinds of captions in one output.
"""

import csv
import json
import os
import re
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import orjson

from runtime.files import replacing, write_text, writing

from .files import SKIP_CODES

_PREFIX = '{"file":'
_ERROR = ',"error":'
_DECODER = json.JSONDecoder()


def result_line(file: str, result: dict) -> str:
    """`result` is the core's result format or {"error": {"code", "message"}}."""
    line = {"file": file, **result}
    try:  # orjson writes the attention grids' floats about 10x faster than json
        return orjson.dumps(line).decode() + "\n"
    except orjson.JSONEncodeError:  # a file name that is not UTF-8 (surrogate escapes): json escapes it
        return json.dumps(line, separators=(",", ":")) + "\n"


@dataclass
class JournalState:
    done: set[str]  # names with a line
    failed: set[str]  # of them, images that could not be captioned (their standing line is an error)
    superseded: int  # lines that stand for nothing any more: the journal wants rewriting (`merge`)


def _name_and_failure(line: str) -> tuple[str, bool]:
    """Read the name without parsing the (large) rest; lines this module wrote start with it."""
    if line.startswith(_PREFIX):
        name, end = _DECODER.raw_decode(line, len(_PREFIX))
        if not line.startswith(_ERROR, end):
            return name, False
    record = json.loads(line)
    error = record.get("error")
    return record["file"], error is not None and error.get("code") not in SKIP_CODES


def _whole_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(offset of the line, line) for every line ending in a newline."""
    offset = 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                return
            yield offset, raw
            offset += len(raw)


def _records(path: Path) -> Iterator[tuple[int, int, str, bool]]:
    """(offset of the line, offset after it, name, failed) for every whole line."""
    for number, (start, raw) in enumerate(_whole_lines(path), 1):
        try:
            name, failed = _name_and_failure(raw.decode())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} line {number} is not a captioner result ({e})") from e
        yield start, start + len(raw), name, failed


class _Line(NamedTuple):
    """Where the line that stands for a name is."""

    source: int  # which journal
    start: int  # its bytes there
    end: int
    failed: bool
    seen: int  # when the name first appeared: the order of names that the run order does not know


@dataclass
class _Index:
    lines: dict[str, _Line]  # name -> its standing line
    superseded: int  # lines that stand for nothing
    whole: list[int]  # bytes of whole lines at the start of each journal


def _index(sources: list[Path]) -> _Index:
    """Every name's standing line in `sources`, read in that order: a later line stands instead of
    an earlier one (a retry's, a part's), except that an error never replaces a caption."""
    index = _Index({}, 0, [0] * len(sources))
    for source, path in enumerate(sources):
        if not path.exists():
            continue
        for start, end, name, failed in _records(path):
            index.whole[source] = end
            earlier = index.lines.get(name)
            if earlier is None:
                index.lines[name] = _Line(source, start, end, failed, len(index.lines))
                continue
            index.superseded += 1
            if earlier.failed or not failed:
                index.lines[name] = _Line(source, start, end, failed, earlier.seen)
    return index


def recover(*paths: Path) -> JournalState:
    """What earlier runs wrote to `paths` (read in that order, as `_index` does), with the torn
    last line of each cut off the file."""
    index = _index(list(paths))
    for path, whole in zip(paths, index.whole):
        if path.exists() and path.stat().st_size > whole:
            with open(path, "r+b") as f:
                f.truncate(whole)
    failed = {name for name, line in index.lines.items() if line.failed}
    return JournalState(set(index.lines), failed, index.superseded)


class JournalWriter:
    """Appends batches of lines. A full disk raises DiskFullError naming the journal: what it holds
    then is whole lines and at most one torn last line, which `recover` cuts off on the rerun."""

    def __init__(self, path: Path):
        self.path = path
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            # open across `append` calls until `close`: the writer owns it, a `with` block cannot
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def append(self, lines: list[str]) -> None:
        """One write per batch, then to disk: an interruption loses at most the batch in flight."""
        with writing(self.path):
            self._file.write("".join(lines))
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        """After a full disk, closing tries the batch's unwritten rest again and fails the same way."""
        with writing(self.path):
            self._file.close()


SETTINGS_SUFFIX = ".settings.json"
NOT_COMPARED = ("checkpoint",)  # where the model was read from: its SHA-256 says which model it is


def settings_path(journal: Path) -> Path:
    return journal.with_name(journal.name + SETTINGS_SUFFIX)


def read_settings(journal: Path) -> dict | None:
    """The settings recorded beside `journal`, None if there are none (or no journal)."""
    path = settings_path(journal)
    if not journal.exists() or not path.exists():  # settings of a deleted journal are stale
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path} is not a captioner settings file ({e})") from e
    if not isinstance(settings, dict):
        raise ValueError(f"{path} is not a captioner settings file")
    return settings


def _differences(a: dict, b: dict, a_label: str, b_label: str) -> str:
    """What two settings disagree on, as "beam_size 3 there, 5 here; ..."; empty when they agree."""
    keys = sorted((a.keys() | b.keys()) - set(NOT_COMPARED))
    return "; ".join(
        f"{key} {a.get(key)!r} {a_label}, {b.get(key)!r} {b_label}" for key in keys if a.get(key) != b.get(key)
    )


def check_settings(journal: Path, settings: dict) -> None:
    """ValueError when `journal` has lines written with other settings than `settings`.

    A journal from before settings were recorded is taken as it is."""
    recorded = read_settings(journal)
    if recorded is not None and (differences := _differences(recorded, settings, "there", "here")):
        raise ValueError(f"{journal} holds captions made with other settings ({differences})")


def write_settings(journal: Path, settings: dict) -> None:
    write_text(settings_path(journal), json.dumps(settings, indent=1) + "\n")


def common_settings(journals: list[Path]) -> dict | None:
    """The settings every one of `journals` that records any was written with; ValueError when two differ."""
    first: tuple[Path, dict] | None = None  # the first journal that records settings, and them
    for journal in journals:
        settings = read_settings(journal)
        if settings is None:
            continue
        if first is None:
            first = journal, settings
        elif differences := _differences(first[1], settings, f"in {first[0].name}", f"in {journal.name}"):
            raise ValueError(f"{first[0]} and {journal} hold captions made with different settings ({differences})")
    return None if first is None else first[1]


def merge(sources: list[Path], order: dict[str, int], out: Path) -> None:
    """The standing line of every name in `sources` (`_index`) into `out`, in run order; names
    missing from `order` go last, as they were first seen. `out` may be one of the sources; it
    is replaced atomically."""
    index = _index(sources)
    names = sorted(index.lines, key=lambda name: (order.get(name, len(order)), index.lines[name].seen))
    with ExitStack() as files, replacing(out) as tmp, open(tmp, "wb") as f:
        readers = {i: files.enter_context(open(p, "rb")) for i, p in enumerate(sources) if p.exists()}
        for name in names:
            line = index.lines[name]
            reader = readers[line.source]
            reader.seek(line.start)
            f.write(reader.read(line.end - line.start))


def read_results(path: Path) -> Iterator[dict]:
    for _, line in _whole_lines(path):
        yield json.loads(line)


CSV_COLUMNS = ("file", "rank", "caption", "log_prob", "width", "height", "method", "error_code", "error_message")


def write_csv(journal: Path, out: Path) -> None:
    """One row per caption (rank 1 is the best); a file without captions has one row with its error.
    A name that is not UTF-8 is written as the file system's bytes (surrogateescape), the only
    text a CSV reader can turn back into the very same name."""
    with replacing(out) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS)
        writer.writeheader()
        for record in read_results(journal):
            if "error" in record:
                writer.writerow(
                    {
                        "file": record["file"],
                        "error_code": record["error"]["code"],
                        "error_message": record["error"]["message"],
                    }
                )
                continue
            for rank, caption in enumerate(record["captions"], 1):
                writer.writerow(
                    {
                        "file": record["file"],
                        "rank": rank,
                        "caption": caption["text"],
                        "log_prob": caption["log_prob"],
                        "width": record["width"],
                        "height": record["height"],
                        "method": record["method"],
                    }
                )


_TRAILING_NUMBER = re.compile(r"(\d+)$")


def coco_image_ids(names: list[str]) -> list[int]:
    """The number that ends each file's stem (COCO_val2014_000000123456.jpg -> 123456,
    shapes_test_000000000007.png -> 7) when every name has one and no two agree;
    otherwise 1, 2, 3, ... in output order, so ids never collide."""
    numbers = [_TRAILING_NUMBER.search(Path(n).stem) for n in names]
    ids = [int(m.group(1)) for m in numbers if m is not None]
    if len(ids) == len(names) and len(set(ids)) == len(ids):
        return ids
    return list(range(1, len(names) + 1))


def write_coco(journal: Path, out: Path) -> None:
    """A COCO caption results file: [{"image_id", "caption"}], the best caption of every captioned image."""
    best = [(r["file"], r["captions"][0]["text"]) for r in read_results(journal) if r.get("captions")]
    ids = coco_image_ids([name for name, _ in best])
    results = [{"image_id": i, "caption": text} for i, (_, text) in zip(ids, best)]
    write_text(out, json.dumps(results, indent=1) + "\n")
