"""The developer's own CAPTIONER_* variables must not change what these tests compare against."""

import os

import pytest


@pytest.fixture(autouse=True)
def no_captioner_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("CAPTIONER_"):
            monkeypatch.delenv(name)
