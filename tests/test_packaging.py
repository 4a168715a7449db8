"""`pip install .` gets what the code imports: pyproject.toml declares every package of the
pinned lock (requirements.txt), with a range each pin satisfies."""

from pathlib import Path

import tomllib
from packaging.requirements import Requirement
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
