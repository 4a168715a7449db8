"""`make bench`'s service load benchmark runs end to end in a quick mode against the real server,
writes its JSON and its section, and keeps the other sections of RESULTS.md."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).parents[2] / "benchmarks" / "service_load.py"

pytestmark = pytest.mark.slow


def test_quick_run_writes_its_section_and_json_and_keeps_the_others(tiny_checkpoint, tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmarks\n\n## Another benchmark\n\nkept\n")
    quick = ["--images", "4", "--max-length", "3", "--clients", "1", "3", "--seconds", "1", "--warm-up", "0.5"]
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--checkpoint", str(tiny_checkpoint), "--out", str(results), *quick]
        + ["--soak-s", "2", "--flood-side", "600", "--folder-rounds", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    measured = json.loads((tmp_path / "results" / "service_load.json").read_text())
    loads = measured["server"]["loads"]
    assert [row["clients"] for row in loads] == [1, 3]
    assert all(row["images_per_s"] > 0 and row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] for row in loads)
    assert all(row["memory"]["processes"] >= 1 and row["memory"]["pss_mb"] > 0 for row in loads)
    # every answered request was work for the server's process, its workers and the clients
    assert all(row["answered"] >= row["requests"] > 0 for row in loads)
    assert all(row["cpu"]["server_ms"] > 0 and row["cpu"]["workers_ms"] > 0 for row in loads)
    assert all(row["cpu"]["clients_ms"] > 0 for row in loads)
    assert measured["folder"]["images_per_s"] > 0 and measured["in_process"]["p50_ms"] > 0
    assert measured["server"]["soak"]["requests"] > 0
    assert measured["server"]["flood"]["after"]["processes"] == measured["server"]["flood"]["before"]["processes"]
    text = results.read_text()
    assert "## Another benchmark\n\nkept" in text
    assert "## Service under load" in text and measured["machine"]["cpu"] in text
    assert "| 1 | " in text and "| 3 | " in text and "Soak: 8 clients" in text
    assert "one client over HTTP: p50" in text
