"""Files that are replaced whole: a reader sees the old file or the new one, never half of one;
and a full disk, met by any write, as one clear error rather than a traceback.

A write that finds no room (the file system full, a quota reached, or the process's file-size
limit, `ulimit -f`) raises `DiskFullError` naming the file it was writing, whatever library did
the writing; a command's main turns it into one line and exit status 1 (`full_disk_is_an_error`).
"""

import errno
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

# errno -> (what happened, what the user can do about it)
_NO_ROOM = {
    errno.ENOSPC: ("no space left on device", "free space on that file system"),
    errno.EDQUOT: ("disk quota exceeded", "free space under your quota on that file system"),
    errno.EFBIG: ("file too large", "raise the file size limit (ulimit -f) or write to another file system"),
}
# how Rust's std::io::Error prints an OS error: safetensors reports one only in its message
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


class DiskFullError(OSError):
    """A write found no room. An OSError (errno, strerror, filename) so that it pickles whole from
    a worker process; `filename` is the file the user knows (not a temporary beside it)."""

    def __str__(self) -> str:
        what = self._meaning[0]
        return f"{what} writing {self.filename}" if self.filename else what

    @property
    def remedy(self) -> str:
        return self._meaning[1]

    @property
    def _meaning(self) -> tuple[str, str]:
        """What happened and what to do; a number that is none of ours reads as a full disk."""
        return _NO_ROOM.get(self.errno or errno.ENOSPC, _NO_ROOM[errno.ENOSPC])


def no_room_errno(error: BaseException) -> int | None:
    """The errno of a full disk behind `error`, if that is what it is. Libraries wrap the OSError:
    torch's zip writer raises a RuntimeError with it as the context, safetensors (Rust) prints its
    number in the message; so the chain of causes and contexts is searched."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if (number := _errno_of(current)) in _NO_ROOM:
            return number
        current = current.__cause__ or current.__context__
    return None


def _errno_of(error: BaseException) -> int | None:
    """An OSError's errno, or the OS error a Rust library's message ends with."""
    if isinstance(error, OSError):
        return error.errno
    match = _RUST_OS_ERROR.search(str(error))
    return int(match.group(1)) if match else None


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Any error of the block that is a full disk becomes DiskFullError(`path`); a DiskFullError
    from a write nested inside keeps the path it names."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        number = no_room_errno(e)
        if number is None:
            raise
        raise DiskFullError(number, os.strerror(number), str(path)) from e


@contextmanager
def replacing(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path beside `path` to write to; it becomes `path` when the block ends without
    an error, and is removed when it raises. The name carries the process id, so ranks or runs
    that race to write the same file never write into each other's half-written one.

    `mode` is set explicitly: some writers (safetensors, numpy's memmap) create files owner-only,
    and a server in a container reads them as another user.

    A full disk raises DiskFullError naming `path`, and `path` keeps its old content.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with writing(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


@contextmanager
def replacing_text(path: str | Path) -> Iterator[TextIO]:
    """`replacing` for a UTF-8 text file, opened with newline="" so what is written is what lands
    (as the csv module needs)."""
    with replacing(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        yield f


def write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text`, whole."""
    with replacing_text(path) as f:
        f.write(text)


@contextmanager
def full_disk_is_an_error(command: str, advice: str) -> Iterator[None]:
    """Run a command's work so that a full disk ends it with one line on stderr, naming the file
    and what to free, and exit status 1 (SystemExit), not a traceback. A full disk met by a write
    that no `writing` block names (a library's own files) is reported all the same, with the file
    its OSError names, if any.

    SIGXFSZ is ignored meanwhile: a write past the process's file-size limit would otherwise kill
    the process outright, with nothing said; ignored, the write fails with EFBIG and is reported
    like a full disk. CPython ignores it at start-up already, but only when it installs its signal
    handlers (not in an interpreter embedded without them), so the command says so itself rather
    than count on that. Signals belong to the application that owns the process, so each command's
    main calls this (the library never does); the processes it forks inherit the setting. Only the
    main thread may set handlers: elsewhere the signal is left as it is.
    """
    owner = hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN) if owner else None
    try:
        yield
    except Exception as e:
        full = _as_disk_full(e)
        if full is None:
            raise
        print(f"{command}: error: {full}: {full.remedy} and {advice}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        if owner:
            signal.signal(signal.SIGXFSZ, previous)


def _as_disk_full(error: BaseException) -> DiskFullError | None:
    """`error` as a DiskFullError, if it is a full disk."""
    if isinstance(error, DiskFullError):
        return error
    number = no_room_errno(error)
    if number is None:
        return None
    return DiskFullError(number, os.strerror(number), getattr(error, "filename", None))
