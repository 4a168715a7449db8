"""benchmarks/RESULTS.md holds one section per benchmark; each run replaces only its own."""

from pathlib import Path


def write_section(path: Path, heading: str, text: str) -> None:
    """Replace the section that starts with `heading` (a `## ` line) by `text`, keeping the others."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    start = old.find(heading)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(heading))
        new = old[:start] + text.rstrip("\n") + "\n\n" + (old[end + 1:] if end >= 0 else "")
    path.write_text(new.rstrip("\n") + "\n")
