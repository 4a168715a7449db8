"""benchmarks/caption_truth.py scores a model's captions of a Shapes split through the real folder command and
the real server: run end to end on a briefly trained tiny model and 6 images, both sources give the same captions
and scores, and its section lands in RESULTS.md beside the others."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tests.training.conftest import shapes_root, small_model, train_config
from training.train import train

BENCHMARK = Path(__file__).parents[2] / "benchmarks" / "caption_truth.py"
SECTION = "## Caption truth, quick"

__all__ = ["shapes_root"]  # a fixture: pytest finds it imported here
pytestmark = pytest.mark.usefixtures("one_thread")  # and a private CAPTIONER_HOME, for the children too


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("caption_truth", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def named_checkpoint(shapes_root, tmp_path_factory) -> Path:
    """A tiny model trained a few epochs on the tiny world: it names colours and shapes, so the pointing
    game has attention to read (a random model's captions name none)."""
    out = tmp_path_factory.mktemp("caption-truth") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAPTIONER_HOME", str(out.parent / "home"))
        return train(train_config(shapes_root, out, epochs=6, lr=0.02), small_model())


def test_the_top_caption_keeps_its_tokens_and_its_attention_as_one_grid_a_word(benchmark):
    flat = [[0.1] * 6, [0.2] * 6, [0.3] * 6]  # three words' grids of 2 x 3, each written flat
    result = {"attention_grid": [2, 3], "captions": [{"tokens": ["a", "red", "circle"], "attention": flat}, {}]}
    caption = benchmark.top_caption(result)
    assert caption["tokens"] == ["a", "red", "circle"]
    assert caption["attention"].shape == (3, 2, 3)
    assert np.all(caption["attention"][2] == 0.3)
    assert benchmark.top_caption({"attention_grid": [2, 3], "captions": [{"tokens": []}]})["attention"] is None


def test_a_row_says_how_many_relation_phrases_and_pointed_words_its_figures_rest_on(benchmark):
    scores = benchmark.TruthScores(
        images=300,
        exact_object_set=0.98,
        informative_rate=1.0,
        count_or_exact=0.98,
        object_precision=0.99,
        object_recall=0.99,
        relation_accuracy=61 / 64,
        relation_count=64,
        pointing_accuracy=float("nan"),
        pointing_count=0,
    )
    row = benchmark.score_row("folder command, all", scores)
    assert row[:3] == ["folder command, all", "300", "0.980"]
    assert row[-2:] == ["0.953 (64)", "n/a"]


@pytest.mark.slow
def test_both_sources_caption_alike_and_the_section_is_written(benchmark, named_checkpoint, shapes_root, tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmarks\n\n## Another benchmark\n\nkept\n")
    argv = ["--data", str(shapes_root), "--split", "val", "--checkpoint", str(named_checkpoint), "--limit", "6"]
    assert benchmark.main([*argv, "--out", str(results), "--section", SECTION]) == 0

    text = results.read_text()
    assert "## Another benchmark\n\nkept" in text
    section = text[text.index(SECTION) :]
    assert "--limit 6" in section and "cores" in section and benchmark.cpu_name() in section
    rows = {line.split(" | ")[0].removeprefix("| "): line.split(" | ")[1:] for line in section.splitlines()}
    for source in ("folder command", "API"):
        assert rows[f"{source}, all"][0] == "6"
        by_objects = [key for key in rows if key.startswith(f"{source}, ") and key.endswith(("object", "objects"))]
        assert sum(int(rows[key][0]) for key in by_objects) == 6
    assert rows["folder command, all"] == rows["API, all"]  # the same captions and attention: the same scores
    assert rows["folder command, all"][-1].rstrip(" |") != "n/a"  # shape words were named and pointed at
    assert "Top caption identical in both sources: 6 of 6 images (1.000)." in section
    assert 'starting with "there are": folder command ' in section and ", API " in section
    samples = [line for line in section.splitlines() if ".png |" in line]
    assert 1 <= len(samples) <= 6 and all(line.count("`") == 2 for line in samples)
