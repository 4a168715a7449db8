"""`captioner train --scst`: self-critical sequence training from a cross-entropy checkpoint, run for
real on the tiny Shapes world (training.scst's own tests check the loss itself).

A cross-entropy run trains briefly; SCST runs continue from its best.safetensors, write
checkpoints whose card says where they came from, resume bit for bit, and refuse what
they do not support before doing any work.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
import training.train as train_module
from captioner.checkpoint import load_checkpoint, read_header
from tests.training.conftest import small_model, train_config
from tests.training.test_train import assert_same_run, assert_same_tensors, history, last_state
from training.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

BIN = Path(sys.executable).parent
CE_MODEL = small_model(dropout=0.2)  # dropout on in cross-entropy training; SCST turns it off


def scst_config(shapes_root: Path, out: Path, init_from: Path, **overrides) -> TrainConfig:
    """2 epochs of 3 steps (24 images, 8 per step), 3 samples per image."""
    return train_config(
        shapes_root, out, **{"scst": True, "init_from": str(init_from), "scst_samples": 3, "lr": 0.005, **overrides}
    )


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("scst-runs")


@pytest.fixture(scope="module")
def ce_checkpoint(shapes_root, module_tmp) -> Path:
    """A brief cross-entropy run's best.safetensors."""
    out = module_tmp / "ce"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAPTIONER_HOME", str(module_tmp / "home"))
        return train(train_config(shapes_root, out, epochs=4, lr=0.02), CE_MODEL)


@pytest.fixture(scope="module")
def scst_run(shapes_root, module_tmp, ce_checkpoint) -> Path:
    """The SCST run every resumed one must equal; its model flags differ from the checkpoint's, and lose."""
    out = module_tmp / "scst"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAPTIONER_HOME", str(module_tmp / "home"))
        train(scst_config(shapes_root, out, ce_checkpoint), small_model(hidden_dim=16))
    return out


def stop_at_step(monkeypatch, step: int, how: str) -> None:
    """During SCST step `step` (from 1), SIGINT this process, or crash."""
    calls = []
    real_loss = train_module.scst_loss

    def loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            if how == "signal":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise RuntimeError("power cut")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "scst_loss", loss)


# ---------------------------------------------------------------- a run


def test_an_scst_run_continues_from_the_checkpoint_and_its_card_says_so(scst_run, ce_checkpoint):
    model, card = load_checkpoint(scst_run / "best.safetensors")
    start, start_card = load_checkpoint(ce_checkpoint)
    assert card["objective"] == "SCST" and start_card["objective"] == "cross-entropy"
    assert card["init_from"] == {
        "checkpoint": str(ce_checkpoint.resolve()),
        "objective": "cross-entropy",
        "epoch": start_card["epoch"],
        "scores": start_card["scores"],
    }
    assert card["train_config"]["scst"] and card["train_config"]["init_from"] == str(ce_checkpoint)
    assert model.config == start.config == CE_MODEL  # the checkpoint's settings, not the flags'
    assert model.vocab.words == start.vocab.words
    assert [h["epoch"] for h in history(scst_run)] == [1, 2]
    assert all(0.0 <= h["val_CIDEr"] <= 10.0 for h in history(scst_run))

    end = last_state(scst_run)["model"]
    begin = start.state_dict()
    assert all(torch.equal(begin[k], end[k]) for k in begin if k.startswith("encoder."))  # cached features
    assert not torch.equal(begin["decoder.out.weight"], end["decoder.out.weight"])


def test_scst_logs_its_rewards(shapes_root, ce_checkpoint, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"  # 12 steps: logged at step 10
    train(scst_config(shapes_root, out, ce_checkpoint, epochs=1, batch_size=2, scst_samples=2), small_model())
    [events] = list((out / "tensorboard").glob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"scst/sample_reward", "scst/greedy_reward", "train/loss", "val/CIDEr"} <= tags
    assert "train/cross_entropy" not in tags


def test_the_decoder_samples_and_learns_with_dropout_off(shapes_root, ce_checkpoint, tmp_path, monkeypatch):
    modes = []
    real_loss = train_module.scst_loss

    def loss(decoder, *args, **kwargs):
        modes.append((decoder.training, kwargs["learner"].training))
        return real_loss(decoder, *args, **kwargs)

    monkeypatch.setattr(train_module, "scst_loss", loss)
    train(scst_config(shapes_root, tmp_path / "run", ce_checkpoint, epochs=1), small_model())
    assert modes == [(False, False)] * 3


@pytest.mark.parametrize("scst", [False, True])
def test_init_from_starts_from_the_checkpoints_weights(shapes_root, ce_checkpoint, tmp_path, scst):
    """With lr = 0 nothing moves: the run's model is the checkpoint's (cross-entropy or SCST alike)."""
    out = tmp_path / "run"
    train(
        train_config(shapes_root, out, epochs=1, lr=0.0, scst=scst, init_from=str(ce_checkpoint), scst_samples=2),
        small_model(),
    )
    assert_same_tensors(load_checkpoint(ce_checkpoint)[0].state_dict(), last_state(out)["model"])
    assert read_header(out / "best.safetensors")[2]["objective"] == ("SCST" if scst else "cross-entropy")


# ---------------------------------------------------------------- resumed


@pytest.mark.parametrize("step", [2, 4])  # mid epoch 1, mid epoch 2
def test_an_scst_run_resumed_after_sigint_equals_an_uninterrupted_one(
    shapes_root, ce_checkpoint, scst_run, tmp_path, monkeypatch, step, capsys
):
    out = tmp_path / "run"
    stop_at_step(monkeypatch, step, "signal")
    train(scst_config(shapes_root, out, ce_checkpoint), small_model())
    monkeypatch.undo()
    assert "stopped by signal" in capsys.readouterr().out
    assert last_state(out)["step"] == step
    train(scst_config(shapes_root, out, ce_checkpoint, resume=True), small_model())
    assert_same_run(scst_run, out)


def test_an_scst_run_resumed_after_a_crash_equals_an_uninterrupted_one(
    shapes_root, ce_checkpoint, scst_run, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    stop_at_step(monkeypatch, 5, "crash")  # checkpoint_every=2 saved the state after step 4
    with pytest.raises(RuntimeError, match="power cut"):
        train(scst_config(shapes_root, out, ce_checkpoint, checkpoint_every=2), small_model())
    monkeypatch.undo()
    assert last_state(out)["step"] == 4
    train(scst_config(shapes_root, out, ce_checkpoint, checkpoint_every=2, resume=True), small_model())
    assert_same_run(scst_run, out)


# ---------------------------------------------------------------- refused


def cli_args(shapes_root: Path, out: Path, *flags: str) -> list[str]:
    return [
        "train",
        "--data",
        str(shapes_root),
        "--out",
        str(out),
        "--threads",
        "1",
        "--workers",
        "0",
        "--no-progress",
        *flags,
    ]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--scst"], "--scst needs --init-from: the cross-entropy checkpoint to fine-tune"),
        (["--scst", "--init-from", "{missing}"], "--init-from: no checkpoint at {missing}"),
        (["--init-from", "{missing}"], "--init-from: no checkpoint at {missing}"),
        (["--init-from", "{not_a_checkpoint}"], "--init-from: {not_a_checkpoint} is not a safetensors checkpoint"),
        (
            ["--scst", "--init-from", "{ce}", "--fine-tune-blocks", "1"],
            "--scst trains on cached features only: --fine-tune-blocks is not supported with it",
        ),
    ],
)
def test_what_scst_cannot_do_is_a_usage_error_before_any_work(
    shapes_root, ce_checkpoint, tmp_path, capsys, flags, message
):
    paths = {
        "missing": str(tmp_path / "nowhere" / "best.safetensors"),
        "ce": str(ce_checkpoint),
        "not_a_checkpoint": str(tmp_path / "notes.txt"),
    }
    (tmp_path / "notes.txt").write_text("not weights")
    out = tmp_path / "run"
    assert cli.main(cli_args(shapes_root, out, *(f.format(**paths) for f in flags))) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"captioner train: error: {message.format(**paths)}") and "Traceback" not in err
    assert not out.exists()


def test_scst_from_the_command_line(shapes_root, ce_checkpoint, tmp_path):
    out = tmp_path / "run"
    flags = [
        "--scst",
        "--init-from",
        str(ce_checkpoint),
        "--scst-samples",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "12",
        "--lr",
        "0.001",
        "--cache-dir",
        str(tmp_path / "features"),
    ]
    assert cli.main(cli_args(shapes_root, out, *flags)) == 0
    card = read_header(out / "best.safetensors")[2]
    assert card["objective"] == "SCST" and card["train_config"]["scst_samples"] == 2
    assert last_state(out)["step"] == 2


# ---------------------------------------------------------------- torchrun


@pytest.mark.slow
def test_two_processes_run_scst_together_under_torchrun(shapes_root, ce_checkpoint, tmp_path):
    out = tmp_path / "run"
    command = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "cli",
        *cli_args(
            shapes_root,
            out,
            "--scst",
            "--init-from",
            str(ce_checkpoint),
            "--scst-samples",
            "2",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--warmup-steps",
            "0",
            "--cache-dir",
            str(tmp_path / "features"),
        ),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CAPTIONER_HOME": str(tmp_path / "home")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert last_state(out)["step"] == 2 * 3  # each rank: half of the 24 images, 4 per step
    assert len(history(out)) == 2
    assert read_header(out / "best.safetensors")[2]["objective"] == "SCST"
