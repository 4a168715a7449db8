"""Shared fixtures: a real (tiny, random) model and checkpoint that build in well under a second;
what the tests of real processes ask of /proc; and a file-size limit that makes a write fail
part-way, as a full disk does, without privileges."""

import resource
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from captioner.checkpoint import save_checkpoint
from captioner.config import ModelConfig
from captioner.model import build_model
from captioner.vocab import Vocabulary

TINY_CAPTIONS = [
    "a red circle above a blue square",
    "a big green triangle on a dark background",
    "there is a small yellow diamond",
    "two shapes a purple circle and a white square",
]


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(encoder="tiny", embed_dim=16, region_dim=24, hidden_dim=32, attention_dim=16, dropout=0.0)
    return ModelConfig(**{**fields, **overrides})


def talkative_tiny_model():
    """A random tiny model that says words before <end>: captions with tokens and attention to check."""
    torch.manual_seed(0)
    model = build_model(tiny_config(), Vocabulary.build(TINY_CAPTIONS)).eval()
    with torch.no_grad():
        model.decoder.out.bias[model.vocab.end_id] = -2.0
    return model


@pytest.fixture
def tiny_model():
    return talkative_tiny_model()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A saved tiny attention model with a model card, for the CLI and the API."""
    model = talkative_tiny_model()
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.safetensors"
    save_checkpoint(model, path, {"training_data": "tests", "scores": {"CIDEr": 0.0}})
    return path


@pytest.fixture(scope="session")
def tiny_onnx_checkpoint(tmp_path_factory):
    """The tiny checkpoint with its encoder exported to ONNX (fp32), as `captioner export` writes it."""
    from captioner.onnx_encoder import export_encoder

    model = talkative_tiny_model()
    path = tmp_path_factory.mktemp("checkpoint") / "tiny-onnx.safetensors"
    save_checkpoint(model, path, {"training_data": "tests"}, onnx_encoder=export_encoder(model.encoder))
    return path


def assert_same_captions(results: list[dict], expected: list[dict], tolerance: float = 1e-3) -> None:
    """The same captions, word for word, for the same files, with log-probabilities and attention
    equal to within `tolerance`: what two backends that compute the same features to float32's
    rounding must give (their last digits may differ)."""
    import numpy as np

    assert len(results) == len(expected)
    for result, reference in zip(results, expected):
        assert {k: v for k, v in result.items() if k != "captions"} == {
            k: v for k, v in reference.items() if k != "captions"
        }
        assert [c["text"] for c in result["captions"]] == [c["text"] for c in reference["captions"]]
        for caption, other in zip(result["captions"], reference["captions"]):
            assert caption["log_prob"] == pytest.approx(other["log_prob"], abs=tolerance)
            if "attention" in other:
                np.testing.assert_allclose(caption["attention"], other["attention"], atol=tolerance)


def gone(pid: int) -> bool:
    """Ended: no such process, or a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def file_size_limit(size: int) -> Callable[[], None]:
    """A `preexec_fn` that limits the files the child writes to `size` bytes (`ulimit -f`): a write
    past it fails with EFBIG once the child ignores SIGXFSZ, as a full disk fails one with ENOSPC.
    Unlike a small tmpfs it needs no privileges."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def run_command(
    command: list[str], limit: int | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """A command's run, its output captured, under a file size limit of `limit` bytes if given."""
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        preexec_fn=None if limit is None else file_size_limit(limit),
    )
