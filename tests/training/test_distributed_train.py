"""Training with two real gloo ranks on the CPU, as torchrun runs it: validation split across the
ranks equals one process's; a signal to one rank stops both at the same step with one consistent
resume state; early stopping stops both; a worker killed under `torchrun --max-restarts` is
restarted with the others, which resume by themselves and end with the weights of a run never
interrupted.

Real processes throughout (torchrun, or two Python processes with torchrun's environment), on the
tiny Shapes world and the tiny encoder; slow, as each start costs seconds.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from captioner.config import ModelConfig
from captioner.model import build_model
from captioner.vocab import Vocabulary
from tests.runtime.test_distributed import run_ranks
from tests.training.test_train import assert_same_run, history, last_state
from training.coco import load_split
from training.features import encode_images
from training.train import validation_scores

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
EPOCHS = 12  # of 3 steps: each rank trains on half of the 24 images, 4 per step
TRAINING = [
    "--epochs",
    str(EPOCHS),
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
    "--dropout",
    "0.2",
]


def torchrun(data: Path, out: Path, *flags: str, max_restarts: int = 0) -> list[str]:
    # standalone: a free port of its own
    return [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "2",
        "--max-restarts",
        str(max_restarts),
        "-m",
        "cli",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--cache-dir",
        str(out.parent / "features"),
        *TRAINING,
        *flags,
    ]


def environment(tmp: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CAPTIONER_HOME": str(tmp / "home")}


def worker_pid(torchrun_pid: int, rank: int) -> int:
    """The process id of the worker of `rank` that torchrun started (its child, with RANK set)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            variables = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == torchrun_pid and f"RANK={rank}".encode() in variables:
            return int(stat.parent.name)
    raise LookupError(f"no worker of rank {rank} under process {torchrun_pid}")


def wait_for_step(process: subprocess.Popen, out: Path, step: int) -> None:
    """Until OUT/last.pt holds a state of `step` or later (it is replaced whole, so reading is safe)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "last.pt").exists() and last_state(out)["step"] >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"no resume state of step {step}: {process.poll()}")


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def together(shapes_root, module_tmp) -> tuple[Path, subprocess.CompletedProcess]:
    """An uninterrupted run of two ranks: what the interrupted ones must equal."""
    out = module_tmp / "together"
    done = subprocess.run(
        torchrun(shapes_root, out), env=environment(module_tmp), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done


def test_two_ranks_train_validate_and_write_once(together):
    out, done = together
    assert last_state(out)["step"] == EPOCHS * 3
    assert [h["epoch"] for h in history(out)] == list(range(1, EPOCHS + 1))
    assert done.stdout.count("epoch 1:") == 1  # validation scores, logs and checkpoints: rank 0's
    assert len(last_state(out)["rng_ranks"]) == 2  # each rank's dropout generator, to resume exactly
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_validation_split_across_ranks_equals_one_process(together, shapes_root):
    """The scores the two ranks gave each epoch are what one process gives the same model."""
    out, _ = together
    state = last_state(out)
    model = build_model(ModelConfig.from_dict(state["model_config"]), Vocabulary.from_json(state["vocab"]))
    model.load_state_dict(state["model"])
    split = load_split(shapes_root, "val")
    alone = validation_scores(model, encode_images(model.encoder, split.image_paths, workers=0), split, 0, 1)
    assert alone["CIDEr"] > 0
    assert history(out)[-1] == {
        "epoch": EPOCHS,
        "loss": history(out)[-1]["loss"],
        **{f"val_{k}": round(v, 4) for k, v in alone.items()},
    }


SHARED_VALIDATION = """
import json
import torch
import training.train as train_module
from captioner.checkpoint import load_checkpoint
from runtime.distributed import Distributed, init_distributed
from training.coco import load_split
from training.features import encode_images

torch.set_num_threads(1)
dist, _ = init_distributed("cpu")
model, _ = load_checkpoint({checkpoint!r})
split = load_split({data!r}, "val")
features = encode_images(model.encoder, split.image_paths, workers=0)
decoded = []
real_decode = train_module.decode_features
def counting_decode(model, features, image_ids, *args):
    decoded.extend(image_ids)
    return real_decode(model, features, image_ids, *args)
train_module.decode_features = counting_decode
scores = {{}}
for beam in (1, 2):
    together = train_module.validation_scores(model, features, split, 0, beam, batch_size=3, dist=dist)
    alone = train_module.validation_scores(model, features, split, 0, beam, batch_size=3) if dist.is_main else {{}}
    scores[beam] = [together, alone]
dist.close()
print(json.dumps({{"scores": scores, "decoded": decoded}}))
"""


def test_validation_decodes_a_share_per_rank_and_scores_as_one_process(together, shapes_root):
    """8 images in batches of 3: rank 0 decodes batches 1 and 3, rank 1 batch 2; rank 0's scores are
    one process's, to the last bit, greedy and beam."""
    out, _ = together
    ranks = [
        json.loads(o)
        for o in run_ranks(SHARED_VALIDATION.format(checkpoint=str(out / "best.safetensors"), data=str(shapes_root)))
    ]
    ids = load_split(shapes_root, "val").image_ids
    assert ranks[0]["decoded"][:5] == ids[:3] + ids[6:] and ranks[1]["decoded"] == ids[3:6] * 2
    for beam in ("1", "2"):
        together_scores, alone = ranks[0]["scores"][beam]
        assert together_scores == alone and "CIDEr" in alone and "object_recall" in alone
        assert ranks[1]["scores"][beam] == [{}, {}]


def test_a_signal_to_one_rank_stops_both_at_one_step_and_resumes_exactly(together, shapes_root, tmp_path):
    out = tmp_path / "run"
    command, env = torchrun(shapes_root, out, "--checkpoint-every", "1"), environment(tmp_path)
    process = subprocess.Popen(command, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_step(process, out, 1)
        os.kill(worker_pid(process.pid, rank=1), signal.SIGINT)  # rank 1 only: rank 0 hears of it
        stdout, stderr = process.communicate(timeout=240)
    finally:
        process.kill()
    assert process.returncode == 0, stdout + stderr
    stops = sorted(re.findall(r"stopped by signal 2 after step (\d+) \(rank (\d) of 2\)", stdout))
    assert [rank for _, rank in stops] == ["0", "1"] and stops[0][0] == stops[1][0], stdout
    step = int(stops[0][0])
    assert 1 <= step < EPOCHS * 3
    assert last_state(out)["step"] == step  # rank 0 wrote the state of the step both stopped after

    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_run(together[0], out)


def test_a_worker_killed_is_restarted_and_the_run_ends_as_if_never_interrupted(together, shapes_root, tmp_path):
    """torchrun --max-restarts 1: rank 1 SIGKILLed after the resume state of step 4 is on disk; torchrun
    restarts both workers, which resume from OUT/last.pt without --resume."""
    out = tmp_path / "run"
    process = subprocess.Popen(
        torchrun(shapes_root, out, "--checkpoint-every", "2", max_restarts=1),
        env=environment(tmp_path),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_step(process, out, 4)
        os.kill(worker_pid(process.pid, rank=1), signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=400)
    finally:
        process.kill()
    assert process.returncode == 0, stdout + stderr
    resumed = re.findall(
        r"torchrun restarted the workers \(restart 1\): resuming from .*last\.pt at step (\d+)", stdout
    )
    assert len(resumed) == 1 and 4 <= int(resumed[0]) < EPOCHS * 3, stdout + stderr
    assert_same_run(together[0], out)


def test_early_stopping_stops_both_ranks(shapes_root, tmp_path):
    """With lr 0 no epoch beats the first: after patience 1, both ranks stop (or rank 1 would wait forever)."""
    out = tmp_path / "run"
    done = subprocess.run(
        torchrun(shapes_root, out, "--lr", "0", "--patience", "1"),
        env=environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("early stop") == 1
    assert [h["epoch"] for h in history(out)] == [1, 2]
    assert last_state(out)["step"] == 2 * 3


def test_bad_images_stop_every_rank_before_any_work(dirty_coco, tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        torchrun(dirty_coco.root, out), env=environment(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert done.returncode != 0
    assert done.stderr.count("captioner train: error: 2 of 24 images of split 'train' cannot be used:") == 1
    assert re.search(r"exitcode\s*: 2", done.stderr)  # torchrun's report of its workers
    assert not (tmp_path / "features").exists() and not (out / "last.pt").exists()
