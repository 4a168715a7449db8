"""The `captioner` command: a dispatcher that imports only the subcommand it runs."""

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import cli

HEAVY = ("training", "api", "fastapi", "pycocotools")


def modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code` (SystemExit allowed)."""
    program = (
        "import json, sys\ntry:\n"
        + textwrap.indent(textwrap.dedent(code), "    ")
        + "\nexcept SystemExit:\n    pass\nprint(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


def test_help_lists_every_subcommand():
    script = Path(sys.executable).with_name("captioner")  # the console script pip installed
    command = [str(script)] if script.exists() else [sys.executable, "-m", "cli"]
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for name, (_, help_text) in cli.COMMANDS.items():
        assert name in done.stdout and help_text in done.stdout


def test_help_imports_no_subcommand():
    modules = modules_after("import cli; cli.main(['--help'])")
    assert "cli" in modules
    subcommands = {module for module, _ in cli.COMMANDS.values()}
    assert sorted(subcommands & modules) == []
    assert heavy(modules) == []


def test_importing_the_predictor_imports_no_training_or_web_code():
    modules = modules_after("import captioner.predictor")
    assert "captioner.predictor" in modules and "torch" in modules
    assert heavy(modules) == []


def test_the_caption_subcommand_imports_no_training_or_web_code():
    module = cli.COMMANDS["caption"][0]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} (the folder CLI) is not written yet")
    modules = modules_after("import cli; cli.main(['caption', '--help'])")
    assert module in modules  # its parser was really built
    assert heavy(modules) == []


@pytest.mark.parametrize("argv", [[], ["paint"], ["--nonsense"]])
def test_a_missing_or_unknown_command_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(argv)
    assert caught.value.code == 2
    assert "usage: captioner" in capsys.readouterr().err


def test_the_subcommand_gets_the_rest_of_the_arguments_and_returns_its_code(tmp_path, monkeypatch):
    (tmp_path / "fake_subcommand.py").write_text(
        textwrap.dedent("""
        def add_arguments(parser):
            parser.add_argument("path")
            parser.add_argument("--times", type=int, default=1)

        def main(args):
            return 0 if args.path == "ok" else args.times
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "fake", ("fake_subcommand", "a test double"))
    assert cli.main(["fake", "ok"]) == 0
    assert cli.main(["fake", "x", "--times", "7"]) == 7
    with pytest.raises(SystemExit) as caught:
        cli.main(["fake", "--times", "not-a-number"])
    assert caught.value.code == 2
