"""One run at a time on an output: a second `captioner caption` on files a live run writes is
refused before it reads or writes anything (two runs would caption every image twice, and one
would cut the other's half-written last line as torn).

The lock is a POSIX record lock (`fcntl.lockf`) on a file beside the output. The kernel releases
it when its holder dies, even by SIGKILL, so a lock file that a killed run left behind holds
nothing. It is a record lock rather than a `flock` because forked workers (`pipeline`) do not
inherit it: they cannot keep an output locked after the run that forked them is gone. It works
across machines on NFS, as torchrun's ranks on several nodes need.
"""

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from runtime.files import writing


class Busy(Exception):
    """Another live process holds the lock."""


@contextmanager
def holding(paths: list[Path]) -> Iterator[None]:
    """Hold the lock files `paths` (in that order), or raise Busy at once; they are removed when
    released."""
    with ExitStack() as held:
        for path in paths:
            held.enter_context(_holding(path))
        yield


@contextmanager
def _holding(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock(path)
    try:
        with writing(path):
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # before the lock goes: see `_lock`
        os.close(fd)


def _lock(path: Path) -> int:
    """A descriptor of `path` that holds its lock. A holder removes the file before it lets the
    lock go, so a lock won on a file that is no longer at `path` was won too late: try again on
    the file that is there now."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EAGAIN or EACCES, by the platform
            os.close(fd)
            raise Busy(f"{path} is held by {_holder(path)}") from None
        try:
            there, held = os.stat(path), os.fstat(fd)
            if (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _holder(path: Path) -> str:
    """Who holds the lock, as its holder wrote it."""
    try:
        return path.read_text().strip() or "another run"
    except OSError:
        return "another run"
