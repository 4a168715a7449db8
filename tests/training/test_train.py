"""The training loop, run for real on a tiny Shapes world with the tiny (random) encoder.

A run on 24 images takes about a second, so these tests train: the loss falls,
a small set is learnt by heart, an interrupted run resumed equals one that never
stopped, every model option trains from the command line, and two processes
train together under torchrun.
"""

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
import training.train as train_module
from captioner.checkpoint import load_checkpoint, read_header
from captioner.config import ModelConfig
from captioner.decoding import DecodeOptions
from captioner.model import build_model
from captioner.vocab import Vocabulary, tokenize
from tests.training.conftest import small_model, train_config
from training.coco import load_split
from training.features import encode_images
from training.train import TrainConfig, caption_loss, lr_at, save_model, save_state, train

pytestmark = pytest.mark.usefixtures("one_thread")

BIN = Path(sys.executable).parent
# Dropout on, so an exact resume also needs the random number generator where it was.
RESUME_MODEL = small_model(dropout=0.2)


def resume_config(shapes_root: Path, out: Path, **overrides) -> TrainConfig:
    """2 epochs of 3 steps (24 images, 8 per step)."""
    return train_config(shapes_root, out, epochs=2, batch_size=8, **overrides)


def last_state(out: Path) -> dict:
    return torch.load(Path(out) / "last.pt", map_location="cpu", weights_only=True)


def history(out: Path) -> list[dict]:
    """history.json without the wall-clock seconds."""
    return [
        {k: v for k, v in h.items() if k != "seconds"} for h in json.loads((Path(out) / "history.json").read_text())
    ]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical weights and optimizer moments, and the same history."""
    sa, sb = last_state(a), last_state(b)
    assert_same_tensors(sa["model"], sb["model"])
    moments = lambda s: {f"{i}.{k}": v for i, st in s["optimizer"]["state"].items() for k, v in st.items()}
    assert_same_tensors(moments(sa), moments(sb))
    assert (sa["epoch"], sa["batch"], sa["step"]) == (sb["epoch"], sb["batch"], sb["step"])
    assert history(a) == history(b)
    assert_same_tensors(
        load_checkpoint(a / "best.safetensors")[0].state_dict(), load_checkpoint(b / "best.safetensors")[0].state_dict()
    )


def initial_model(shapes_root: Path, config, seed: int = 0):
    """The model a run starts from: the same seed, the same vocabulary."""
    split = load_split(shapes_root, "train")
    torch.manual_seed(seed)
    return build_model(config, Vocabulary.build(c for cs in split.captions for c in cs))


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def learning_run(shapes_root, module_tmp):
    """6 epochs on the 24 train images (18 steps), validated on the 8 val images."""
    out = module_tmp / "learning"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAPTIONER_HOME", str(module_tmp / "home"))
        train(train_config(shapes_root, out, epochs=6, lr=0.02), small_model(dropout=0.1))
    return out


@pytest.fixture(scope="module")
def uninterrupted(shapes_root, module_tmp):
    """The run every resumed run must equal."""
    out = module_tmp / "uninterrupted"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAPTIONER_HOME", str(module_tmp / "home"))
        train(resume_config(shapes_root, out), RESUME_MODEL)
    return out


# ---------------------------------------------------------------- pieces


def test_lr_warms_up_linearly_then_decays_by_cosine_to_a_tenth():
    config = TrainConfig(lr=1.0, warmup_steps=4)
    assert [lr_at(s, 104, config) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, 104, config) == pytest.approx(1.0)
    assert lr_at(54, 104, config) == pytest.approx(0.55)
    assert lr_at(104, 104, config) == pytest.approx(0.1)
    decay = [lr_at(s, 104, config) for s in range(4, 105)]
    assert all(a >= b for a, b in itertools.pairwise(decay))


def test_caption_loss_ignores_padding_and_adds_the_attention_regulariser():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)  # (N, T-1, V)
    captions = torch.tensor([[1, 4, 5, 2], [1, 6, 2, 0]])  # the second caption is padded
    alphas = torch.softmax(torch.randn(2, 3, 4), dim=2)  # (N, T-1, P)
    loss, ce = caption_loss(logits, alphas, captions, alpha_c=0.5)
    targets = [(0, 0, 4), (0, 1, 5), (0, 2, 2), (1, 0, 6), (1, 1, 2)]
    expected_ce = -torch.stack([logits[n, t].log_softmax(0)[w] for n, t, w in targets]).mean()
    assert ce.item() == pytest.approx(expected_ce.item(), rel=1e-5)
    coverage = torch.stack([alphas[0].sum(0), alphas[1, :2].sum(0)])  # the padded step looks nowhere
    assert loss.item() == pytest.approx(expected_ce.item() + 0.5 * ((1 - coverage) ** 2).mean().item(), rel=1e-5)
    assert caption_loss(logits, None, captions, 0.5)[0].item() == pytest.approx(expected_ce.item(), rel=1e-5)


def test_word_dropout_hides_words_read_never_the_start_the_end_or_padding():
    torch.manual_seed(0)
    captions = torch.randint(4, 50, (400, 12))  # (N, T) words
    captions[:, 0], captions[:, 9], captions[:, 10:] = Vocabulary.start_id, Vocabulary.end_id, Vocabulary.pad_id
    read = train_module.drop_words(captions, 0.25)
    dropped = read != captions
    assert (read[dropped] == Vocabulary.unk_id).all()
    assert not dropped[:, [0, 9, 10, 11]].any()  # <start>, <end> and padding stay as they are
    assert dropped[:, 1:9].float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert torch.equal(train_module.drop_words(captions, 0.0), captions)


def test_word_dropout_leaves_the_targets_whole(shapes_root, tmp_path, monkeypatch):
    """The decoder reads the dropped words, the loss is taken against the captions as they are."""
    seen = []
    monkeypatch.setattr(train_module, "caption_loss", lambda *a: seen.append(a[2]) or caption_loss(*a))
    read = []
    config = train_config(shapes_root, tmp_path / "run", epochs=1, word_dropout=0.5)
    run = train_module.setup(config, small_model())
    run.model.decoder.register_forward_pre_hook(lambda _, args: read.append(args[1].clone()))  # (N, T) read
    batch = next(iter(run.batches.epoch(0, 0)))
    inputs = torch.stack([run.images[i] for i in batch.indices])
    train_module.train_step(run, inputs, batch.captions)
    assert torch.equal(seen[0], batch.captions)
    assert (read[0] == Vocabulary.unk_id).any() and (read[0] != batch.captions).any()


def test_save_state_leaves_the_previous_state_if_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_state(path, {"step": 1, "weights": torch.ones(3)})

    def crash(state, f):  # save_state hands torch.save an open file
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(train_module.torch, "save", crash)
    with pytest.raises(OSError):
        save_state(path, {"step": 2, "weights": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1


def test_save_model_replaces_the_file_whole_and_leaves_no_temporary(tiny_model, tmp_path):
    path = tmp_path / "deep" / "er" / "model.safetensors"
    save_model(tiny_model, path, {"v": 1})
    save_model(tiny_model, path, {"v": 2})
    _, card = load_checkpoint(path)
    assert card == {"v": 2}
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]


def test_a_saved_model_is_readable_by_other_users(tiny_model, tmp_path):
    """A server in a container (a non-root user) reads the model the demo saved."""
    path = tmp_path / "model.safetensors"
    save_model(tiny_model, path, {})
    assert path.stat().st_mode & 0o044 == 0o044


# ---------------------------------------------------------------- it learns


def test_a_tiny_run_learns(learning_run):
    runs = history(learning_run)
    assert [h["epoch"] for h in runs] == [1, 2, 3, 4, 5, 6]
    losses = [h["loss"] for h in runs]
    assert losses[0] > 2.5  # about the log of a 30-odd word vocabulary: nothing learnt yet
    assert losses[-1] < 0.65 * losses[0]
    assert losses[-1] < min(losses[:3])
    cider = [h["val_CIDEr"] for h in runs]
    assert all(0.0 <= c <= 10.0 for c in cider)
    assert max(cider[1:]) > cider[0] + 0.1  # decoding unseen images improves too
    assert "val_object_recall" in runs[0]  # the Shapes world's truth metrics, from its instances file


def test_it_learns_a_small_set_by_heart(shapes_root, tmp_path):
    """4 images, one caption each, validated on themselves: greedy decoding gives back every caption."""
    config = train_config(
        shapes_root,
        tmp_path / "run",
        train_split="one",
        val_split="one",
        epochs=40,
        batch_size=4,
        captions_per_image=1,
        lr=0.02,
        alpha_c=0.0,
    )
    best = train(config, small_model(region_dim=64))
    losses = [h["loss"] for h in history(tmp_path / "run")]
    assert losses[-1] < 0.1 < 2.0 < losses[0]

    model, card = load_checkpoint(best)
    split = load_split(shapes_root, "one")
    features = torch.from_numpy(encode_images(model.encoder, split.image_paths, workers=0).astype(np.float32))
    decoded = [
        " ".join(model.vocab.words[i] for i in hyps[0].token_ids)
        # as learned: "a yellow diamond and a red diamond and a green triangle" says "diamond and a"
        # twice, which the applications' default trigram blocking would forbid
        for hyps in model.caption_features(features, DecodeOptions(method="greedy", no_repeat_ngram_size=0))
    ]
    assert decoded == [" ".join(tokenize(refs[0])) for refs in split.captions]
    assert card["scores"]["val_CIDEr"] == pytest.approx(10.0)  # CIDEr's ceiling: every caption exact


def test_the_same_seed_gives_the_same_run_and_another_seed_another(shapes_root, uninterrupted, tmp_path):
    again = tmp_path / "again"
    train(resume_config(shapes_root, again), RESUME_MODEL)
    assert_same_run(uninterrupted, again)
    other = tmp_path / "other"
    train(resume_config(shapes_root, other, seed=1), RESUME_MODEL)
    assert not torch.equal(
        last_state(other)["model"]["decoder.out.weight"], last_state(uninterrupted)["model"]["decoder.out.weight"]
    )


# ---------------------------------------------------------------- files


def test_checkpoints_are_whole_files_with_a_model_card(learning_run):
    assert not [p for p in learning_run.rglob("*") if p.name.endswith(".tmp")]
    model, card = load_checkpoint(learning_run / "best.safetensors")
    runs = history(learning_run)
    best_epoch = max(runs, key=lambda h: h["val_CIDEr"])  # the first epoch with the best score
    assert card["epoch"] == best_epoch["epoch"]
    assert card["scores"]["val_CIDEr"] == best_epoch["val_CIDEr"]
    assert card["training_data"]["train_images"] == 24
    assert card["train_config"]["epochs"] == 6
    assert model.config == small_model(dropout=0.1)
    state = last_state(learning_run)
    assert (state["epoch"], state["batch"], state["step"]) == (6, 0, 18)


def test_tensorboard_gets_training_and_validation_scalars(learning_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [events] = list((learning_run / "tensorboard").glob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/cross_entropy", "train/grad_norm", "train/lr", "val/CIDEr"} <= tags
    assert [e.step for e in accumulator.Scalars("val/CIDEr")] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in accumulator.Scalars("val/CIDEr")] == pytest.approx(
        [h["val_CIDEr"] for h in history(learning_run)], abs=1e-4
    )


def test_later_runs_reuse_the_feature_cache(shapes_root, tmp_path, monkeypatch):
    cache = tmp_path / "features"
    train(train_config(shapes_root, tmp_path / "first", epochs=1, cache_dir=str(cache)), small_model())
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npy")}
    assert len(stamps) == 2  # train and val

    def no_encoding(*args, **kwargs):
        raise AssertionError("the encoder ran again")

    monkeypatch.setattr("training.features._encode_into", no_encoding)
    train(train_config(shapes_root, tmp_path / "second", epochs=1, cache_dir=str(cache)), small_model())
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npy")} == stamps


def test_progress_bars_show_the_cache_build_and_each_epoch(shapes_root, tmp_path, capsys):
    train(train_config(shapes_root, tmp_path / "run", epochs=2, progress=True), small_model())
    err = capsys.readouterr().err
    assert "features tiny-train" in err and "features tiny-val" in err
    assert "epoch 1/2" in err and "epoch 2/2" in err and "loss=" in err


def test_without_a_cache_dir_features_go_to_captioner_home(shapes_root, tmp_path):
    train(train_config(shapes_root, tmp_path / "run", epochs=1, cache_dir=""), small_model())
    assert len(list((Path(os.environ["CAPTIONER_HOME"]) / "features").glob("*.npy"))) == 2


# ---------------------------------------------------------------- early stopping


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping_after_patience_epochs_without_a_better_cider(shapes_root, tmp_path, patience, capsys):
    """With lr = 0 the model never changes: the first epoch beats -1, no later one beats it."""
    out = tmp_path / "run"
    train(train_config(shapes_root, out, epochs=5, lr=0.0, patience=patience), small_model())
    runs = history(out)
    assert [h["epoch"] for h in runs] == list(range(1, patience + 2))
    assert len({h["val_CIDEr"] for h in runs}) == 1
    assert read_header(out / "best.safetensors")[2]["epoch"] == 1
    assert "early stop" in capsys.readouterr().out


def test_resuming_an_early_stopped_run_trains_no_further(shapes_root, tmp_path):
    out = tmp_path / "run"
    config = train_config(shapes_root, out, epochs=5, lr=0.0, patience=1)
    train(config, small_model())
    before = last_state(out)
    train(TrainConfig(**{**config.model_dump(), "resume": True}), small_model())
    assert [h["epoch"] for h in history(out)] == [1, 2]
    assert last_state(out)["step"] == before["step"]


def test_mixed_precision_on_cpu_trains(shapes_root, tmp_path):
    """--amp on a CPU autocasts to bfloat16 (no gradient scaler): it still learns."""
    out = tmp_path / "run"
    train(train_config(shapes_root, out, epochs=4, amp=True), small_model())
    losses = [h["loss"] for h in history(out)]
    assert all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0]
    assert all(v.dtype == torch.float32 for v in last_state(out)["model"].values() if v.is_floating_point())


# ---------------------------------------------------------------- resume


def test_resume_after_a_crash_between_epochs_equals_an_uninterrupted_run(
    shapes_root, uninterrupted, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    validations = []

    def crash_in_second_validation(*args, **kwargs):
        validations.append(1)
        if len(validations) == 2:
            raise RuntimeError("power cut")
        return real_validate(*args, **kwargs)

    real_validate = train_module.validation_scores
    monkeypatch.setattr(train_module, "validation_scores", crash_in_second_validation)
    with pytest.raises(RuntimeError, match="power cut"):
        train(resume_config(shapes_root, out), RESUME_MODEL)
    monkeypatch.setattr(train_module, "validation_scores", real_validate)
    assert (last_state(out)["epoch"], last_state(out)["batch"]) == (1, 0)  # epoch 2's steps were lost

    train(resume_config(shapes_root, out, resume=True), RESUME_MODEL)
    assert_same_run(uninterrupted, out)


def stop_at_step(monkeypatch, step: int, how: str) -> None:
    """During training step `step` (from 1), SIGINT this process, or crash."""
    calls = []
    real_loss = train_module.caption_loss

    def loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            if how == "signal":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise RuntimeError("power cut")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "caption_loss", loss)


@pytest.mark.parametrize("step", [2, 3, 4])  # mid epoch 1, its last step, mid epoch 2
def test_resume_after_sigint_mid_epoch_equals_an_uninterrupted_run(
    shapes_root, uninterrupted, tmp_path, monkeypatch, step, capsys
):
    out = tmp_path / "run"
    stop_at_step(monkeypatch, step, "signal")
    train(resume_config(shapes_root, out), RESUME_MODEL)
    monkeypatch.undo()
    assert "stopped by signal" in capsys.readouterr().out
    state = last_state(out)
    assert (state["epoch"], state["batch"], state["step"]) == ((step - 1) // 3, (step - 1) % 3 + 1, step)

    train(resume_config(shapes_root, out, resume=True), RESUME_MODEL)
    assert_same_run(uninterrupted, out)


def test_sigint_handlers_are_restored_after_training(shapes_root, tmp_path):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    train(train_config(shapes_root, tmp_path / "run", epochs=1), small_model())
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.parametrize("crash,saved", [(3, (0, 2, 2)), (5, (1, 1, 4))])
def test_resume_from_a_periodic_checkpoint_after_a_crash_equals_an_uninterrupted_run(
    shapes_root, uninterrupted, tmp_path, monkeypatch, crash, saved
):
    out = tmp_path / "run"
    stop_at_step(monkeypatch, crash, "crash")  # checkpoint_every=2 saved the state of the step before
    with pytest.raises(RuntimeError, match="power cut"):
        train(resume_config(shapes_root, out, checkpoint_every=2), RESUME_MODEL)
    monkeypatch.undo()
    state = last_state(out)
    assert (state["epoch"], state["batch"], state["step"]) == saved

    train(resume_config(shapes_root, out, resume=True, checkpoint_every=2), RESUME_MODEL)
    assert_same_run(uninterrupted, out)


def test_saving_the_resume_state_changes_nothing(shapes_root, uninterrupted, tmp_path):
    """checkpoint_every only writes files (the demo's recipe keeps its results whatever it is)."""
    out = tmp_path / "run"
    train(resume_config(shapes_root, out, checkpoint_every=1), RESUME_MODEL)
    assert_same_run(uninterrupted, out)


def test_the_default_checkpoint_interval_suits_coco_sized_epochs():
    assert TrainConfig().checkpoint_every == 1000


def crash_in_step_5(shapes_root: Path, out: Path, monkeypatch, job: str) -> None:
    """A run of torchrun job `job` that saved its state at step 4, mid epoch 2 (checkpoint_every=2), and
    crashed in step 5."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", job)
    stop_at_step(monkeypatch, 5, "crash")
    with pytest.raises(RuntimeError, match="power cut"):
        train(resume_config(shapes_root, out, checkpoint_every=2), RESUME_MODEL)
    monkeypatch.undo()
    assert last_state(out)["step"] == 4


def test_a_torchrun_restart_resumes_by_itself(shapes_root, uninterrupted, tmp_path, monkeypatch, capsys):
    """Workers torchrun restarted (TORCHELASTIC_RESTART_COUNT > 0) go on from OUT/last.pt without --resume."""
    out = tmp_path / "run"
    crash_in_step_5(shapes_root, out, monkeypatch, "job-1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    train(resume_config(shapes_root, out, checkpoint_every=2), RESUME_MODEL)
    assert (
        f"torchrun restarted the workers (restart 1): resuming from {out / 'last.pt'} at step 4"
        in capsys.readouterr().out
    )
    assert_same_run(uninterrupted, out)


def test_a_torchrun_restart_does_not_resume_another_jobs_state(
    shapes_root, uninterrupted, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    crash_in_step_5(shapes_root, out, monkeypatch, "job-1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    train(resume_config(shapes_root, out), RESUME_MODEL)
    assert f"{out / 'last.pt'} is an earlier run's: starting afresh" in capsys.readouterr().out
    assert_same_run(uninterrupted, out)


def test_resume_keeps_the_runs_model_settings_and_vocabulary(shapes_root, uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    stop_at_step(monkeypatch, 2, "signal")
    train(resume_config(shapes_root, out), RESUME_MODEL)
    monkeypatch.undo()
    train(resume_config(shapes_root, out, resume=True, min_word_count=1000), small_model(hidden_dim=16))
    assert_same_run(uninterrupted, out)


def test_resume_without_a_saved_state_starts_afresh(shapes_root, uninterrupted, tmp_path, capsys):
    out = tmp_path / "run"
    train(resume_config(shapes_root, out, resume=True), RESUME_MODEL)
    assert "starting afresh" in capsys.readouterr().out
    assert_same_run(uninterrupted, out)


def test_resume_of_a_finished_run_changes_nothing(shapes_root, tmp_path):
    out = tmp_path / "run"
    train(resume_config(shapes_root, out), RESUME_MODEL)
    before = last_state(out)
    train(resume_config(shapes_root, out, resume=True), RESUME_MODEL)
    assert_same_tensors(before["model"], last_state(out)["model"])
    assert len(history(out)) == 2


@pytest.mark.slow
def test_captioner_train_stopped_by_sigint_resumes_to_the_uninterrupted_result(shapes_root, tmp_path):
    """The real thing: `captioner train` in its own process, SIGINT once its first checkpoint is on disk."""
    args = [
        "--data",
        str(shapes_root),
        "--out",
        str(tmp_path / "run"),
        "--epochs",
        "12",
        "--batch-size",
        "4",
        "--lr",
        "0.01",
        "--warmup-steps",
        "0",
        "--patience",
        "100",
        "--threads",
        "1",
        "--workers",
        "0",
        "--no-progress",
        "--cache-dir",
        str(tmp_path / "features"),
        "--checkpoint-every",
        "1",
        "--encoder",
        "tiny",
        "--embed-dim",
        "32",
        "--region-dim",
        "32",
        "--hidden-dim",
        "64",
        "--attention-dim",
        "32",
        "--dropout",
        "0.2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [str(BIN / "captioner"), "train", *args], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "last.pt").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert "stopped by signal" in stdout
    total = 12 * 6
    assert 1 <= last_state(tmp_path / "run")["step"] < total

    assert cli.main(["train", *args, "--resume"]) == 0
    reference = tmp_path / "reference"
    cli.main(["train", *[str(reference) if a == str(tmp_path / "run") else a for a in args]])
    assert last_state(tmp_path / "run")["step"] == total
    assert_same_run(reference, tmp_path / "run")


# ---------------------------------------------------------------- every option from the command line


@pytest.mark.parametrize(
    "model_flags,expected",
    [
        (["--no-attention", "--cell", "gru", "--num-layers", "2"], dict(attention=False, cell="gru", num_layers=2)),
        (
            ["--cell", "rnn", "--init-state", "learned", "--no-positional", "--no-word-in-query", "--dropout", "0.25"],
            dict(cell="rnn", init_state="learned", positional=False, word_in_query=False, dropout=0.25),
        ),
        (
            ["--cell", "lstm", "--num-layers", "3", "--init-state", "mean", "--val-beam-size", "2"],
            dict(cell="lstm", num_layers=3, init_state="mean"),
        ),
    ],
)
def test_every_model_option_is_a_train_flag(shapes_root, tmp_path, model_flags, expected):
    out = tmp_path / "run"
    sizes = [
        "--encoder",
        "tiny",
        "--embed-dim",
        "12",
        "--region-dim",
        "20",
        "--hidden-dim",
        "24",
        "--attention-dim",
        "8",
    ]
    training = [
        "--epochs",
        "1",
        "--batch-size",
        "6",
        "--captions-per-image",
        "2",
        "--lr",
        "0.003",
        "--alpha-c",
        "0.5",
        "--grad-clip",
        "1.5",
        "--max-words",
        "9",
        "--val-limit",
        "5",
        "--seed",
        "3",
        "--threads",
        "1",
        "--workers",
        "0",
        "--no-progress",
        "--cache-dir",
        str(tmp_path / "features"),
    ]
    assert cli.main(["train", "--data", str(shapes_root), "--out", str(out), *sizes, *training, *model_flags]) == 0

    config, _vocab, card = read_header(out / "best.safetensors")
    defaults = ModelConfig(encoder="tiny", embed_dim=12, region_dim=20, hidden_dim=24, attention_dim=8)
    assert config.model_dump() == {**defaults.model_dump(), **expected}
    used = card["train_config"]
    assert (
        used["batch_size"],
        used["captions_per_image"],
        used["lr"],
        used["alpha_c"],
        used["grad_clip"],
        used["max_words"],
        used["val_limit"],
        used["seed"],
    ) == (6, 2, 0.003, 0.5, 1.5, 9, 5, 3)
    assert last_state(out)["step"] == 4  # 24 images, 6 per step
    model, _ = load_checkpoint(out / "best.safetensors")
    assert len(model.decoder.cells) == config.num_layers
    assert (
        type(model.decoder.cells[0]).__name__ == {"lstm": "LSTMCell", "gru": "GRUCell", "rnn": "RNNCell"}[config.cell]
    )


def test_train_without_data_says_so(tmp_path, capsys):
    assert cli.main(["train", "--out", str(tmp_path / "run")]) == 2
    assert "captioner train: error: --data" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flag,value", [("--batch-size", "0"), ("--lr", "fast"), ("--val-beam-size", "99"), ("--dropout", "1.5")]
)
def test_a_refused_flag_value_is_a_usage_error_naming_the_flag(shapes_root, tmp_path, capsys, flag, value):
    assert cli.main(["train", "--data", str(shapes_root), "--out", str(tmp_path / "run"), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"captioner train: error: {flag}: ") and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_a_gpu_this_machine_lacks_is_refused_before_any_work(shapes_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(shapes_root), "--out", str(out), "--device", "cuda"]) == 2
    assert "captioner train: error: device cuda: no CUDA GPU is available here" in capsys.readouterr().err
    assert not out.exists()


def test_help_shows_every_setting_with_its_default(capsys):
    from runtime.flags import flag

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for config in (TrainConfig(), ModelConfig()):
        for name, field in type(config).model_fields.items():
            default = getattr(config, name)
            shown = "none" if default == "" else str(default).lower() if isinstance(default, bool) else str(default)
            assert flag(name) in text
            assert f"{' '.join(field.description.split())} (default: {shown})" in text, name
    assert "--batch-size BATCH_SIZE images per step" in text and "--resume, --no-resume" in text


# ---------------------------------------------------------------- fine-tuning


def test_fine_tuning_trains_the_encoders_last_blocks_only(shapes_root, tmp_path):
    config = train_config(shapes_root, tmp_path / "run", epochs=1, fine_tune_blocks=1)
    train(config, small_model())
    start = initial_model(shapes_root, small_model()).state_dict()
    end = last_state(tmp_path / "run")["model"]
    encoder = sorted(k for k in start if k.startswith("encoder."))
    changed = [k for k in encoder if not torch.equal(start[k], end[k])]
    assert changed == ["encoder.body.4.bias", "encoder.body.4.weight"]  # the last convolution
    assert not torch.equal(start["decoder.out.weight"], end["decoder.out.weight"])
    assert not list((tmp_path / "features").glob("*.npy"))  # pixels in, no feature cache
    assert read_header(tmp_path / "run" / "best.safetensors")[2]["scores"]["val_CIDEr"] >= 0.0


@pytest.mark.slow
def test_fine_tuning_keeps_the_frozen_blocks_batchnorm_statistics(shapes_root, tmp_path):
    """EfficientNet-Lite0 (real pretrained weights, from its pip package): the frozen blocks are the
    pretrained ones, running statistics included."""
    model_config = small_model(encoder="efficientnet_lite0")
    config = train_config(
        shapes_root,
        tmp_path / "run",
        train_split="one",
        val_split="one",
        epochs=1,
        batch_size=4,
        captions_per_image=1,
        fine_tune_blocks=1,
    )
    train(config, model_config)
    torch.manual_seed(0)
    start = build_model(model_config, Vocabulary.build(["a"])).encoder.state_dict()
    end = {
        k.removeprefix("encoder."): v
        for k, v in last_state(tmp_path / "run")["model"].items()
        if k.startswith("encoder.")
    }
    changed = {k.split(".")[1] for k in start if not torch.equal(start[k], end[k])}
    assert changed <= {"conv_head", "bn2"}  # the tail: head convolution and its norm
    assert changed


# ---------------------------------------------------------------- torchrun


@pytest.mark.slow
def test_two_processes_train_together_under_torchrun(shapes_root, tmp_path):
    out = tmp_path / "run"
    command = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "2",  # standalone: a free port of its own
        "-m",
        "cli",
        "train",
        "--data",
        str(shapes_root),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--warmup-steps",
        "0",
        "--threads",
        "1",
        "--workers",
        "0",
        "--no-progress",
        "--cache-dir",
        str(tmp_path / "features"),
        "--encoder",
        "tiny",
        "--embed-dim",
        "16",
        "--region-dim",
        "16",
        "--hidden-dim",
        "32",
        "--attention-dim",
        "16",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CAPTIONER_HOME": str(tmp_path / "home")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    _model, card = load_checkpoint(out / "best.safetensors")
    assert card["epoch"] in (1, 2)
    state = last_state(out)
    assert state["step"] == 2 * 3  # each rank: half of the 24 images, 4 per step
    assert len(history(out)) == 2
    assert done.stdout.count("epoch 1:") == 1  # validation, logs and checkpoints: rank 0 only
    assert len(list((tmp_path / "features").glob("*.npy"))) == 2  # one cache, built by rank 0
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
