"""benchmarks/RESULTS.md holds one section per benchmark; each run replaces only its own.

A benchmark may also keep its measurements in results/<name>.json beside RESULTS.md and
render its section from them: the machine in one line, then a table.
"""

import contextlib
import datetime
import json
import os
import platform
from pathlib import Path

import torch


def write_section(path: Path, heading: str, text: str) -> None:
    """Replace the section that starts with `heading` (a `## ` line) by `text`, keeping the others."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    start = old.find(heading)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(heading))
        new = old[:start] + text.rstrip("\n") + "\n\n" + (old[end + 1 :] if end >= 0 else "")
    path.write_text(new.rstrip("\n") + "\n")


def save_results(markdown: Path, name: str, results: dict) -> Path:
    """`results` as results/<name>.json in the folder of the Markdown file."""
    path = markdown.parent / "results" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def machine() -> dict:
    """What the measurements ran on, and when."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def describe_machine(info: dict) -> str:
    return f"{info['date']}, {info['cpu']}, {info['cores']} cores, torch {info['torch']}, Python {info['python']}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a table whose first column names the row and the others hold numbers."""
    return [
        "| " + " | ".join(header) + " |",
        "| --- |" + " ---: |" * (len(header) - 1),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
