"""The layout's one rule: dependencies point from the applications to the library, never back.

`captioner` (the model library) imports no application and no runtime helper; `runtime` (what
the applications share about running) imports no application; the three applications (`api`,
`training`, `folder`) do not import each other; only the dispatcher `cli` names them all, and it
names them as strings. Read from the source, so an import inside a function counts too.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APPLICATIONS = {"api", "training", "folder"}
ALLOWED = {  # package -> the project's packages it may import
    "captioner": set(),
    "runtime": {"captioner"},
    "api": {"captioner", "runtime"},
    "training": {"captioner", "runtime"},
    "folder": {"captioner", "runtime"},
    "cli": set(),
}


def imported_packages(path: Path) -> set[str]:
    """The top-level packages a module imports, anywhere in it (relative imports stay home)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_what_it_stands_on(package):
    project = set(ALLOWED)
    offences = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        wrong = (imported_packages(path) & project) - ALLOWED[package] - {package}
        if wrong:
            offences[str(path.relative_to(ROOT))] = sorted(wrong)
    assert offences == {}


def test_the_dispatcher_names_every_application_and_nothing_in_the_library():
    import cli

    packages = {module.split(".")[0] for module, _ in cli.COMMANDS.values()}
    assert packages == APPLICATIONS


def test_the_rule_is_checked_against_real_imports(tmp_path):
    """The checker itself sees plain, dotted and in-function imports, and leaves relative ones."""
    module = tmp_path / "m.py"
    module.write_text(
        "import os\nimport api.app\nfrom training.train import x\nfrom . import y\n"
        "def f():\n    from folder import command\n",
        encoding="utf-8",
    )
    assert imported_packages(module) == {"os", "api", "training", "folder"}
