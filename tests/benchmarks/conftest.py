"""Fixtures the benchmark tests share with the training tests."""

from tests.training.conftest import one_thread

__all__ = ["one_thread"]  # a fixture: pytest finds it in this conftest for the tests beside it
