"""Model workers: the one way both applications run a model beside the process that loaded it.

The server (api.workers, whose batcher hands each worker a batch of requests) and the folder
command (folder.pipeline, which hands each worker a run of files) both caption with several
workers at once. On a CPU under Linux a worker is a process forked once the model is loaded:
decoding is thousands of small operators a second, each handing Python's lock over, so as
threads of one process workers would slow each other (and a server's event loop). Forked, they share
the model's weights and start in milliseconds. Elsewhere (a GPU: CUDA cannot be forked; macOS,
whose system libraries are not fork-safe; one worker) a worker is the calling thread itself.

How a worker process is forked, the same for both:
- from a thread of its own that does nothing else (runtime.children.ForkThread): the child's
  parent-death signal is tied to that thread, and a child forked from a thread that has led an
  OpenMP team waits for ever in its own first team;
- the child closes the descriptors it inherited (the server's sockets, a test harness's pipes),
  asks to die with its parent, leaves Ctrl-C and SIGTERM to the parent, and runs each call with
  the torch threads it is given.

How a dead worker is handled, the same for both: call() raises WorkerDied saying how the process
ended, the call's work is lost (captioning has no side effects: it can be done again), and
restart() forks a new process in its place from the same thread. Whether to restart is the
caller's: the server replaces its workers within a RestartBudget and exits beyond it; the folder
command stops the run, whose journal resumes exactly, naming the files to rerun.
"""

import contextlib
import gc
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from .children import ForkThread, close_files, die_with_parent, open_files

Handler = Callable[[Any], Any]  # a worker's work: a task in, its result out


class WorkerDied(Exception):
    """The worker process ended: the call it held has no answer; restart() forks another."""


def can_fork(device_type: str, workers: int) -> bool:
    """Processes only on a CPU (CUDA cannot be forked once started), under Linux (macOS's system
    libraries are not fork-safe; the parent-death signal), and only for more than one worker."""
    return workers > 1 and device_type == "cpu" and sys.platform.startswith("linux")


class ThreadWorker:
    """A worker that is the calling thread: what kills a call leaves the model as it was, so there
    is never a process to replace."""

    def __init__(self, handler: Handler, name: str = "worker"):
        self.handler, self.name = handler, name

    alive = True

    def start(self) -> None:
        pass

    def call(self, task: Any, threads: int | None = None) -> Any:
        return self.handler(task)  # torch threads: the process's, set once

    def restart(self) -> None:
        pass

    def death(self) -> str:
        return f"a call of model worker {self.name} (a thread) failed"

    def stop(self, timeout: float) -> None:
        pass


class ForkedWorker:
    """A forked process running `handler` on the tasks it is sent through a pipe, one at a time."""

    def __init__(self, handler: Handler, name: str, threads: int = 1):
        self.handler, self.name, self.threads = handler, name, threads
        self._forks = ForkThread(name)  # forks, keeps and watches the process
        self.process: BaseProcess | None = None
        self._connection: Connection | None = None

    @property
    def on_end(self) -> Callable[[], None]:
        """Called, on the fork thread, when the process ends (a busy worker's caller sees it first)."""
        return self._forks.on_end

    @on_end.setter
    def on_end(self, callback: Callable[[], None]) -> None:
        self._forks.on_end = callback

    def start(self) -> None:
        """The first process. What the parent holds now, the model above all, is frozen for good (it
        lives as long as the parent): neither process's collector will write to those objects' headers,
        which would copy their pages. A restart freezes nothing: the parent is serving by then, and
        what it holds at that moment (a request's objects) must stay collectable."""
        gc.freeze()
        self._forks.fork(self._fork)

    def restart(self) -> None:
        """A new process in place of the one that ended (reaped, and its pipe closed, first)."""
        self._forks.fork(self._fork_again)

    @property
    def alive(self) -> bool:
        """Whether the process runs: its sentinel is not readable. Any thread may ask; unlike
        is_alive() it reaps nothing, which is left to restart()."""
        try:
            return self.process is not None and not multiprocessing.connection.wait([self.process.sentinel], 0)
        except (ValueError, OSError):  # closed by a restart under way
            return False

    def call(self, task: Any, threads: int | None = None) -> Any:
        """`handler(task)` in the process, with `threads` torch threads (its own number if None).
        The handler's exception is raised here, with the worker's traceback as a note."""
        assert self._connection is not None, "start() the worker first"
        try:
            self._connection.send((task, threads or self.threads))
            reply = self._connection.recv()
        except (OSError, EOFError) as e:
            raise WorkerDied(self.death()) from e
        if isinstance(reply, _Failed):
            raise reply.error
        return reply

    def death(self) -> str:
        """How the process ended, in words."""
        assert self.process is not None
        self.process.join(1.0)
        code = self.process.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        return f"model worker {self.name} (pid {self.process.pid}) ended: {how}"

    def stop(self, timeout: float) -> None:
        """Ask the process to end after its call, kill it past `timeout`, then end the fork thread."""
        if self.process is not None and self.process.is_alive():
            with contextlib.suppress(OSError, EOFError):  # it died meanwhile
                self._connection.send(None)  # type: ignore[union-attr]  # set with the process
            self.process.join(timeout)
        if self.process is not None and self.process.is_alive():
            self.process.kill()
            self.process.join()
        if self._connection is not None:
            self._connection.close()
        self._forks.stop()  # after the process: the thread's end would kill it

    def _fork_again(self) -> BaseProcess:
        self._close()
        return self._fork()

    def _fork(self) -> BaseProcess:
        """On the fork thread: the child gets the handler (the model with it) and its end of a pipe."""
        context = multiprocessing.get_context("fork")
        connection, child_end = context.Pipe()
        inherited = open_files() - {child_end.fileno()}  # the parent's, to close in the child
        process = context.Process(
            target=_serve,
            args=(child_end, self.handler, self.threads, os.getpid(), inherited),
            name=self.name,
            daemon=True,
        )
        try:
            process.start()
        except BaseException:
            connection.close()
            raise
        finally:
            child_end.close()  # the child holds it now: its death closes the pipe
        self.process, self._connection = process, connection
        return process

    def _close(self) -> None:
        """The ended process reaped and its pipe and sentinel closed (a restart's first step)."""
        if self._connection is not None:
            self._connection.close()
        if self.process is not None:
            self.process.join(1.0)
            with contextlib.suppress(ValueError):  # still running: left to the garbage collector
                self.process.close()


Worker = ThreadWorker | ForkedWorker


class _Failed:
    """A handler's exception on its way back to the parent."""

    def __init__(self, error: Exception, where: str):
        error.add_note(where)  # the worker's traceback, in the parent's log
        try:
            pickle.dumps(error)
        except Exception:  # what cannot cross the pipe arrives as its message
            error = RuntimeError(f"{type(error).__name__}: {error}")
            error.add_note(where)
        self.error = error


def _serve(connection: Connection, handler: Handler, threads: int, parent: int, inherited: set[int]) -> None:
    """A worker process: run the tasks it is sent, each with the torch threads it comes with,
    until told to stop (None). A failing task fails that call, not the worker."""
    import torch

    signal.set_wakeup_fd(-1)  # the parent's event loop's: a signal here must not wake it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's graceful-shutdown handler
    die_with_parent(parent)
    close_files(inherited, keep=frozenset({connection.fileno()}))
    torch.set_num_threads(threads)
    while (message := connection.recv()) is not None:
        task, threads = message
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        try:
            result = handler(task)
        except Exception as e:
            connection.send(_Failed(e, f"in {multiprocessing.current_process().name}:\n{traceback.format_exc()}"))
            continue
        connection.send(result)
