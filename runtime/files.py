"""Files that are replaced whole: a reader sees the old file or the new one, never half of one."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO


@contextmanager
def replacing(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path beside `path` to write to; it becomes `path` when the block ends without
    an error, and is removed when it raises. The name carries the process id, so ranks or runs
    that race to write the same file never write into each other's half-written one.

    `mode` is set explicitly: some writers (safetensors, numpy's memmap) create files owner-only,
    and a server in a container reads them as another user.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def replacing_text(path: str | Path) -> Iterator[TextIO]:
    """`replacing` for a UTF-8 text file, opened with newline="" so what is written is what lands
    (as the csv module needs)."""
    with replacing(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        yield f


def write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text`, whole."""
    with replacing_text(path) as f:
        f.write(text)
