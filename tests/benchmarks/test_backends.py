"""`make bench`'s backend comparison runs end to end in a quick mode: it exports both ONNX
encoders from the checkpoint, measures each backend, and writes its JSON and its section."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).parents[2] / "benchmarks" / "backends.py"

pytestmark = pytest.mark.slow


def test_quick_run_measures_every_backend_and_writes_its_section(tiny_checkpoint, tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmarks\n\n## Another benchmark\n\nkept\n")
    quick = ["--images", "6", "--max-length", "3", "--rounds", "1", "--service-rounds", "1", "--clients", "2"]
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--checkpoint", str(tiny_checkpoint), "--out", str(results), *quick]
        + ["--seconds", "1", "--warm-up", "0.5"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    measured = json.loads((tmp_path / "results" / "backends.json").read_text())
    (round_,) = measured["rounds"]
    assert set(round_) == set(measured["service"]) == {"torch", "fp32", "int8"}
    assert all(r["encoder"]["images_per_s"] > 0 and r["caption"]["images_per_s"] > 0 for r in round_.values())
    assert all(s[0]["server"] > 0 and s[0]["folder"] > 0 for s in measured["service"].values())
    assert all(s[0]["folder_steady"] is None or s[0]["folder_steady"] > 0 for s in measured["service"].values())
    assert all(s[0]["cpu"]["server_ms"] > 0 and s[0]["cpu"]["workers_ms"] > 0 for s in measured["service"].values())
    text = results.read_text()
    assert "## Another benchmark\n\nkept" in text and "## Encoder backends" in text
    for label in ("| torch fp32 | ", "| ONNX Runtime fp32 | ", "| ONNX Runtime int8 | "):
        assert label in text
    assert "| torch fp32 | " in text and "1.00 (1.00 to 1.00)" in text  # torch against itself
    assert measured["machine"]["cpu"] in text
