"""`captioner caption` as real processes: killed midway and resumed, and split across torchrun ranks."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner import cli
from tests.captioner.test_folder import keep_torch_threads  # noqa: F401 (autouse fixture)

BIN = Path(sys.executable).parent


def many_images(folder: Path, count: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        sub = folder / f"set{i % 3}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(sub / f"img_{i:04d}.png")
    (folder / "set0" / "readme.txt").write_text("not an image")
    return folder


def single_run(folder: Path, out: Path, *flags) -> str:
    assert cli.main(["caption", str(folder), "--out", str(out), *map(str, flags)]) == 0
    return out.read_text()


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_output(tmp_path, tiny_checkpoint):
    folder = many_images(tmp_path / "photos", 150)
    # beam 10 to 50 words, one image per batch: slow enough to be killed midway
    flags = ["-r", "--checkpoint", tiny_checkpoint, "--batch-size", "1", "--beam-size", "10",
             "--max-length", "50", "--threads", "1", "--workers", "1"]
    out = tmp_path / "captions.jsonl"
    command = [str(BIN / "captioner"), "caption", str(folder), "--out", str(out), *map(str, flags)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 5):
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = out.read_text().count("\n")
    assert 5 <= done < 151, "the run was not interrupted midway"

    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"already done {done}" in resumed.stderr
    assert out.read_text() == single_run(folder, tmp_path / "reference.jsonl", *flags)


@pytest.mark.slow
def test_torchrun_ranks_merge_into_the_single_run_output(tmp_path, tiny_checkpoint):
    folder = many_images(tmp_path / "photos", 24)
    flags = ["-r", "--checkpoint", tiny_checkpoint, "--method", "greedy", "--batch-size", "1", "--threads", "1"]
    out = tmp_path / "captions.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    torchrun = subprocess.Popen([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m",
                                 "captioner.cli", "caption", str(folder), "--out", str(out), *map(str, flags)],
                                stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        _, stderr = torchrun.communicate(timeout=300)
    finally:
        if torchrun.poll() is None:
            os.killpg(torchrun.pid, signal.SIGKILL)  # the ranks too
    assert torchrun.returncode == 0, stderr
    assert "rank 0: captioned" in stderr and "rank 1: captioned" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.jsonl", "photos"]  # parts merged away
    assert out.read_text() == single_run(folder, tmp_path / "reference.jsonl", *flags)
