"""Child processes that must not outlive the process that started them, the thread that forks
and watches each one, and how many deaths a pool of them survives."""

import contextlib
import ctypes
import fcntl
import logging
import multiprocessing.connection
import os
import queue
import signal
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path

log = logging.getLogger("captioner.runtime")

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


def close_files(fds: set[int], keep: frozenset[int] = frozenset()) -> None:
    """Called in a forked child with what open_files() said in the parent just before the fork:
    a child holding copies of its parent's pipes and sockets keeps them open after the parent
    closes them, so whoever reads the other end never sees its end (a test harness's driver
    process waits on it for ever), and a listening socket stays bound. Descriptors the fork made
    itself (the pipe by which the parent sees the child end) are not among them, and stay.

    A server forks replacements while it serves: a client's connection accepted by another thread
    between the listing and the fork is not listed, so every socket but stdin, stdout, stderr and
    `keep` (the child's own end of its pipe to the parent) is closed too."""
    for fd in fds | (_sockets() - keep):
        with contextlib.suppress(OSError):  # closed meanwhile by the parent's other threads
            os.close(fd)


def _sockets() -> set[int]:
    found = set()
    for fd in open_files():
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                found.add(fd)
    return found


def child_processes(pid: int) -> list[int]:
    """The processes `pid` has started, from any of its threads, and that have not been reaped."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += map(int, (task / "children").read_text().split())
        except FileNotFoundError:  # a thread that has just ended
            continue
    return sorted(found)


@dataclass(eq=False)
class _Fork:
    """A request to the fork thread: run `make` there, and say how it went."""

    make: Callable[[], BaseProcess]
    done: threading.Event = field(default_factory=threading.Event)
    process: BaseProcess | None = None
    error: BaseException | None = None

    def run(self) -> None:
        try:
            self.process = self.make()
        except BaseException as e:  # raised in the thread that asked, not here
            self.error = e
        finally:
            self.done.set()


class ForkThread:
    """The thread that forks one child process, keeps it and watches it; a replacement is forked
    from it too, for as long as it runs (until stop()).

    Why a thread of its own: Linux sends a child its parent-death signal (die_with_parent) when
    the *thread* that forked it ends, so that thread must outlive the child; and a child forked
    from a thread that has led an OpenMP team (a server's main thread, once it ran the model)
    waits for ever in its own first team. This thread only forks and waits, so it never leads
    one. It is also the only thread that waits on the child's sentinel and closes it, so the end
    of the child is seen exactly once: `on_end` is called here (an error in it is logged, and
    the thread goes on)."""

    def __init__(self, name: str, on_end: Callable[[], None] = lambda: None):
        self.on_end = on_end
        self._requests: queue.SimpleQueue[_Fork | None] = queue.SimpleQueue()
        self._doorbell, self._ring = os.pipe()  # wakes the thread from its wait on the child
        self._watched: int | None = None  # the child's sentinel, until its end has been reported
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._stopped = False

    def fork(self, make: Callable[[], BaseProcess]) -> BaseProcess:
        """`make()` run on this thread (it forks, and may first close the child it replaces); the
        process it started is watched from then on. Its exception is raised here."""
        if self._stopped:
            raise RuntimeError(f"{self._thread.name} has stopped: it forks no more")
        if not self._thread.is_alive():
            self._thread.start()
        request = _Fork(make)
        self._send(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.process is not None
        return request.process

    def stop(self) -> None:
        """End the thread, once its child has been stopped (its end would kill the child). Once
        stopped, it forks no more."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread.is_alive():
            self._send(None)
            self._thread.join()
        os.close(self._doorbell)
        os.close(self._ring)

    def _send(self, request: _Fork | None) -> None:
        self._requests.put(request)
        os.write(self._ring, b"\0")

    def _loop(self) -> None:
        while True:
            watched = [] if self._watched is None else [self._watched]
            ready = multiprocessing.connection.wait([self._doorbell, *watched])
            if self._watched is not None and self._watched in ready:
                self._watched = None
                self._report_end()
            if self._doorbell in ready and not self._answer_requests():
                return

    def _answer_requests(self) -> bool:
        """Runs every request waiting; False once told to stop."""
        os.read(self._doorbell, 4096)
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return True
            if request is None:
                return False
            self._watched = None  # `make` may close the old child's sentinel
            request.run()
            if request.process is not None:
                self._watched = request.process.sentinel

    def _report_end(self) -> None:
        try:
            self.on_end()
        except Exception:
            log.exception("reporting the end of a child process failed")


class RestartBudget:
    """How many deaths a pool of workers survives: at most `restarts` within `window_s` seconds.
    Beyond that something kills them as fast as they start (a poisoned model, memory that cannot
    hold them), and a supervisor that starts the whole process afresh does better than replacing
    them for ever."""

    def __init__(self, restarts: int, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.restarts, self.window_s, self.clock = restarts, window_s, clock
        self._deaths: deque[float] = deque()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """Count a death: whether a replacement is still within the budget."""
        with self._lock:
            now = self.clock()
            while self._deaths and now - self._deaths[0] >= self.window_s:
                self._deaths.popleft()
            if len(self._deaths) >= self.restarts:
                return False
            self._deaths.append(now)
            return True

    def describe(self) -> str:
        return f"more than {self.restarts} times within {self.window_s:g} s"
