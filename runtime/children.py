"""Child processes that must not outlive the process that started them."""

import contextlib
import ctypes
import fcntl
import os
import signal
from pathlib import Path

PR_SET_PDEATHSIG = 1  # prctl option, from <linux/prctl.h>


def die_with_parent(parent: int) -> None:
    """Called in a child on Linux: a parent killed outright cannot stop its children, and orphans
    would wait for work for ever, so the kernel ends this one with it. Linux sends the signal when
    the *thread* that started the child ends: start children from a thread that lives as long as
    they should."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the signal was asked for
        os._exit(1)


def open_files() -> set[int]:
    """This process's open file descriptors, but stdin, stdout and stderr. The listing's own
    descriptor is closed once it is read, and is left out: its number may be reused (by the
    pipe a fork makes, say) before close_files runs."""
    listed = {int(name) for name in os.listdir("/proc/self/fd")} - {0, 1, 2}
    return {fd for fd in listed if _is_open(fd)}


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


def close_files(fds: set[int]) -> None:
    """Called in a forked child with what open_files() said in the parent just before the fork:
    a child holding copies of its parent's pipes and sockets keeps them open after the parent
    closes them, so whoever reads the other end never sees its end (a test harness's driver
    process waits on it for ever), and a listening socket stays bound. Descriptors the fork made
    itself (the pipe by which the parent sees the child end) are not among them, and stay."""
    for fd in fds:
        with contextlib.suppress(OSError):  # closed meanwhile by the parent's other threads
            os.close(fd)


def child_processes(pid: int) -> list[int]:
    """The processes `pid` has started, from any of its threads, and that have not been reaped."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += map(int, (task / "children").read_text().split())
        except FileNotFoundError:  # a thread that has just ended
            continue
    return sorted(found)
