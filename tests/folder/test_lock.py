"""One run at a time on an output: a second run, or a merge, on an output that a live run holds is
refused before any work; the lock dies with its holder, even one killed outright."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from folder.command import Outputs
from tests.folder.conftest import caption, picture, read_lines, single_run, start_midway, wait_for

HOLD = """
import sys, time
from pathlib import Path
from folder.command import Outputs
from folder.lock import holding
with holding(Outputs(Path(sys.argv[1]), sys.argv[2]).locks):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Starts a process that holds an output's locks as a run does, until it is killed."""
    processes = []

    def hold(out: Path, format: str) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HOLD, str(out), format], stdout=subprocess.PIPE, text=True)
        processes.append(process)
        assert process.stdout.readline() == "held\n"
        return process

    yield hold
    for process in processes:
        process.kill()
        process.wait()


def test_runs_and_merges_on_a_held_output_are_refused_before_any_work(holder, tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    picture("RGB").save(folder / "a.jpg")
    out = folder / "captions.csv"  # inside the folder: its lock files are never inputs
    holding = holder(out, "csv")
    args = (folder, "--checkpoint", tiny_checkpoint, "--method", "greedy")
    before = sorted(p.name for p in folder.iterdir())
    assert before == ["a.jpg", "captions.csv.jsonl.lock", "captions.csv.lock"]

    assert caption(*args, "--out", out) == 2
    err = capsys.readouterr().err
    assert f"error: another run is writing {out} (" in err and f"pid {holding.pid} on " in err
    assert caption(*args, "--out", folder / "captions.csv.jsonl") == 2  # a jsonl run on its journal
    part = tmp_path / "part0.jsonl"
    caption(*args, "--out", part, "--shard", "0/1")
    assert caption(folder, "--out", out, "--merge", part) == 2
    assert "let it finish, then merge" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing read, nothing written

    holding.send_signal(signal.SIGKILL)  # no handler runs: the lock files stay, holding nothing
    holding.wait()
    assert caption(*args, "--out", out) == 0
    assert [line["file"] for line in read_lines(folder / "captions.csv.jsonl")] == ["a.jpg"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "a.jpg",
        "captions.csv",
        "captions.csv.jsonl",
        "captions.csv.jsonl.settings.json",
    ]


def test_outputs_lock_their_own_name_and_their_journals(tmp_path):
    assert Outputs(tmp_path / "c.jsonl", "jsonl").locks == [tmp_path / "c.jsonl.lock"]
    assert Outputs(tmp_path / "r.json", "coco").locks == [tmp_path / "r.json.lock", tmp_path / "r.json.jsonl.lock"]
    outputs = Outputs(tmp_path / "c.csv", "csv")
    assert all(outputs.written_here(lock) for lock in outputs.locks)


@pytest.mark.slow
def test_a_second_run_on_a_live_output_is_refused_and_a_killed_one_lets_the_next_resume(slow_run):
    folder, flags, out, command = slow_run
    first = start_midway(command, out)
    second = subprocess.run(command, capture_output=True, text=True)
    assert second.returncode == 2, second.stderr
    assert f"another run is writing {out}" in second.stderr and "captioned" not in second.stderr

    first.send_signal(signal.SIGKILL)
    wait_for(first)
    assert out.with_name("captions.jsonl.lock").exists()  # left behind, held by nobody
    done = out.read_text().count("\n")
    assert 5 <= done < 151, "the first run was not interrupted midway"
    names = [json.loads(line)["file"] for line in out.read_text().splitlines()]
    assert len(set(names)) == len(names)  # the refused run wrote nothing

    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"already done {done}" in resumed.stderr
    assert not out.with_name("captions.jsonl.lock").exists()
    assert out.read_text() == single_run(folder, out.with_name("reference.jsonl"), *flags)
