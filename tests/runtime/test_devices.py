"""Devices: a name becomes a device this machine has, or a clear error before any work."""

import pytest
import torch

from runtime.devices import resolve_device

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")


def test_cpu_is_always_there():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cpu", local_rank=3) == torch.device("cpu")  # ranks share the CPU


@no_gpu
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_a_gpu_this_machine_lacks_is_named_in_the_error(name):
    with pytest.raises(ValueError, match=f"device {name}: no CUDA GPU is available here"):
        resolve_device(name)


@pytest.mark.parametrize(
    "name, message",
    [("gpu", "unknown device 'gpu'"), ("xla", "unsupported device 'xla'"), ("cuda:x", "unknown device")],
)
def test_names_torch_does_not_run_here_are_refused(name, message):
    with pytest.raises(ValueError, match=message):
        resolve_device(name)


@pytest.fixture
def two_gpus(monkeypatch):
    """What torch reports on a machine with two GPUs; only the choice of index is under test."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_a_bare_cuda_is_the_local_ranks_gpu(two_gpus):
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)  # an explicit index wins
    with pytest.raises(ValueError, match="GPU 2 does not exist; this machine has 2"):
        resolve_device("cuda", local_rank=2)
