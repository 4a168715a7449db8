"""`captioner demo`: build the default model once, reuse it after, hand over to `captioner serve`.

The real recipe (EfficientNet-Lite0 features of 4,800 images, 500 decoded with
beam search) takes many minutes on a CPU, so the build is tested with the
recipe shrunk to the tiny encoder and a few images; everything else is the
demo's own code.
"""

import argparse
import shutil
import sys

import pytest

import cli
from captioner.checkpoint import load_checkpoint
from tests.training.conftest import small_model
from training import demo
from training.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_exec(monkeypatch):
    """Records the command the demo would become instead of becoming it."""
    calls = []
    monkeypatch.setattr(demo.os, "execv", lambda path, argv: calls.append((path, argv)))
    return calls


@pytest.fixture
def no_build(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the demo trained again")

    monkeypatch.setattr(demo, "build_default_model", refuse)


def test_an_existing_model_is_used_without_training(tiny_checkpoint, tmp_path, no_build, no_exec, capsys):
    workdir = tmp_path / "work"
    workdir.mkdir()
    shutil.copy(tiny_checkpoint, workdir / "model.safetensors")
    assert cli.main(["demo", "--no-serve", "--workdir", str(workdir)]) == 0
    assert "using the default model" in capsys.readouterr().out
    assert sorted(p.name for p in workdir.iterdir()) == ["model.safetensors"]  # no data, no run
    assert no_exec == []


def test_the_default_workdir_is_under_captioner_home(tiny_checkpoint, tmp_path, monkeypatch, no_build, no_exec, capsys):
    monkeypatch.setenv("CAPTIONER_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "demo").mkdir(parents=True)
    shutil.copy(tiny_checkpoint, tmp_path / "home" / "demo" / "model.safetensors")
    assert cli.main(["demo", "--no-serve"]) == 0
    assert str(tmp_path / "home" / "demo" / "model.safetensors") in capsys.readouterr().out


def test_a_held_out_world_has_a_workdir_of_its_own(tiny_checkpoint, tmp_path, monkeypatch, no_build, no_exec, capsys):
    monkeypatch.setenv("CAPTIONER_HOME", str(tmp_path / "home"))
    workdir = tmp_path / "home" / "demo-hold-out-blue-circle_red-triangle"
    workdir.mkdir(parents=True)
    shutil.copy(tiny_checkpoint, workdir / "model.safetensors")
    assert cli.main(["demo", "--no-serve", "--hold-out", "red triangle, blue circle"]) == 0
    assert str(workdir / "model.safetensors") in capsys.readouterr().out


def test_serving_hands_over_to_the_serve_command(tiny_checkpoint, tmp_path, no_build, no_exec):
    workdir = tmp_path / "work"
    workdir.mkdir()
    shutil.copy(tiny_checkpoint, workdir / "model.safetensors")
    demo.main(cli_args(["--workdir", str(workdir), "--host", "0.0.0.0", "--port", "8123"]))
    [(path, argv)] = no_exec
    assert path == sys.executable
    assert argv == [
        sys.executable,
        "-m",
        "cli",
        "serve",
        "--checkpoint",
        str(workdir / "model.safetensors"),
        "--host",
        "0.0.0.0",
        "--port",
        "8123",
    ]


def cli_args(argv):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def small_recipe(monkeypatch):
    """The demo's recipe with the tiny encoder and a handful of images."""
    monkeypatch.setattr(demo, "DEMO_MODEL", small_model())
    monkeypatch.setattr(
        demo,
        "DEMO_TRAINING",
        TrainConfig(
            **{
                **demo.DEMO_TRAINING.model_dump(),
                "batch_size": 8,
                "lr": 0.01,
                "warmup_steps": 0,
                "threads": 1,
                "workers": 0,
                "val_limit": 0,
            }
        ),
    )
    monkeypatch.setattr(demo, "DEMO_SPLITS", {"train": 24, "val": 8, "test": 8})


@pytest.mark.slow
def test_demo_builds_evaluates_and_saves_the_default_model_then_reuses_it(
    small_recipe, tmp_path, no_exec, monkeypatch, capsys
):
    workdir = tmp_path / "work"
    assert (
        cli.main(
            ["demo", "--no-serve", "--no-progress", "--workdir", str(workdir), "--epochs", "3", "--train-images", "16"]
        )
        == 0
    )
    assert "saved the default model" in capsys.readouterr().out
    model, card = load_checkpoint(workdir / "model.safetensors")
    assert model.config == small_model()
    assert card["name"] == "Shapes demo" and card["description"]
    assert card["training_data"]["train_images"] == 16
    assert {"test_CIDEr", "test_BLEU-4", "test_exact_object_set", "test_informative_rate"} <= set(card["scores"])
    assert "test_count_or_exact" not in card["scores"]  # the lenient rule is no headline
    # cross-entropy for 3 epochs, then one epoch of SCST from its best
    assert card["objective"] == "SCST" and card["train_config"]["epochs"] == 1
    assert card["init_from"]["checkpoint"] == str((workdir / "run" / "best.safetensors").resolve())
    assert card["init_from"]["objective"] == "cross-entropy"
    assert (workdir / "scst" / "best.safetensors").is_file()
    assert list((workdir / "features").glob("*.npy"))
    assert sorted(p.name for p in (workdir / "shapes" / "images").iterdir()) == ["test", "train", "val"]

    def refuse(*args, **kwargs):
        raise AssertionError("the demo trained again")

    monkeypatch.setattr(demo, "build_default_model", refuse)
    assert cli.main(["demo", "--workdir", str(workdir)]) == 0  # the second run: straight to serving
    [(_, argv)] = no_exec
    assert argv[argv.index("--checkpoint") + 1] == str(workdir / "model.safetensors")


@pytest.mark.slow
def test_scst_epochs_0_trains_the_cross_entropy_model_only(small_recipe, tmp_path, no_exec):
    workdir = tmp_path / "work"
    argv = ["demo", "--no-serve", "--no-progress", "--workdir", str(workdir), "--epochs", "1", "--scst-epochs", "0"]
    assert cli.main(argv) == 0
    _, card = load_checkpoint(workdir / "model.safetensors")
    assert card["objective"] == "cross-entropy" and card["init_from"] is None
    assert not (workdir / "scst").exists()
