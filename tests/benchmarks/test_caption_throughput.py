"""`make bench` keeps working: the throughput benchmark runs end to end on a few images, and its
tutorials' loop decodes with the library's beam search, projecting the image again at every step."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner.decoding import DecodeOptions, decode

BENCHMARK = Path(__file__).parents[2] / "benchmarks" / "caption_throughput.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("caption_throughput", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tutorials_decoder_says_what_the_library_says_and_projects_the_image_at_every_step(benchmark, tiny_model):
    decoder = tiny_model.decoder
    with torch.inference_mode():
        features = tiny_model.encoder(torch.rand(1, 3, 64, 64))  # (1, P, D)
        options = DecodeOptions(beam_size=3, num_captions=3, attention=True, max_length=6)
        ours = decode(decoder, decoder.prepare(features), options)[0]
        projections = []
        hook = decoder.key_proj.register_forward_hook(lambda module, inputs, output: projections.append(output.size(0)))
        theirs = decode(benchmark.ProjectingEveryStep(decoder, features), decoder.prepare(features), options)[0]
        hook.remove()
    assert [h.token_ids for h in theirs] == [h.token_ids for h in ours]
    assert [h.log_prob for h in theirs] == pytest.approx([h.log_prob for h in ours], abs=1e-5)
    assert projections[:3] == [1, 1, 3]  # once before the search, then at each step for each row
    assert len(projections) >= 1 + max(len(h.token_ids) + 1 for h in ours)  # every word and <end> had its own


@pytest.mark.slow  # about 30 s
def test_the_benchmark_measures_every_contender_and_keeps_the_other_sections(benchmark, tiny_checkpoint, tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text(
        "# Benchmarks\n\n## Folder captioning throughput\n\nstale figures\n\n## Decoder comparison\n\nkept\n"
    )
    run = subprocess.run(
        [
            sys.executable,
            str(BENCHMARK),
            "--checkpoint",
            str(tiny_checkpoint),
            "--images",
            "6",
            "--rounds",
            "1",
            "--max-length",
            "4",
            "--out",
            str(results),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr

    text = results.read_text()
    assert "## Decoder comparison\n\nkept" in text and "stale figures" not in text
    section = text[text.index("## Folder captioning throughput") :]
    measured = json.loads((tmp_path / "results" / "caption_throughput.json").read_text())
    assert len(measured["rounds"]) == 1 and measured["setup"]["images"] == 6
    machine = measured["machine"]
    assert f"{machine['cores']} cores, torch {machine['torch']}" in section and machine["date"] in section
    rows = [line.strip("| ").split(" | ") for line in section.splitlines() if line.startswith("| (")]
    measured_round = measured["rounds"][0]
    amp = ["c_amp"] if benchmark.native_bf16() else []  # measured only where the CPU has bf16 itself
    assert sorted(measured_round) == sorted(["a", "a_sizes", "b", "b'", "c", *amp])
    assert [row[0][:4] for row in rows] == ["(a) ", "(b) ", "(b')", "(c) "] + ["(c) "] * len(amp)
    rates = {key: measured_round[key]["images_per_s"] for key in ("a", "b", "b'", "c", *amp)}
    for row, (key, rate) in zip(rows, rates.items(), strict=True):
        assert rate > 0 and measured_round[key]["cpu_ms"] > 0 and row[1] == f"{rate:.1f}", key
        if key != "c":
            ratio = f"{rates['c'] / rate:.2f}"
            assert row[3:] == [ratio, f"{ratio} to {ratio}"], key  # one round: the range is its own ratio
    assert "(a) by batch size" in section and "(c)'s stages on one thread" in section
