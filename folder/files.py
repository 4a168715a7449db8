"""Which files `captioner caption` reads, under which names, in which order, on which shard.

Every file found becomes one `Entry` and later exactly one output line, so the
output, a resumed run and merged shards all line up entry by entry. A file's
name ("file" in the output) is its path relative to the root it was found
under, with "/" separators; a file given directly is named by its base name.
Order: the roots as given, each walked with the entries of every folder sorted
by name.

Names are Python's text for the file system's bytes (`os.fsdecode`): a name
that is not UTF-8 (b"caf\\xe9.jpg") keeps its bytes as lone surrogates
("caf\\udce9.jpg"), so it can be opened again, and `os.fsencode` gives the bytes back.
"""

import os
import stat
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from captioner.images import IMAGE_SUFFIXES, ImageError

# skipped by design; any other error is a failure
SKIP_CODES = ("not_an_image", "outside_root", "not_a_regular_file")


@dataclass(frozen=True)
class Entry:
    file: str  # the output name, unique in a run
    path: Path  # where to read it
    skip: ImageError | None = None  # why it is not captioned, decided before reading it


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard must be I/N with 0 <= I < N, got {self.index}/{self.count}")

    def holds(self, file: str) -> bool:
        """A stable hash of the name: a file's shard never depends on the other files,
        so adding images to a folder does not move the ones already captioned. It is the hash of
        the name's bytes, which every name has, UTF-8 or not."""
        return zlib.crc32(os.fsencode(file)) % self.count == self.index


@dataclass(frozen=True)
class Walk:
    """How folders are walked."""

    recursive: bool
    follow_links: bool
    exclude: Callable[[Path], bool]


def find_entries(
    paths: list[Path],
    recursive: bool = False,
    follow_links: bool = False,
    exclude: Callable[[Path], bool] = lambda path: False,
) -> list[Entry]:
    """Every file under `paths` (folders entered only with `recursive`), in run order,
    leaving out what `exclude` says (inside folders; paths given are always taken).

    Raises FileNotFoundError for a path that does not exist and ValueError when
    two roots give the same name (resuming and merging are keyed by name).
    """
    entries: list[Entry] = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"no such file or folder: {path}")
        if path.is_dir():
            root = path.resolve()
            entries += _walk(path, root, "", Walk(recursive, follow_links, exclude), {root})
        else:
            entries.append(_file_entry(path.name, path))
    seen: dict[str, Path] = {}
    unique = []
    for entry in entries:
        if entry.file in seen:
            if seen[entry.file].resolve() == entry.path.resolve():
                continue  # the same file named twice
            raise ValueError(
                f"two inputs are both named {entry.file!r} ({seen[entry.file]} and {entry.path}); "
                "caption them in separate runs"
            )
        seen[entry.file] = entry.path
        unique.append(entry)
    return unique


def run_order(entries: list[Entry]) -> dict[str, int]:
    """Each name's place among `entries` (all a run's files, found by `find_entries`): the order
    that merging shards, ranks and retries restores."""
    return {entry.file: i for i, entry in enumerate(entries)}


def _file_entry(name: str, path: Path) -> Entry:
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return Entry(
            name,
            path,
            ImageError("not_an_image", f"{path.suffix or 'no extension'}: not one of {', '.join(IMAGE_SUFFIXES)}"),
        )
    kind = _special_kind(path)
    if kind is not None:
        return Entry(name, path, ImageError("not_a_regular_file", f"a {kind}: only regular files are read"))
    return Entry(name, path)


_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "named pipe"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


def _special_kind(path: Path) -> str | None:
    """What `path` (a link: its target) is when it is not a regular file, told by stat without
    opening it: opening a named pipe waits for a writer, and would stop the whole run. A path
    that cannot be stat'ed is left to the reading, which reports it as unreadable."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return next((kind for is_kind, kind in _SPECIAL_KINDS if is_kind(mode)), None)


def _walk(folder: Path, root: Path, prefix: str, walk: Walk, visited: set[Path]) -> list[Entry]:
    try:
        children = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        name = prefix.rstrip("/") or "."
        return [Entry(name, folder, ImageError("unreadable", f"cannot list the folder: {e.strerror or e}"))]
    entries = []
    for child in children:
        name = prefix + child.name
        path = Path(child.path)
        if walk.exclude(path):
            continue
        if child.is_symlink():
            target = path.resolve()
            if target.is_dir() and not walk.recursive:
                continue
            if not walk.follow_links and not target.is_relative_to(root):
                entries.append(
                    Entry(
                        name,
                        path,
                        ImageError(
                            "outside_root",
                            f"a symbolic link to {target}, outside the folder; --follow-links to read it",
                        ),
                    )
                )
                continue
            if target.is_dir():
                # inside the root, its files are found under their own names; followed, entered once
                if walk.follow_links and target not in visited:
                    entries += _walk(path, root, name + "/", walk, visited | {target})
                continue
            entries.append(_file_entry(name, path))
        elif child.is_dir():
            if walk.recursive:
                entries += _walk(path, root, name + "/", walk, visited | {path.resolve()})
        else:
            entries.append(_file_entry(name, path))
    return entries
