"""`captioner caption` as real processes: killed midway and resumed, and split across torchrun ranks."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from runtime.children import child_processes as children
from tests.conftest import gone
from tests.folder.conftest import BIN, many_images, resume, single_run, start_midway, wait_for


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from /proc (Linux)")
def test_a_killed_run_takes_its_workers_along_and_resumes_to_the_uninterrupted_output(slow_run):
    folder, flags, out, command = slow_run
    process = start_midway(command, out)
    workers = children(process.pid)
    assert len(workers) == 2, "the lanes are not two forked processes"
    process.send_signal(signal.SIGKILL)  # no handler runs: the kernel must end the workers
    process.wait()
    deadline = time.monotonic() + 10
    while not all(gone(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(gone(pid) for pid in workers), "workers outlived a killed run"
    done = out.read_text().count("\n")
    assert 5 <= done < 151, "the run was not interrupted midway"

    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"already done {done}" in resumed.stderr
    assert out.read_text() == single_run(folder, out.with_name("reference.jsonl"), *flags)


@pytest.mark.slow
def test_ctrl_c_stops_the_run_and_its_workers_cleanly_and_it_resumes(slow_run):
    folder, flags, out, command = slow_run
    process = start_midway(command, out)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group gets it
    resume(process)
    stderr = wait_for(process)
    assert process.returncode == 130, stderr
    assert "interrupted: " in stderr and "rerun the same command to go on" in stderr
    assert "Traceback" not in stderr  # neither the command nor its workers
    done = out.read_text().count("\n")
    assert 5 <= done < 151

    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert out.read_text() == single_run(folder, out.with_name("reference.jsonl"), *flags)


@pytest.mark.slow
def test_torchrun_ranks_merge_into_the_single_run_output(tmp_path, tiny_checkpoint):
    folder = many_images(tmp_path / "photos", 24)
    flags = ["-r", "--checkpoint", tiny_checkpoint, "--method", "greedy", "--batch-size", "1", "--threads", "1"]
    out = tmp_path / "captions.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    torchrun = subprocess.Popen(
        [
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "cli",
            "caption",
            str(folder),
            "--out",
            str(out),
            *map(str, flags),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        _, stderr = torchrun.communicate(timeout=300)
    finally:
        if torchrun.poll() is None:
            os.killpg(torchrun.pid, signal.SIGKILL)  # the ranks too
    assert torchrun.returncode == 0, stderr
    assert "rank 0: captioned" in stderr and "rank 1: captioned" in stderr
    # parts merged away; the settings are rank 0's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.jsonl", "captions.jsonl.settings.json", "photos"]
    assert out.read_text() == single_run(folder, out.with_name("reference.jsonl"), *flags)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from /proc (Linux)")
def test_a_worker_that_dies_is_reported_and_the_rerun_finishes_the_job(slow_run):
    folder, flags, out, command = slow_run
    process = start_midway(command, out)
    os.kill(children(process.pid)[0], signal.SIGKILL)  # as the kernel's out-of-memory killer would
    resume(process)
    stderr = wait_for(process)
    assert process.returncode == 1, stderr
    assert "error: a worker process died" in stderr and "Traceback" not in stderr
    assert re.search(r"captioning set\d/img_\d{4}\.png.*: model worker captioner-worker-\d", stderr), stderr
    assert "killed by signal 9" in stderr and "rerun the same command to caption them and the rest" in stderr
    assert out.read_text().count("\n") < 151

    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert out.read_text() == single_run(folder, out.with_name("reference.jsonl"), *flags)
