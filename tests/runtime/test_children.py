"""What a forked child closes: the parent's descriptors as listed just before the fork, and never
one the fork itself makes afterwards; the thread that forks and watches a child; how many deaths
a restart budget allows (on a fake clock)."""

import multiprocessing
import os
import signal
import threading

import pytest

from runtime.children import ForkThread, RestartBudget, open_files


def test_the_listing_s_own_descriptor_is_not_among_the_open_ones():
    before = open_files()
    read, write = os.pipe()  # the lowest free numbers: the listing's, had it been counted, among them
    try:
        assert read not in before and write not in before
        assert {read, write} <= open_files()
    finally:
        os.close(read)
        os.close(write)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_restart_budget_allows_so_many_deaths_within_its_window_and_forgets_older_ones():
    clock = FakeClock()
    budget = RestartBudget(2, 60, clock)
    assert budget.allow()
    clock.now = 30.0
    assert budget.allow()
    clock.now = 59.9
    assert not budget.allow()  # a third within the window
    clock.now = 60.0  # the first has left the window (the refused one never counted)
    assert budget.allow()
    assert not budget.allow()
    assert RestartBudget(0, 60, clock).allow() is False


def _sleep_in_child() -> None:
    threading.Event().wait()


def test_a_fork_thread_reports_its_child_s_end_once_and_forks_its_replacement():
    context = multiprocessing.get_context("fork")
    ended = threading.Semaphore(0)
    forks = ForkThread("test-forks", on_end=ended.release)
    children = []

    def fork():
        child = context.Process(target=_sleep_in_child, daemon=True)
        child.start()
        children.append(child)
        return child

    try:
        first = forks.fork(fork)
        os.kill(first.pid, signal.SIGKILL)
        assert ended.acquire(timeout=30)
        second = forks.fork(fork)
        assert second.pid != first.pid and second.is_alive()
        assert not ended.acquire(timeout=0)  # the first child's end was reported once
        second.kill()
        assert ended.acquire(timeout=30)
    finally:
        for child in children:
            child.kill()
            child.join()
        forks.stop()


def test_a_fork_thread_raises_the_error_of_a_fork_that_failed_and_goes_on():
    forks = ForkThread("test-forks")

    def fails():
        raise OSError("no memory for a fork")

    try:
        with pytest.raises(OSError, match="no memory"):
            forks.fork(fails)
        child = forks.fork(lambda: _started(multiprocessing.get_context("fork").Process(target=_sleep_in_child)))
        child.kill()
        child.join()
    finally:
        forks.stop()


def _started(process):
    process.start()
    return process
