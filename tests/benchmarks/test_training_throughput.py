"""`make bench`'s training throughput runs end to end in a quick mode, writes its JSON and its
section, and keeps the other sections of RESULTS.md."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).parents[2] / "benchmarks" / "training_throughput.py"


@pytest.mark.slow  # about 8 s
def test_quick_run_writes_its_section_and_json_and_keeps_the_others(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmarks\n\n## Another benchmark\n\nkept\n")
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHMARK),
            "--out",
            str(results),
            "--encoder",
            "tiny",
            "--batch-size",
            "2",
            "--steps",
            "1",
            "--rounds",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    measured = json.loads((tmp_path / "results" / "training_throughput.json").read_text())
    assert set(measured["captions_per_s"]) == {"cache", "tutorials"}
    assert all(rate > 0 for rate in measured["captions_per_s"].values())
    text = results.read_text()
    assert "## Another benchmark\n\nkept" in text
    assert "## Training throughput" in text and measured["machine"]["cpu"] in text
    assert "| cache | " in text and "| tutorials | " in text
