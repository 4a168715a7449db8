"""`make compare` keeps working: every variant is trained and scored, on one feature cache.

The real budget (4,300 EfficientNet-Lite0 feature maps, 5 x 4 epochs) takes many
minutes, so the recipe is shrunk to the tiny encoder and a few images; the rest is
the benchmark's own code.
"""

import importlib.util
from pathlib import Path

import pytest

from tests.training.conftest import small_model

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "compare_decoders.py"


@pytest.fixture
def compare(monkeypatch):
    spec = importlib.util.spec_from_file_location("compare_decoders", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "DEMO_MODEL", small_model())
    quick = dict(batch_size=8, lr=0.01, warmup_steps=0, threads=1, workers=0, val_limit=0)
    monkeypatch.setattr(
        module, "DEMO_TRAINING", type(module.DEMO_TRAINING)(**{**module.DEMO_TRAINING.model_dump(), **quick})
    )
    monkeypatch.setattr(module, "DEMO_SPLITS", {"train": 16, "val": 8, "test": 8})
    return module


@pytest.mark.slow
def test_every_variant_is_scored_on_one_feature_cache_and_the_other_sections_are_kept(compare, one_thread, tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmarks\n\n## Folder captioning throughput\n\nkept as it is\n")
    assert compare.main(["--workdir", str(tmp_path / "work"), "--epochs", "1", "--out", str(results)]) == 0

    text = results.read_text()
    assert "## Folder captioning throughput\n\nkept as it is" in text
    rows = [line for line in text[text.index(compare.SECTION) :].splitlines() if line.startswith("| ")][
        1:
    ]  # after the header
    assert [row.split(" | ")[0][2:] for row in rows] == list(compare.VARIANTS)
    for row in rows:
        cells = row.strip("| ").split(" | ")[1:]
        assert len(cells) == len(compare.COLUMNS) + 1 and cells[-1].endswith(" min")
    no_attention = next(row for row in rows if "no attention" in row)
    assert no_attention.count("n/a") == 2  # relations and pointing need attention maps
    # the variants share one feature cache: one file per split, no more
    caches = sorted(p.name.split("-")[1] for p in (tmp_path / "work" / "features").glob("*.npy"))
    assert caches == ["train", "val"]
