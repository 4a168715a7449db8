"""`pip install .` gets what the code imports: pyproject.toml declares every package of the
pinned lock (requirements.txt), with a range each pin satisfies, and the Python the code needs."""

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    """Each pinned package's version; a pin may carry an environment marker (uvloop: not on Windows)."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    pinned = [Requirement(line.split("#")[0]) for line in lines if line.split("#")[0].strip()]
    return {canonicalize_name(r.name): str(r.specifier).removeprefix("==") for r in pinned}


def declared() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {canonicalize_name(r.name): r for r in map(Requirement, project["dependencies"])}


def test_every_pinned_package_is_declared_and_nothing_else():
    assert sorted(declared()) == sorted(pins())


def test_every_pin_is_within_its_declared_range():
    ranges = declared()
    outside = {
        name: (version, str(ranges[name].specifier))
        for name, version in pins().items()
        if not ranges[name].specifier.contains(version)
    }
    assert outside == {}


def test_every_package_of_the_project_is_installed():
    """The packages find_packages includes are the project's top-level folders with code."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    included = {pattern.rstrip("*") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    folders = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert included == folders


# The oldest Python the code runs on: it uses BaseException.add_note and its tests tomllib (3.11), and CI
# runs this very version, so a floor below it would promise what nothing tests.
FLOOR = (3, 11)


def declared_python() -> SpecifierSet:
    return SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])


def test_the_declared_python_floor_is_3_11_and_ruff_targets_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert str(declared_python()) == ">=3.11"
    assert project["tool"]["ruff"]["target-version"] == "py311"
    assert project["tool"]["mypy"]["python_version"] == "3.11"


def test_the_running_interpreter_is_at_or_above_the_declared_floor():
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert declared_python().contains(running)
    assert sys.version_info[:2] >= FLOOR
    below = f"{FLOOR[0]}.{FLOOR[1] - 1}"
    assert not declared_python().contains(below)  # the floor is the floor: 3.10 is refused
