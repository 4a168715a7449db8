"""`make bench` keeps working: the throughput benchmark runs end to end on a few images."""

import re
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).parents[2] / "benchmarks" / "caption_throughput.py"


def test_the_benchmark_measures_every_contender_and_keeps_the_other_sections(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmarks\n\n## Decoder comparison on Shapes\n\nkept as it is\n")
    run = subprocess.run(
        [sys.executable, str(BENCHMARK), "--stand-in", "--checkpoint", str(tmp_path / "missing.safetensors"),
         "--images", "6", "--rounds", "1", "--max-length", "4", "--out", str(results)],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    text = results.read_text()
    assert "## Decoder comparison on Shapes\n\nkept as it is" in text
    section = text[text.index("## Folder captioning throughput"):]
    rates = {}
    for label in ("(a)", "(b)", "(b')", "(c)"):
        row = next(line for line in section.splitlines() if line.startswith(f"| {label} "))
        rates[label] = float(row.split("|")[2])
        assert rates[label] > 0
    ratios = re.search(r"\| (\S+) \| >= 0\.75: (met|not met) \|", section)
    assert ratios and abs(float(ratios.group(1)) - rates["(c)"] / rates["(a)"]) < 0.006
    assert "random-weight stand-in" in section and "6 images" in section
    assert re.search(r"a [\d.]+ \((\d+x\d+: [\d.]+, ){5}\d+x\d+: [\d.]+\)", section)  # the 6 encoder finalists ran
    amp = next(line for line in section.splitlines() if line.startswith("| (c) with `--amp`"))
    assert float(amp.split("|")[2]) > 0
    assert re.search(r"same as \(c\)'s: \(b\) [\d.]+%, \(b'\) [\d.]+%, \(c\) with --amp [\d.]+%", section)
