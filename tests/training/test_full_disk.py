"""`captioner train` on a full disk: one line naming the file, exit status 1, and nothing a later
run trusts half-written: no feature cache that looks complete, the previous checkpoint intact.

The command runs as a real process under a file-size limit (`ulimit -f`), which fails a write
part-way with EFBIG as a full file system fails it with ENOSPC, and needs no privileges.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner.checkpoint import load_checkpoint
from tests.conftest import run_command

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TOO_LARGE = "file too large writing {}: raise the file size limit (ulimit -f) or write to another file system"
RERUN = "run the same command again with --resume to go on from the last saved state"
TINY = ["--encoder", "tiny", "--embed-dim", "32", "--region-dim", "32", "--hidden-dim", "64", "--attention-dim", "32"]


def train_command(data: Path, out: Path, cache: Path, *flags: str) -> list[str]:
    quiet = ["--batch-size", "8", "--threads", "1", "--workers", "0", "--no-progress", "--patience", "100"]
    return [str(BIN / "captioner"), "train", "--data", str(data), "--out", str(out), "--cache-dir", str(cache)] + [
        *quiet,
        *TINY,
        *flags,
    ]


def run(command: list[str], limit: int | None = None) -> subprocess.CompletedProcess:
    return run_command(command, limit, env={**os.environ, "OMP_NUM_THREADS": "1"})


def reported_path(run: subprocess.CompletedProcess) -> Path:
    """The file the one error line names, once exit status 1 and that line (no traceback, nor death by
    SIGXFSZ: -25) are checked."""
    assert run.returncode == 1, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    line = lines[0]
    before, after = TOO_LARGE.split("{}")
    head, tail = f"captioner train: error: {before}", f"{after} and {RERUN}"
    assert line.startswith(head) and line.endswith(tail), line
    return Path(line[len(head) : -len(tail)])


def test_a_full_disk_while_caching_features_leaves_no_cache_that_looks_complete(shapes_root, tmp_path):
    cache = tmp_path / "features"
    command = train_command(shapes_root, tmp_path / "run", cache, "--epochs", "1")
    full = run(command, limit=50_000)  # the train split's 24 x 64 x 32 fp16 features are 98 kB
    path = reported_path(full)
    assert path.parent == cache and re.fullmatch(r"tiny-train-.+\.npy", path.name), path
    assert list(cache.iterdir()) == [], "a cache or its temporary file was left"


@pytest.fixture(scope="module")
def one_epoch(shapes_root, tmp_path_factory) -> tuple[Path, Path]:
    """(OUT, the feature cache) of a finished one-epoch run."""
    root = tmp_path_factory.mktemp("one-epoch")
    finished = run(train_command(shapes_root, root / "run", root / "features", "--epochs", "1"))
    assert finished.returncode == 0, finished.stderr
    return root / "run", root / "features"


@pytest.fixture
def earlier_run(one_epoch, tmp_path) -> tuple[Path, Path, dict[str, bytes]]:
    """A copy of that run's OUT, its feature cache (only read from now on), and what OUT holds."""
    out = tmp_path / "run"
    shutil.copytree(one_epoch[0], out)
    return out, one_epoch[1], {name: (out / name).read_bytes() for name in ("best.safetensors", "last.pt")}


def assert_kept(out: Path, saved: dict[str, bytes]) -> None:
    """The checkpoints as they were, loadable, and no temporary file beside them."""
    for name, content in saved.items():
        assert (out / name).read_bytes() == content, f"{name} changed"
    load_checkpoint(out / "best.safetensors")
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [], "a temporary file was left"


def test_a_full_disk_saving_the_best_model_keeps_the_previous_one(shapes_root, earlier_run):
    """safetensors (Rust) names the OS error only in its message: it is found there."""
    out, cache, saved = earlier_run
    command = train_command(shapes_root, out, cache, "--epochs", "1")  # afresh: its first epoch is its best
    full = run(command, limit=len(saved["best.safetensors"]) // 2)
    assert reported_path(full) == out / "best.safetensors"
    assert_kept(out, saved)


def test_a_full_disk_saving_the_resume_state_keeps_the_previous_one_and_resumes(shapes_root, earlier_run):
    """torch.save hides the OS error behind its own: it is found there."""
    out, cache, saved = earlier_run
    command = train_command(shapes_root, out, cache, "--epochs", "3", "--resume")
    limit = (len(saved["best.safetensors"]) + len(saved["last.pt"])) // 2  # a better model is saved; last.pt not
    full = run(command, limit=limit)
    assert reported_path(full) == out / "last.pt"
    saved.pop("best.safetensors")  # replaced whole if epoch 2 was better
    assert_kept(out, saved)

    resumed = run(command)
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 3
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [1, 2, 3]
